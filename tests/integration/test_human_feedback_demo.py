"""examples/human_feedback_demo.py end to end on a tiny chat model (one step per phase): the
scripted labeller ranks through the page's API while the step waits, the rankings become a reward
model, and GRPO goes on with it; the three preference rates are printed."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_server import missing_serve_packages

pytestmark = [pytest.mark.train, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(bool(missing_serve_packages()), reason="the feedback page needs the judges extra")
def test_the_demo_runs_its_three_phases(tmp_path):
    from grpokit.models import save_model
    from tests.helpers import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_model

    tokenizer = make_char_tokenizer(chat_template=CHAT_TEMPLATE)
    save_model(make_tiny_model(tokenizer, arch="llama", num_kv_heads=4, max_positions=512), tokenizer,
               tmp_path / "model")
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "human_feedback_demo.py"), "--model",
                          str(tmp_path / "model"), "--out", str(tmp_path / "demo"), "--steps", "2", "--rm-steps", "1",
                          "--num-eval", "4"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    ranked = re.search(r"after 2 steps on (\d+) rankings", out)
    assert ranked and int(ranked[1]) == 8  # 2 steps x 4 groups, every one ranked by the script
    assert "reward model: held-out pair accuracy" in out and re.search(r"after 1 more steps on the reward model", out)
    assert (tmp_path / "demo" / "human" / "feedback.sqlite").is_file() and (tmp_path / "demo" / "rm").is_dir()
