"""docs/quickstart.md runs as written: its commands, in a copy of examples/own_data/, each exit 0,
and the run it makes learns (held-out accuracy goes up)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# the quickstart's `grpokit train`
pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]


def quickstart_commands() -> list[str]:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    block = re.search(r"<!-- quickstart:begin -->\s*```bash\n(.*?)```\s*<!-- quickstart:end -->", text, re.S)
    assert block, "docs/quickstart.md lost its quickstart block"
    return [line for line in block.group(1).splitlines() if line.startswith("grpokit ")]


def test_the_quickstart_runs_as_written(tmp_path):
    work = tmp_path / "own_data"
    shutil.copytree(ROOT / "examples" / "own_data", work)
    commands = quickstart_commands()
    assert [c.split()[1] for c in commands] == ["rewards", "train", "eval", "generate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in commands:
        argv = shlex.split(command)
        done = subprocess.run([sys.executable, "-m", "grpokit", *argv[1:]], cwd=work, capture_output=True,
                              text=True, env=env, timeout=600)
        assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
    accuracy = [json.loads(line)["eval/accuracy"] for line in open(work / "runs" / "sums" / "metrics.jsonl")
                if "eval/accuracy" in line]
    assert len(accuracy) == 3 and accuracy[-1] > accuracy[0] + 0.1, accuracy
