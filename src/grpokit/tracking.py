"""What a run shows and leaves behind: progress bar, metrics, completions, plot, TensorBoard, W&B.

Files written into the run directory (main process only):

- ``config.yaml``       the run's configuration, at start
- ``metrics.jsonl``     one JSON object per :meth:`Tracker.log` call: ``{"step", "time", ...}``,
                        ``time`` in Unix seconds; NaN and inf are written as ``null`` (strict JSON)
- ``completions.jsonl`` one JSON object per sampled completion: ``{"step", "prompt", ...}``
- ``plot.png``          reward and eval accuracy over steps, at :meth:`Tracker.close`
- ``tensorboard/``      event files, with ``report_to`` including ``"tensorboard"``

Files are opened in append mode, so a resumed run continues them; :func:`plot_metrics` keeps the
last value logged for a step, so steps repeated after a resume are drawn once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["Tracker", "plot_metrics"]

BACKENDS = ("jsonl", "none", "all", "tensorboard", "wandb")
_POSTFIX_KEYS = (("reward", "reward"), ("loss", "loss"), ("accuracy", "accuracy"),
                 ("eval/accuracy", "accuracy"))


def plain(value):
    """Plain JSON/YAML types: dataclasses to dicts, tuples to lists, unknown objects to str."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "to_dict") and not isinstance(value, Mapping):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=str))


def _scalar(value):
    """A metric as a JSON value: tensors and numpy numbers to Python numbers, NaN/inf to None."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if value is None or isinstance(value, (str, int, float)) else str(value)


def _jsonable(value):
    """A completion-table cell as a JSON value (tensors to numbers or lists)."""
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:
        return value.tolist()
    if isinstance(value, (list, tuple, dict)):
        return plain(value)
    return _scalar(value)


RUN_FILES = ("metrics.jsonl", "completions.jsonl", "plot.png", "tensorboard")
CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")


def previous_run(run_dir: str) -> list[str]:
    """What in `run_dir` belongs to a run already made there: a non-empty metrics.jsonl,
    checkpoints, a final model (config.yaml alone does not count)."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics):
        with open(metrics, encoding="utf-8") as f:
            found.append(f"metrics.jsonl with {sum(1 for _ in f)} records")
    ckpts = sorted(n for n in os.listdir(run_dir) if CHECKPOINT_NAME.match(n))
    if ckpts:
        found.append(", ".join(ckpts[-2:]) + (f" and {len(ckpts) - 2} more" if len(ckpts) > 2 else ""))
    if os.path.isdir(os.path.join(run_dir, "final")):
        found.append("final/")
    return found


class MissingPackageError(ImportError):
    """An optional package (tensorboard, wandb, a judge's client, a metric, ...) was asked for and is
    not installed; its message names what to install, one line at the command line."""


def import_optional(module: str, why: str, extra: str) -> Any:
    """`importlib.import_module(module)`, or MissingPackageError "<why>: pip install 'grpokit[<extra>]'"."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackageError(f"{why}: pip install 'grpokit[{extra}]'") from e


def _backends(report_to) -> set[str]:
    """Integrations to use, raising early with the pip extra to install for a missing one."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or ())
    names = [n.strip().lower() for name in names for n in str(name).split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"report_to: unknown {unknown}; choose from {list(BACKENDS)}")
    installed = {n for n in ("tensorboard", "wandb") if importlib.util.find_spec(n) is not None}
    if "all" in names:
        return installed
    wanted = {n for n in names if n in ("tensorboard", "wandb")}
    for name in sorted(wanted - installed):
        raise MissingPackageError(
            f'report_to includes "{name}" but the {name} package is not installed: '
            f'pip install "grpokit[{name}]" (or remove "{name}" from report_to)'
        )
    return wanted


class Tracker:
    """Progress bar, ``metrics.jsonl``, ``completions.jsonl``, plot, TensorBoard and W&B.

    ``report_to`` names the integrations besides the JSONL files, which are always written:
    ``"tensorboard"``, ``"wandb"``, ``"all"`` (those installed), ``"jsonl"`` / ``"none"``
    (files only); asking for one that is not installed raises ``ImportError`` here, on every
    process. Only the main process writes files, draws the bar and prints.
    """

    def __init__(self, run_dir, *, report_to=("jsonl",), config=None, total_steps: int,
                 is_main_process: bool = True, run_name: str | None = None,
                 disable_progress: bool = False, overwrite: bool = False):
        backends = _backends(report_to)
        self.run_dir = os.fspath(run_dir)
        self.total_steps = int(total_steps)
        self.is_main_process = is_main_process
        self.disable_progress = disable_progress
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.completions_path = os.path.join(self.run_dir, "completions.jsonl")
        self.plot_path = os.path.join(self.run_dir, "plot.png")
        self._bar: Any = None  # a tqdm bar
        self._tb: SummaryWriter | None = None
        self._wandb: ModuleType | None = None
        self._completions: TextIO | None = None
        self._metrics: TextIO | None = None
        self._owns_wandb_run = False
        self._postfix: dict[str, float] = {}
        self._closed = not is_main_process
        self._config, self._overwrite, self._begun = config or {}, overwrite, False
        self._backends, self._run_name = backends, run_name
        self.previous_run = previous_run(self.run_dir) if is_main_process else []
        if not is_main_process:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        if not self.previous_run:  # else the folder is left as it is until begin() knows it may
            self.begin(resuming=False)

    def begin(self, resuming: bool) -> None:
        """Start writing into the run folder: a new run there refuses a folder that holds another
        run (its metrics, checkpoints or final model), unless `overwrite` (then they are removed);
        a resumed run continues its files."""
        if self._begun or not self.is_main_process:
            return
        if self.previous_run and not resuming:
            if not self._overwrite:
                raise ValueError(
                    f"output_dir={self.run_dir} already holds a run ({', '.join(self.previous_run)}): resume it with "
                    "resume_from_checkpoint=True, choose another output_dir, or set overwrite_output_dir=True "
                    "to start over there")
            for name in os.listdir(self.run_dir):
                path = os.path.join(self.run_dir, name)
                if name in RUN_FILES or name == "final" or CHECKPOINT_NAME.match(name):
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        import yaml

        self._begun = True
        with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(plain(self._config), f, sort_keys=False, allow_unicode=True)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        config = plain(self._config)
        if "tensorboard" in self._backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(self.run_dir, "tensorboard"))
            self._tb.add_text("config", "```yaml\n" + yaml.safe_dump(config) + "```")
        if "wandb" in self._backends:
            import wandb

            self._wandb = wandb
            if wandb.run is None:  # else log into the run the user started
                wandb.init(project=os.environ.get("WANDB_PROJECT", "grpokit"), name=self._run_name,
                           config=config, dir=self.run_dir)
                self._owns_wandb_run = True

    # ------------------------------------------------------------------ logging

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl; TensorBoard scalars; wandb.log."""
        if self._closed:
            return
        self.begin(resuming=False)
        values = {str(k): _scalar(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": round(time.time(), 3), **values}
        assert self._metrics is not None  # begin() opened it (main process, not closed)
        self._metrics.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics.flush()
        numbers = {k: v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, int(step))
        if self._wandb is not None:
            self._wandb.log(numbers, step=int(step))

    def log_completions(self, step: int, rows: list[dict], print_rows: int = 0) -> None:
        """Append one line per row ({"prompt", "completion", "reward", "advantage", ...}) to
        completions.jsonl, log a W&B table / TensorBoard text, and print ``print_rows`` of them."""
        if self._closed or not rows:
            return
        self.begin(resuming=False)
        rows = [{k: _jsonable(v) for k, v in row.items()} for row in rows]
        if self._completions is None:
            self._completions = open(self.completions_path, "a", encoding="utf-8")
        for row in rows:
            line = {"step": int(step), **row}
            self._completions.write(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")
        self._completions.flush()
        columns = list(dict.fromkeys(k for row in rows for k in row))
        if self._wandb is not None:
            data = [[_cell(row.get(c)) for c in columns] for row in rows]
            self._wandb.log({"completions": self._wandb.Table(columns=columns, data=data)},
                            step=int(step))
        if self._tb is not None:
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join("| " + " | ".join(_short(row.get(c), 200).replace("|", "\\|")
                                             for c in columns) + " |\n" for row in rows[:8])
            self._tb.add_text("completions", header + body, int(step))
        for row in rows[:print_rows]:
            self.write(_format_row(step, row))

    # ------------------------------------------------------------------ console

    def update_progress(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Move the progress bar to ``step``; its postfix shows reward, loss and accuracy
        (the last values seen, so eval accuracy stays after the step it was measured at)."""
        if self._closed or self.disable_progress:
            return
        from tqdm.auto import tqdm

        for key, label in _POSTFIX_KEYS:
            value = _scalar((metrics or {}).get(key))
            if isinstance(value, (int, float)):
                self._postfix[label] = value
        postfix = {k: f"{v:.4g}" for k, v in self._postfix.items()}
        if self._bar is None:
            # starts at this first step (a resumed run's too), so the rate counts timed steps
            # only; a str postfix keeps our key order (tqdm sorts a dict's keys)
            self._bar = tqdm(total=self.total_steps, initial=int(step), desc="train", unit="step",
                             dynamic_ncols=True,
                             postfix=", ".join(f"{k}={v}" for k, v in postfix.items()))
        self._bar.set_postfix(postfix, refresh=False)
        if int(step) > self._bar.n:
            self._bar.update(int(step) - self._bar.n)
        else:
            self._bar.refresh()

    def write(self, msg: str) -> None:
        """Print a line above the progress bar (main process only)."""
        if not self.is_main_process:
            return
        from tqdm.auto import tqdm

        tqdm.write(str(msg))

    # ------------------------------------------------------------------ end

    def close(self, plot: bool = True) -> str | None:
        """Close the bar, files and writers; write plot.png (returns its path) when ``plot``."""
        if self._closed:
            return None
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        for handle in (self._metrics, self._completions):
            if handle is not None:
                handle.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None and self._owns_wandb_run:
            self._wandb.finish()
        if not plot or not os.path.exists(self.metrics_path) or not os.path.getsize(self.metrics_path):
            return None
        try:
            return plot_metrics(self.metrics_path, self.plot_path)
        except Exception as exc:  # a plot must not turn a finished run into a failed one
            warnings.warn(f"could not write {self.plot_path}: {exc!r}", stacklevel=2)
            return None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close(plot=exc[0] is None)


def _cell(value):
    """A W&B table cell: lists and dicts as JSON text."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def _short(value, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _format_row(step: int, row: dict) -> str:
    """One line: ``[step 10] reward=1 advantage=0.707 | prompt… -> completion…``."""
    numbers = [f"{k}={v:.3g}" for k, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("row", "step")]
    return (f"[step {step}] {' '.join(numbers)} | {_short(row.get('prompt', ''), 60)} -> "
            f"{_short(row.get('completion', ''), 100)}")


# ---------------------------------------------------------------------- plot


def read_series(path) -> dict[str, dict[int, float]]:
    """{key: {step: value}} from a metrics.jsonl; the last value logged for a step wins and
    unreadable lines (a line cut by a crash) and null values are skipped."""
    series: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool) and math.isfinite(value):
                    series.setdefault(key, {})[step] = float(value)
    return series


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _per_function(series: Mapping, key: str) -> dict[str, dict[int, float]]:
    """Per-function parts of ``key``: ``rewards/<name>/mean`` (TRL's names). Run-level counters
    such as ``rewards/errors`` and the weighted ``rewards/total/mean`` are not functions."""
    prefix, parts = key + "s/", {}
    for name, values in series.items():
        rest = name[len(prefix):] if name.startswith(prefix) else None
        if rest and rest.endswith("/mean") and rest.count("/") == 1 and rest != "total/mean":
            parts[rest.removesuffix("/mean")] = values
    return parts


def _draw(ax, key: str, values: Mapping[int, float], parts: Mapping) -> None:
    steps = sorted(values)
    ys = [values[s] for s in steps]
    dense = len(steps) > 20 and not key.startswith("eval/")
    if dense:
        window = max(2, len(steps) // 20)
        ax.plot(steps, ys, color="C0", alpha=0.3, linewidth=1, label=key)
        ax.plot(steps, moving_average(ys, window), color="C0", linewidth=2,
                label=f"{key} (moving average, {window} steps)")
    else:
        ax.plot(steps, ys, "o-", color="C0", markersize=4, label=key)
    for i, (name, part) in enumerate(sorted(parts.items()), start=1):
        ps = sorted(part)
        py = [part[s] for s in ps]
        if dense:
            py = moving_average(py, max(2, len(ps) // 20))
        ax.plot(ps, py, "-" if dense else ".-", color=f"C{i}", linewidth=1.2,
                label=f"{name} (moving average)" if dense else name)
    if ("accuracy" in key or "pass@" in key) and all(0.0 <= y <= 1.0 for y in ys):
        ax.set_ylim(-0.03, 1.03)
    what = "measured at these steps" if not dense else "per step"
    ax.set_title(f"{key} ({what})" + (" and per reward function" if parts else ""))
    ax.set_xlabel("step")
    ax.tick_params(labelbottom=True)  # shared x axis: keep the step numbers on every panel
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
    if parts or dense:
        ax.legend(fontsize="small", loc="best")


def _build_figure(series: Mapping, keys: Iterable[str], title: str):
    """A matplotlib Figure (no pyplot state) with one panel per key that has values."""
    from matplotlib.figure import Figure

    panels = []
    for key in keys:
        values, parts = series.get(key, {}), _per_function(series, key)
        if values or parts:
            panels.append((key, values, parts))
    fig = Figure(figsize=(8, 3.2 * max(len(panels), 1)), layout="constrained")
    axes = fig.subplots(max(len(panels), 1), 1, sharex=True, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, f"no values for {', '.join(keys)} yet", ha="center", va="center",
                     transform=axes[0].transAxes)
        axes[0].set_xlabel("step")
        axes[0].set_title(title)
        return fig
    for ax, (key, values, parts) in zip(axes, panels):
        if values:
            _draw(ax, key, values, parts)
        else:  # only per-function values were logged: draw them as the panel
            first, *rest = sorted(parts)
            _draw(ax, f"{key}s/{first}", parts[first], {n: parts[n] for n in rest})
    fig.suptitle(title)
    return fig


def plot_metrics(metrics_jsonl_path, png_path, keys=("reward", "eval/accuracy")) -> str:
    """Draw ``keys`` from a metrics.jsonl into a PNG and return its path.

    One panel per key with values: dense per-step keys (like ``reward``) as a faint raw line with
    a moving average, plus their per-function means (``rewards/<name>/mean``) when logged;
    ``eval/*`` and sparse keys as points at the steps they were measured. Absent keys are left
    out; with none at all the PNG says so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    series = read_series(metrics_jsonl_path)
    title = os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl_path))) or "run"
    fig = _build_figure(series, tuple(keys), title)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    png_path = os.fspath(png_path)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110, format="png")
    return png_path
