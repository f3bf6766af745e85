"""Tracker files, console output, integrations, and the metrics plot."""

import importlib.machinery
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
import yaml

from grpokit.tracking import Tracker, _build_figure, read_series, plot_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def strict_json(line):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(line, parse_constant=refuse)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [strict_json(line) for line in f]


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def test_metrics_are_one_strict_json_line_per_call_flushed_at_once(tmp_path):
    config = {"learning_rate": 1e-6, "reward_funcs": ("accuracy", "format"), "out": tmp_path}
    tracker = Tracker(tmp_path, config=config, total_steps=3, disable_progress=True)
    with open(tmp_path / "config.yaml") as f:
        assert yaml.safe_load(f) == {"learning_rate": 1e-6, "reward_funcs": ["accuracy", "format"],
                                     "out": str(tmp_path)}
    tracker.log(1, {"reward": 0.5, "loss": torch.tensor(0.25), "kl": np.float32(0.5),
                    "reward_std": float("nan"), "grad_norm": float("inf")})
    lines = read_jsonl(tmp_path / "metrics.jsonl")  # before close: flushed per line
    assert len(lines) == 1
    assert lines[0]["step"] == 1 and lines[0]["time"] > 1.6e9
    assert lines[0]["reward"] == 0.5 and lines[0]["loss"] == 0.25 and lines[0]["kl"] == 0.5
    assert lines[0]["reward_std"] is None and lines[0]["grad_norm"] is None
    tracker.log(2, {"reward": 0.75})
    tracker.close(plot=False)
    assert [line["step"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "plot.png").exists()


def test_completions_are_appended_with_their_step(tmp_path, capsys):
    tracker = Tracker(tmp_path, config={}, total_steps=2, disable_progress=True)
    rows = [{"prompt": "12+7=", "completion": "19 ✓", "reward": torch.tensor(1.0),
             "advantage": 0.7071, "accuracy": 1.0},
            {"prompt": [{"role": "user", "content": "hi"}], "completion": "x", "reward": None,
             "advantage": 0.0, "accuracy": None}]
    tracker.log_completions(1, rows, print_rows=1)
    tracker.log_completions(2, rows[:1])
    tracker.close(plot=False)
    lines = read_jsonl(tmp_path / "completions.jsonl")
    assert [line["step"] for line in lines] == [1, 1, 2]
    assert lines[0]["completion"] == "19 ✓" and lines[0]["reward"] == 1.0
    assert lines[1]["prompt"] == [{"role": "user", "content": "hi"}] and lines[1]["reward"] is None
    out = capsys.readouterr().out
    assert "[step 1] reward=1 advantage=0.707" in out and "12+7= -> 19 ✓" in out
    assert out.count("[step") == 1


def test_progress_bar_shows_step_reward_loss_and_last_accuracy(tmp_path, capsys):
    tracker = Tracker(tmp_path, config={}, total_steps=4)
    tracker.update_progress(1, {"reward": 0.25, "loss": 0.125})
    tracker.log(2, {"eval/accuracy": 0.5})
    tracker.update_progress(2, {"reward": 0.5, "loss": 0.0625, "eval/accuracy": 0.5})
    tracker.write("a message")
    tracker.update_progress(3, {"reward": 0.75})
    tracker.close(plot=False)
    captured = capsys.readouterr()
    assert "a message" in captured.out
    assert "3/4" in captured.err
    last = captured.err.rsplit("3/4", 1)[1]
    assert "reward=0.75" in last and "loss=0.0625" in last and "accuracy=0.5" in last


def test_disabled_progress_draws_nothing(tmp_path, capsys):
    tracker = Tracker(tmp_path, config={}, total_steps=4, disable_progress=True)
    tracker.update_progress(1, {"reward": 0.25})
    tracker.close(plot=False)
    assert capsys.readouterr().err == ""


def test_non_main_process_writes_and_prints_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, config={"a": 1}, total_steps=2, is_main_process=False)
    tracker.log(1, {"reward": 1.0})
    tracker.log_completions(1, [{"prompt": "p", "completion": "c", "reward": 1.0}], print_rows=1)
    tracker.update_progress(1, {"reward": 1.0})
    tracker.write("hello")
    assert tracker.close() is None
    assert not run_dir.exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_close_writes_the_plot_once(tmp_path):
    with Tracker(tmp_path, config={}, total_steps=30, disable_progress=True) as tracker:
        for step in range(1, 31):
            tracker.log(step, {"reward": step / 30, "rewards/accuracy/mean": step / 60})
        tracker.log(30, {"eval/accuracy": 0.5})
    assert_png(tmp_path / "plot.png")
    assert tracker.close() is None  # closing again does nothing


def test_unknown_report_to_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="tensorbord"):
        Tracker(tmp_path, report_to=["tensorbord"], config={}, total_steps=1)


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_not_installed_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match=r"grpokit\[tensorboard\]"):
        Tracker(tmp_path / "run", report_to=("jsonl", "tensorboard"), config={}, total_steps=1)
    with pytest.raises(ImportError, match=r"grpokit\[tensorboard\]"):  # every process fails alike
        Tracker(tmp_path / "run", report_to="tensorboard", config={}, total_steps=1,
                is_main_process=False)
    assert not (tmp_path / "run").exists()  # nothing written before the error


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed")
def test_wandb_not_installed_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match=r"grpokit\[wandb\]"):
        Tracker(tmp_path, report_to="wandb", config={}, total_steps=1)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_event_files_are_written(tmp_path):
    tracker = Tracker(tmp_path, report_to=("tensorboard",), config={}, total_steps=2,
                      disable_progress=True)
    tracker.log(1, {"reward": 0.5})
    tracker.close(plot=False)
    events = [n for _, _, names in os.walk(tmp_path / "tensorboard") for n in names]
    assert any(n.startswith("events.out.tfevents") for n in events)


def fake_module(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_tensorboard_and_wandb_receive_scalars_and_tables(tmp_path, monkeypatch):
    """The integration code paths, with recording stand-ins for SummaryWriter and wandb."""
    calls = []

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("tb_init", log_dir))

        def add_scalar(self, key, value, step):
            calls.append(("scalar", key, value, step))

        def add_text(self, key, text, step=None):
            calls.append(("text", key, step))

        def close(self):
            calls.append(("tb_close",))

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    wandb = fake_module(monkeypatch, "wandb", run=None, Table=Table,
                        init=lambda **kw: calls.append(("wandb_init", kw["name"], kw["config"])),
                        log=lambda data, step: calls.append(("wandb_log", data, step)),
                        finish=lambda: calls.append(("wandb_finish",)))
    fake_module(monkeypatch, "tensorboard")
    fake_module(monkeypatch, "torch.utils.tensorboard", SummaryWriter=SummaryWriter)

    tracker = Tracker(tmp_path, report_to="tensorboard,wandb", config={"seed": 1}, total_steps=2,
                      run_name="r1", disable_progress=True)
    tracker.log(1, {"reward": 0.5, "note": "text", "kl": float("nan")})
    tracker.log_completions(1, [{"prompt": "p", "completion": "c", "reward": 1.0}])
    tracker.close(plot=False)

    assert ("tb_init", os.path.join(str(tmp_path), "tensorboard")) in calls
    assert ("scalar", "reward", 0.5, 1) in calls
    assert not any(c[0] == "scalar" and c[1] in ("note", "kl") for c in calls)
    assert ("text", "completions", 1) in calls and ("tb_close",) in calls
    assert ("wandb_init", "r1", {"seed": 1}) in calls
    assert ("wandb_log", {"reward": 0.5}, 1) in calls
    table = next(c[1]["completions"] for c in calls if c[0] == "wandb_log" and "completions" in c[1])
    assert table.columns == ["prompt", "completion", "reward"] and table.data == [["p", "c", 1.0]]
    assert calls[-1] == ("wandb_finish",)
    assert wandb.run is None


def write_metrics(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def test_plot_with_and_without_eval(tmp_path):
    train = [{"step": s, "time": 0, "reward": s / 40, "rewards/format/mean": 1.0,
              "rewards/format/std": 0.0, "rewards/accuracy/mean": s / 80} for s in range(1, 41)]
    evals = [{"step": s, "time": 0, "eval/accuracy": s / 100} for s in (0, 20, 40)]
    write_metrics(tmp_path / "with.jsonl", train + evals)
    write_metrics(tmp_path / "without.jsonl", train)
    assert plot_metrics(tmp_path / "with.jsonl", tmp_path / "a" / "with.png") == str(
        tmp_path / "a" / "with.png")
    plot_metrics(tmp_path / "without.jsonl", tmp_path / "without.png")
    assert_png(tmp_path / "a" / "with.png")
    assert_png(tmp_path / "without.png")

    fig = _build_figure(read_series(tmp_path / "with.jsonl"), ("reward", "eval/accuracy"), "run")
    reward_ax, eval_ax = fig.axes
    labels = [line.get_label() for line in reward_ax.lines]
    assert labels == ["reward", "reward (moving average, 2 steps)",
                      "accuracy (moving average)", "format (moving average)"]
    assert list(reward_ax.lines[0].get_xdata()) == list(range(1, 41))
    assert list(eval_ax.lines[0].get_xdata()) == [0, 20, 40]  # points where it was measured
    assert eval_ax.lines[0].get_marker() == "o"
    assert "eval/accuracy" in eval_ax.get_title() and eval_ax.get_xlabel() == "step"
    assert len(_build_figure(read_series(tmp_path / "without.jsonl"),
                             ("reward", "eval/accuracy"), "run").axes) == 1


def test_plot_survives_resume_duplicates_cut_lines_and_missing_keys(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, [{"step": 1, "reward": 0.0}, {"step": 2, "reward": 0.1},
                         {"step": 2, "reward": 0.2}, {"step": 3, "reward": None}])
    with open(path, "a") as f:
        f.write('{"step": 4, "rew')  # cut by a crash
    assert read_series(path) == {"reward": {1: 0.0, 2: 0.2}}
    assert_png(plot_metrics(path, tmp_path / "p.png"))

    write_metrics(path, [{"step": 5, "eval/accuracy": 0.5}])
    assert len(_build_figure(read_series(path), ("reward", "eval/accuracy"), "r").axes) == 1
    assert_png(plot_metrics(path, tmp_path / "eval_only.png"))

    write_metrics(path, [])
    assert_png(plot_metrics(path, tmp_path / "empty.png"))
