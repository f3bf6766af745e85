"""The import graph of src/grpokit has no cycles and no private names crossing modules
(scripts/check_imports.py), and the checker itself finds a cycle when there is one."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_imports.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycles_and_no_private_names_across_modules():
    assert _checker().problems() == []


def test_the_checker_finds_cycles_but_not_package_reexports():
    check = _checker()
    graph = {"grpokit.a": {"grpokit.b"}, "grpokit.b": {"grpokit.c"}, "grpokit.c": {"grpokit.a"},
             "grpokit.p": {"grpokit.p.x"}, "grpokit.p.x": {"grpokit.p"}, "grpokit.d": set()}
    assert check.find_cycles(graph) == [["grpokit.a", "grpokit.b", "grpokit.c"]]


def test_the_checker_finds_package_cycles_between_modules_that_do_not_import_each_other():
    """core.a -> rollout.b and rollout.c -> core.d: no module cycle, but the packages core and
    rollout depend on each other."""
    check = _checker()
    graph = {"grpokit.core.a": {"grpokit.rollout.b"}, "grpokit.rollout.b": set(),
             "grpokit.rollout.c": {"grpokit.core.d"}, "grpokit.core.d": set(), "grpokit.config": {"grpokit.core.d"}}
    assert check.find_cycles(graph) == []
    units, why = check.package_graph(graph)
    assert check.find_cycles(units) == [["core", "rollout"]]
    assert why[("rollout", "core")] == ["grpokit.rollout.c -> grpokit.core.d"]
