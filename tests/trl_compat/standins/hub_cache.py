"""A fake Hugging Face cache holding the stand-ins, and an offline mode that points at it.

`build(root)` writes, under `root`:

- `hub/models--trl-internal-testing--<name>/{refs/main, snapshots/<sha>/...}`: every text model
  of `model_repos.REPOS` with its tokenizer, laid out as `huggingface_hub` caches a download, so
  `AutoModelForCausalLM.from_pretrained("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5")` and
  `AutoTokenizer.from_pretrained(...)` resolve the unchanged hub id offline; with image_datasets,
  also every vision-language model of `vision_repos.REPOS` with its processor;
- `datasets/trl-internal-testing___zen/<config>/0.0.0/<sha>/` (and zen-image, zen-multi-image):
  every configuration of the zen datasets as `datasets` caches a prepared Hub dataset, so that
  `load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")` (streaming
  too) resolves offline through datasets' "latest cached version" fallback.

`offline(root)` is a context manager that switches the process to that cache and to offline mode
(environment variables and the module constants that huggingface_hub, datasets and transformers
read at import time), and restores everything on exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import sys
from pathlib import Path

from . import model_repos, tokenizer_families, vision_repos

# repo id -> the module (in this package) whose build() makes its configurations; imported when
# built (zen-multi-image needs datasets' `List` feature, new in datasets 4)
DATASETS = {
    "trl-internal-testing/zen": "zen_data",
    "trl-internal-testing/zen-image": "zen_image_data",
    "trl-internal-testing/zen-multi-image": "zen_multi_image_data",
}
# part of the fake commit hashes; bump it when the stand-ins change
STANDIN_VERSION = "1"


def commit_hash(repo_id: str) -> str:
    return hashlib.sha1(f"grpokit-trl-compat-standin:{STANDIN_VERSION}:{repo_id}".encode()).hexdigest()


def snapshot_dir(hub: Path, repo_id: str, repo_type: str = "model") -> Path:
    folder = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    sha = commit_hash(repo_id)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(sha)
    snapshot = folder / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build_models(hub: Path, staging: Path) -> None:
    tokenizers = {}
    for repo_id, (family, *_rest) in model_repos.REPOS.items():
        if family not in tokenizers:
            tokenizers[family] = tokenizer_families.build_tokenizer(family)
            tokenizer_families.save_tokenizer(tokenizers[family], family, staging / family)
        snapshot = snapshot_dir(hub, repo_id)
        for file in (staging / family).iterdir():
            _link_or_copy(file, snapshot / file.name)
        model_repos.build_model(repo_id, tokenizers[family], snapshot)


def build_vision_models(hub: Path) -> None:
    """The vision-language models of `vision_repos.REPOS`, each with its processor and tokenizer."""
    tokenizers = {}
    for repo_id, spec in vision_repos.REPOS.items():
        family = spec["family"]
        if family not in tokenizers:
            tokenizers[family] = tokenizer_families.build_tokenizer(family)
        vision_repos.build_model(repo_id, tokenizers[family], snapshot_dir(hub, repo_id), seed=model_repos._seed(repo_id))


def build_datasets(datasets_cache: Path, image_datasets: bool = True) -> None:
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.arrow_writer import ArrowWriter

    for repo_id, module_name in DATASETS.items():
        if not image_datasets and repo_id != "trl-internal-testing/zen":
            continue
        module = importlib.import_module(f"{__package__}.{module_name}")
        namespace, name = repo_id.split("/")
        for config_name, dataset_dict in module.build().items():
            folder = datasets_cache / f"{namespace}___{name}" / config_name / "0.0.0" / commit_hash(repo_id)
            folder.mkdir(parents=True, exist_ok=True)
            splits = SplitDict(dataset_name=name)
            for split, dataset in dataset_dict.items():
                with ArrowWriter(features=dataset.features, path=str(folder / f"{name}-{split}.arrow")) as writer:
                    writer.write_table(dataset.data.table)
                    num_examples, num_bytes = writer.finalize()
                splits.add(SplitInfo(name=split, num_bytes=num_bytes, num_examples=num_examples, dataset_name=name))
            DatasetInfo(features=dataset_dict["train"].features, builder_name="parquet", dataset_name=name,
                        config_name=config_name, version="0.0.0", splits=splits).write_to_directory(str(folder))


def build(root: Path, image_datasets: bool = True) -> dict:
    """Write every stand-in under root; returns the paths ({"home", "hub", "datasets", "modules"}).

    image_datasets=False leaves out what only the vision tests read: zen-image and
    zen-multi-image, and the vision-language models of `vision_repos` (2 s and 10 s to build)."""
    paths = {key: root / key for key in ("home", "hub", "datasets", "modules", "staging")}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    build_models(paths["hub"], paths["staging"])
    if image_datasets:
        build_vision_models(paths["hub"])
    build_datasets(paths["datasets"], image_datasets)
    return paths


@contextlib.contextmanager
def _patched(obj, name: str, value):
    missing = object()
    old = getattr(obj, name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


@contextlib.contextmanager
def offline(paths: dict):
    """Point huggingface_hub / datasets / transformers at the stand-in cache, offline; undo on exit."""
    import datasets.config
    import huggingface_hub.constants as hub_constants
    import transformers.dynamic_module_utils as dynamic_module_utils
    import transformers.utils.hub as transformers_hub

    env = {
        "HF_HOME": str(paths["home"]),
        "HF_HUB_CACHE": str(paths["hub"]),
        "HF_DATASETS_CACHE": str(paths["datasets"]),
        "HF_MODULES_CACHE": str(paths["modules"]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    saved_env = {key: os.environ.get(key) for key in env}
    # Remote code is copied into HF_MODULES_CACHE and imported as the `transformers_modules`
    # package; redirect it only when that package has not been imported from elsewhere already.
    redirect_modules = "transformers_modules" not in sys.modules
    modules_cache = str(paths["modules"])
    with contextlib.ExitStack() as stack:
        os.environ.update(env)
        stack.callback(_restore_env, saved_env)
        for obj, name, value in [
            (hub_constants, "HF_HOME", str(paths["home"])),
            (hub_constants, "HF_HUB_CACHE", str(paths["hub"])),
            (hub_constants, "HF_HUB_OFFLINE", True),
            (datasets.config, "HF_HUB_OFFLINE", True),
            (datasets.config, "HF_DATASETS_OFFLINE", True),
            (datasets.config, "HF_DATASETS_CACHE", Path(paths["datasets"])),
            (datasets.config, "DOWNLOADED_DATASETS_PATH", Path(paths["datasets"]) / "downloads"),
            (datasets.config, "EXTRACTED_DATASETS_PATH", Path(paths["datasets"]) / "downloads" / "extracted"),
        ]:
            stack.enter_context(_patched(obj, name, value))
        if redirect_modules:
            stack.enter_context(_patched(dynamic_module_utils, "HF_MODULES_CACHE", modules_cache))
            stack.enter_context(_patched(transformers_hub, "HF_MODULES_CACHE", modules_cache))
            stack.callback(_forget_modules, modules_cache)
        yield paths


def _restore_env(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _forget_modules(modules_cache: str) -> None:
    """Drop the remote-code modules imported from the stand-in cache, and the cache from sys.path."""
    while modules_cache in sys.path:
        sys.path.remove(modules_cache)
    for name in [n for n in sys.modules if n == "transformers_modules" or n.startswith("transformers_modules.")]:
        module = sys.modules[name]
        files = [getattr(module, "__file__", None) or "", *list(getattr(module, "__path__", []) or [])]
        if any(str(f).startswith(modules_cache) for f in files):
            del sys.modules[name]
