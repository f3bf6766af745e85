"""The rules of the test folders: no test module imports another (what they share is in
tests/helpers.py or a conftest fixture), and the scan behind the `train` marker rule (tests/conftest.py
refuses, at collection, a test that trains without the marker) finds what trains and only that."""

import ast
from pathlib import Path

from tests.helpers import training_functions

TESTS = Path(__file__).resolve().parents[1]


def _is_test_module(name: str) -> bool:
    last = name.rpartition(".")[2]
    return last.startswith("test_") or last.endswith("_test") or last == "conftest"


def imports_of_test_modules(path: Path) -> list[str]:
    """The test modules (`test_*`, `*_test`, `conftest`) that the module at `path` imports, absolute
    (`tests.unit.test_x`, `test_x`) or relative (`.test_x`, `from . import test_x`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if node.module and _is_test_module(node.module):
                found.append(module)
            elif node.level or (node.module or "").split(".")[0] == "tests":  # from tests.unit import test_x
                prefix = module if module.endswith(".") else module + "."
                found += [prefix + a.name for a in node.names if _is_test_module(a.name)]
    return found


def test_no_test_module_imports_another():
    offenders = {str(p.relative_to(TESTS)): imports_of_test_modules(p) for p in sorted(TESTS.rglob("*.py"))}
    assert {p: names for p, names in offenders.items() if names} == {}


def test_the_import_scan_sees_every_form(tmp_path):
    path = tmp_path / "test_x.py"
    path.write_text("import test_a\nimport tests.unit.test_b as b\nfrom test_c import f\nfrom .test_d import g\n"
                    "from tests.unit import test_e\nfrom . import test_f\nfrom tests.helpers import make_tiny_model\n"
                    "from grpokit import test_like_name\nimport torch\n")
    assert imports_of_test_modules(path) == ["test_a", "tests.unit.test_b", "test_c", ".test_d", "tests.unit.test_e",
                                             ".test_f"]


def test_the_training_scan_finds_what_trains_and_only_that():
    source = '''
def helper(tmp_path):
    GRPOTrainer(model=m, args=a).train()

def test_direct(tmp_path):
    trainer.train(resume_from_checkpoint=True)

def test_through_a_helper(tmp_path):
    helper(tmp_path)

def test_nested():
    def run():
        return t.train()
    run()

def test_sft():
    run_sft(cfg)

def test_a_training_loop():
    optimizer.step()

def test_modes_only():
    model.train()
    run.model.train()
    trainer.train(False)
    trainer.train(mode=True)
    scheduler.step()

class TestX:
    def _go(self):
        self.trainer.train()

    def test_method(self):
        self._go()

    def test_other(self):
        pass
'''
    assert training_functions(source) == {"helper", "test_direct", "test_through_a_helper", "test_nested", "test_sft",
                                          "test_a_training_loop", "TestX._go", "TestX.test_method"}
