"""Writes docs/reference.md: the command line and every config field, from the code itself (the
same text as `grpokit <verb> --help`), so the page cannot drift from what the program accepts.

    python scripts/make_reference.py          # rewrite docs/reference.md
    python scripts/make_reference.py --check  # exit 1 if it is out of date (tests/unit/test_reference.py)
"""

from __future__ import annotations

import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def render() -> str:
    from grpokit.cli import COMMANDS, main_help

    parts = ["# Command line and configuration reference", "",
             "Generated from the code by `scripts/make_reference.py` (the text of `grpokit <command> --help`).", "",
             "## grpokit", "", "```", main_help(), "```", ""]
    for verb, (_, help_of) in COMMANDS.items():
        parts += [f"## grpokit {verb}", "", "```", help_of([]), "```", ""]
    for algo in ("ppo", "dpo"):
        parts += [f"## grpokit train --algo {algo}", "", "```", COMMANDS["train"][1](["--algo", algo]), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if PAGE.exists() and PAGE.read_text() == text else 1)
    PAGE.write_text(text)
    print(f"wrote {PAGE} ({len(text.splitlines())} lines)")
