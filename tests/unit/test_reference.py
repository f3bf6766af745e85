"""docs/reference.md is the program's own --help text: regenerate it with
`python scripts/make_reference.py` when a field or an option changes."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_reference.py"


def test_the_reference_page_is_up_to_date():
    spec = importlib.util.spec_from_file_location("make_reference", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.PAGE.read_text() == mod.render(), "docs/reference.md is stale: run python scripts/make_reference.py"
