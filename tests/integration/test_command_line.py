"""The command line as a new user meets it: --help on every verb, one line and exit code 2 for
every bad input, eval/generate fitting the shipped model, runs that do not mix, and Ctrl-C that
saves a checkpoint and prints the command that resumes it exactly."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpokit.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["per_device_train_batch_size=16", "gradient_accumulation_steps=1", "num_generations=4",
         "task_num_train=64", "task_num_eval=16", "eval_steps=1000", "disable_tqdm=true", "plot=true"]


def run_main(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("verb, expect", [
    ("train", ["learning_rate", "num_generations", "loss_type", "Ctrl-C"]),
    ("eval", ["model_name_or_path", "pass@k", "max_completion_length"]),
    ("generate", ["prompt", "max_tokens", "chat"]),
    ("sft", ["model_name_or_path", "learning_rate"]),
    ("rewards", ["num_rows", "completions"]),
    ("compare", ["algos", "seeds"]),
])
def test_every_verb_has_help(capsys, verb, expect):
    for flag in ("--help", "-h"):
        rc, out, _ = run_main(capsys, verb, flag)
        assert rc == 0
        assert f"usage: grpokit {verb}" in out
        for word in expect:
            assert word in out, (verb, word)
    rc, out, _ = run_main(capsys, "--help")
    assert rc == 0 and all(v in out for v in ("train", "eval", "generate", "sft", "rewards", "compare"))
    assert "lr=" not in out  # the examples use real field names


def test_ppo_help_lists_its_own_fields(capsys):
    rc, out, _ = run_main(capsys, "train", "--algo", "ppo", "--help")
    assert rc == 0 and "PPOConfig" in out and "cliprange" in out and "vf_coef" in out


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("prompt,answer\n")
    (tmp_path / "bad.yaml").write_text("learning_rate: [1,\n")
    return tmp_path


@pytest.mark.parametrize("argv, says", [
    (["train", "bad.yaml"], "bad.yaml is not valid YAML"),
    (["train", "max_steps=abc"], "max_steps='abc' is not an integer"),
    (["train", "learning_rate=fast"], "learning_rate='fast' is not a number"),
    (["train", "nonsense_field=1"], "unknown field 'nonsense_field'"),
    (["train", "dataset_name=empty.jsonl", "reward_funcs=[soft_format]"], "'empty.jsonl' is empty"),
    (["train", "dataset_name=header.csv", "reward_funcs=[soft_format]"], "'header.csv' has no rows"),
    (["train", "dataset_name=missing.jsonl", "reward_funcs=[soft_format]"], "does not exist"),
    (["train", "max_steps=1", "resume_from_checkpoint=nowhere/checkpoint-3"], "no checkpoint at nowhere/checkpoint-3"),
    (["train", "max_steps=1", "eval_strategy=steps", "eval_steps=5", "model_name_or_path=" + str(ROOT / "src/grpokit/assets/starter"),
      "dataset_name=prompts.jsonl", "reward_funcs=[soft_format]", "max_completion_length=8"], "nothing to evaluate on"),
    (["train", "model_name_or_path=./no/such/model"], "model path './no/such/model' does not exist"),
    (["generate"], "give prompt="),
    (["generate", "prompt=1+1=", "max_tokens=500"], "max_tokens=500 does not fit"),
    (["eval", "max_completion_length=500", "task_num_eval=8"], "max_completion_length=500 does not fit"),
    (["rewards", "frob"], "one action: grpokit rewards test"),
])
def test_a_bad_input_is_one_line_and_exit_code_2(capsys, files, argv, says):
    (files / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    rc, _, err = run_main(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("grpokit")]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and says in lines[0], err[-3000:]
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys, files):
    rc, _, err = run_main(capsys, "train", "max_steps=abc", "--debug")
    assert rc == 2 and "Traceback" in err and "is not an integer" in err


def test_unknown_verb_suggests_the_right_one(capsys):
    rc, _, err = run_main(capsys, "trian")
    assert rc == 2 and "did you mean 'train'" in err


def test_eval_and_generate_work_on_the_shipped_model_with_their_defaults(capsys):
    rc, out, _ = run_main(capsys, "eval", "task_num_eval=16", "k=[1,2]")
    result = json.loads(out)
    assert rc == 0 and 0 <= result["eval/accuracy"] <= 1 and "eval/pass@2" in result
    assert result["max_completion_length"] <= 64  # the starter model's context, minus the prompt
    rc, out, _ = run_main(capsys, "generate", "prompt=12+7=", "n=2")
    assert rc == 0 and out.count("'12+7=' ->") == 2


@pytest.mark.train
def test_runs_do_not_mix_in_one_output_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "max_steps=2", "output_dir=run", "eval_strategy=no", *SMALL]
    assert run_main(capsys, *args)[0] == 0
    rc, _, err = run_main(capsys, *args)
    assert rc == 2 and "output_dir=run already holds a run (metrics.jsonl with" in err
    assert run_main(capsys, *args, "overwrite_output_dir=true")[0] == 0
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert steps == [1, 2]  # the first run's records were replaced, not appended to


SLOW_REWARD = '''import time


def slow(prompts, completions, **kw):
    time.sleep(0.4)
    return [float(len(c) % 3) for c in completions]
'''


def _train(tmp_path, *extra, env=None):
    cmd = [sys.executable, "-m", "grpokit", "train", "max_steps=8", "reward_funcs=[slowreward:slow]",
           "eval_strategy=no", "save_strategy=no", "logging_steps=1", *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.train
def test_ctrl_c_saves_a_checkpoint_and_the_printed_command_resumes_exactly(tmp_path):
    """SIGINT after the first step: the step in progress finishes, a checkpoint and the plot are
    written and the resume command is printed; running that command (the reward is a
    'module:function' found in the current directory) ends with the weights of a run that was
    never interrupted."""
    (tmp_path / "slowreward.py").write_text(SLOW_REWARD)
    straight = _train(tmp_path, "output_dir=straight")
    out_straight, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out_straight[-3000:]

    proc = _train(tmp_path, "output_dir=stopped")
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out
    hint = [line for line in out.splitlines() if line.startswith("resume with: ")]
    assert len(hint) == 1, out[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (tmp_path / "stopped" / "plot.png").exists()
    stopped_at = int(checkpoints[0].split("-")[1])
    assert 1 <= stopped_at < 8

    command = shlex.split(hint[0][len("resume with: "):])  # a shell command line
    assert command[:2] == ["grpokit", "train"] and command[-1].startswith("resume_from_checkpoint=")
    resumed = subprocess.run([sys.executable, "-m", "grpokit", *command[1:]], cwd=tmp_path, capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rewards_test_gives_conversational_completions_as_message_lists(capsys, tmp_path, monkeypatch):
    """As training does: for conversational data a reward function receives each completion as a
    list of messages, not as a string."""
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": [{"role": "user", "content": f"{a}+1="}], "answer": str(a + 1)} for a in range(3)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "chatreward.py").write_text(
        "def exact(prompts, completions, answer, **kw):\n"
        "    assert all(isinstance(c, list) and c[0]['role'] == 'assistant' for c in completions), completions\n"
        "    return [float(c[0]['content'] == a) for c, a in zip(completions, answer)]\n")
    rc, out, err = run_main(capsys, "rewards", "test", "dataset_name=chat.jsonl", "reward_funcs=[chatreward:exact]",
                            "completions=['1', '5', '3']")
    assert rc == 0, err[-2000:]
    assert "exact" in out and out.count("1.0") + out.count(" 1 ") >= 2, out


STRAY_THREAD_REWARD = '''import multiprocessing, threading, time

_started = []


def lingering(prompts, completions, **kw):
    if not _started:  # a non-daemon thread and a forked non-daemon process that outlive the run by far
        _started.append(threading.Thread(target=time.sleep, args=(600,), name="leftover-worker"))
        _started[0].start()
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,), name="leftover-child")
        child.start()
        open("child.pid", "w").write(str(child.pid))
    return [float(len(c)) for c in completions]
'''


@pytest.mark.train
def test_a_thread_left_by_a_reward_does_not_keep_the_finished_run_alive(tmp_path):
    (tmp_path / "strayreward.py").write_text(STRAY_THREAD_REWARD)
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "grpokit", "train", "max_steps=2", "reward_funcs=[strayreward:lingering]",
                           "eval_strategy=no", "save_strategy=no", *SMALL], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.time() - started < 120  # not the thread's 600 s
    assert "thread(s) started during the run are still running (leftover-worker)" in done.stderr
    assert "ended 1 child process(es) started during the run and still running (leftover-child" in done.stderr
    child = int((tmp_path / "child.pid").read_text())
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()


@pytest.mark.train
def test_trl_grpo_script_flags_work_on_grpokit_train(capsys, tmp_path, monkeypatch):
    """The flags of `trl grpo` (TrlParser: `--key value`, lists as `--key a b`, `--config`,
    ScriptArguments/ModelConfig names) run `grpokit train` unchanged."""
    from grpokit.models import starter_model_path

    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"<think>{i}", "solution": str(i)} for i in range(32)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "recipe.yaml").write_text("learning_rate: 1.0e-4\nlogging_steps: 1\n")
    rc, out, err = run_main(
        capsys, "train", "--config", "recipe.yaml", "--model_name_or_path", starter_model_path(),
        "--dataset_name", "data.jsonl", "--reward_funcs", "think_format_reward", "accuracy_reward",
        "--dtype", "float32", "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
        "--max_completion_length", "8", "--output_dir", str(tmp_path / "run"), "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "--plot", "false", "--use_cpu")
    assert rc == 0, err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["reward_funcs"] == ["think_format_reward", "accuracy_reward"] and saved["learning_rate"] == 1e-4
    assert saved["model_init_kwargs"] == {"dtype": "float32"}
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("rewards/think_format_reward/mean" in m for m in metrics)
