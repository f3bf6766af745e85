"""`describe_rewards`: a readable table of what each reward function returns for each sample
(what `grpokit rewards test` prints). Errors and timeouts are shown in the table, never raised."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from grpokit.rewards.runner import RESERVED_COLUMNS, RewardRunner

__all__ = ["describe_rewards"]


def _short(x: Any, width: int) -> str:
    if isinstance(x, list) and x and isinstance(x[0], dict) and "content" in x[0]:
        x = " | ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in x)
    s = " ".join(str(x).split())
    return s if len(s) <= width else s[: width - 1] + "…"


def describe_rewards(runner: RewardRunner, prompts: Sequence, completions: Sequence,
                     columns: Mapping[str, Sequence] | None = None, completion_ids: Sequence | None = None,
                     width: int = 40) -> str:
    """One line per sample: prompt, completion, the other columns, each function's value ("None",
    "error", "timeout"), the weighted total; then the weights and the error messages."""
    probe = RewardRunner(runner.funcs, weights=runner.weights, timeout=runner.timeout, on_error="none")
    probe.names = list(runner.names)
    for plan, name in zip(probe._plans, runner.names):
        plan.name = name
    out = probe(prompts, completions, completion_ids=completion_ids, columns=columns)
    marks = {}
    for e in out.errors:
        for r in e["rows"]:
            marks[(r, e["function"])] = e["kind"]
    table = columns or {}
    shown_cols = [k for k in table if k not in RESERVED_COLUMNS]
    header = ["#", "prompt", "completion", *shown_cols, *out.names, "total"]
    rows = []
    for i in range(len(completions)):
        cells = [str(i), _short(prompts[i], width), _short(completions[i], width)]
        cells += [_short(table[k][i], 24) for k in shown_cols]
        for j, name in enumerate(out.names):
            v = float(out.per_func[i, j])
            cells.append(marks.get((i, name), "None" if math.isnan(v) else f"{v:.4g}"))
        t = float(out.total[i])
        cells.append("None" if math.isnan(t) else f"{t:.4g}")
        rows.append(cells)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)]
    lines.append(f"weights: {dict(zip(out.names, runner.weights))}")
    for e in out.errors:
        lines.append(f"{e['kind']}: {e['message']}")
    return "\n".join(lines)
