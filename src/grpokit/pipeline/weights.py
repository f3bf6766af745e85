"""The weights between the trainer and its generation worker: one staging copy of the trained
parameters in shared memory (the LoRA adapter only under LoRA, every parameter otherwise), a
version number on both sides, and the consistency probe.

    trainer, after optimizer step v:   wait until the worker took the last staged version,
                                       copy the trained parameters into the staging copy,
                                       score the probe set and checksum the parameters (the
                                       expected values), mark version v staged
    worker, before sampling with v:    wait until v is staged, copy it into its own model, mark
                                       it taken, score the probe set and checksum its parameters

The trainer compares the two: a sampler that runs other weights than the trainer's (a module
missed by the copy, a half-loaded adapter) stops the run at the first sync, naming the
parameters that differ and the size of the log-prob gap.

Made before the worker is forked; the shared tensors are the only memory the two processes
write to in common.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

STAGED, TAKEN, STAGE, LOADED = range(4)
"""Slots of the shared `flags` tensor: the version staged by the trainer, the version the worker
took, what the worker is doing (`STAGES`), the version the worker's model holds."""

STAGES = ("starting", "waiting for a request", "waiting for the weights (sync)", "loading the weights (sync)",
          "checking the weights (probe)", "generating (generation)", "stopped")
IDLE, WAIT_WEIGHTS, LOADING, PROBING, GENERATING, STOPPED = range(1, 7)


@dataclass(frozen=True)
class ProbeReport:
    """What one side measured at one version: the probe set's token log-probs and, per trained
    parameter, (sum, L2 norm) (float32 reductions: a sixth of float64's cost; equal values agree
    to their rounding, ~1e-7 relative, and one optimizer step moves them far more)."""

    version: int
    logps: torch.Tensor
    checksums: dict[str, tuple[float, float]]


class WeightChannel:
    """The staging copy of the trained parameters of `model` and the shared flags."""

    def __init__(self, model, probe_ids: list[list[int]]):
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.staged = {n: torch.empty_like(params[n].detach(), device="cpu").share_memory_() for n in self.names}
        self.flags = torch.full((4,), -1, dtype=torch.int64).share_memory_()
        self.flags[STAGE] = 0
        self.probe_ids = [list(map(int, ids)) for ids in probe_ids if len(ids) >= 2]
        self.eval_mode = has_dropout(model)  # without dropout, train and eval mode compute the same

    # ---- the trainer's side ----
    def stage(self, model, version: int) -> None:
        """Copy `model`'s trained parameters into the staging copy as `version` (the caller has
        made sure the worker took the previous one)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in self.names:
                self.staged[n].copy_(params[n].detach().to("cpu"))
        self.flags[STAGED] = version

    def taken(self) -> bool:
        """Whether the worker took the staged version (True before anything was staged)."""
        return int(self.flags[STAGED]) < 0 or int(self.flags[TAKEN]) >= int(self.flags[STAGED])

    @property
    def worker_stage(self) -> str:
        return STAGES[int(self.flags[STAGE])]

    # ---- the worker's side ----
    def load(self, model, version: int, alive=lambda: True, poll: float = 0.005) -> None:
        """Wait until `version` is staged, copy it into `model`, mark it taken."""
        self.flags[STAGE] = WAIT_WEIGHTS
        while int(self.flags[STAGED]) != version:
            if int(self.flags[STAGED]) > version:
                raise RuntimeError(f"the trainer staged version {int(self.flags[STAGED])} before the worker took "
                                   f"version {version} (the pipeline's order is broken)")
            if not alive():
                raise RuntimeError("the trainer is gone")
            time.sleep(poll)
        self.flags[STAGE] = LOADING
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(self.staged[n].to(params[n].device))
        self.flags[LOADED] = version
        self.flags[TAKEN] = version

    # ---- both sides ----
    def report(self, model, version: int) -> ProbeReport:
        """The probe set's log-probs under `model` and its trained parameters' checksums."""
        params = dict(model.named_parameters())
        sums = {n: (float(params[n].detach().sum()), float(torch.linalg.vector_norm(params[n].detach())))
                for n in self.names}
        return ProbeReport(version=version, logps=probe_logps(model, self.probe_ids, eval_mode=self.eval_mode),
                           checksums=sums)


DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                  "hidden_dropout_prob", "attention_probs_dropout_prob")


def has_dropout(model) -> bool:
    """Whether `model` computes differently in train mode: a Dropout module with p > 0, or a
    dropout rate in its config (attention dropout is often functional)."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(float(getattr(config, k, 0) or 0) > 0 for k in DROPOUT_FIELDS)


@torch.no_grad()
def probe_logps(model, probe_ids: list[list[int]], eval_mode: bool = True) -> torch.Tensor:
    """The probe sequences' token log-probs (teacher-forced, in eval mode when `eval_mode`; one
    forward: the sequences cut to the shortest's length), flattened."""
    if not probe_ids:
        return torch.zeros(0)
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        device = next(model.parameters()).device
        length = min(len(ids) for ids in probe_ids)
        x = torch.tensor([ids[:length] for ids in probe_ids], device=device)
        logits = model(input_ids=x).logits[:, :-1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1).reshape(-1).cpu()
    finally:
        if eval_mode:
            model.train(was_training)


def compare(expected: ProbeReport, got: ProbeReport, tolerance: float, rel: float = 1e-5) -> str | None:
    """None when the worker's weights are the trainer's (log-probs within `tolerance`, checksums
    equal to `rel`: float32 reductions of equal tensors may differ in their last bits when the
    two sides run different thread counts), else what differs, in one line."""
    gap = float((expected.logps - got.logps).abs().max()) if expected.logps.numel() else 0.0
    differ = [n for n, (s, norm) in expected.checksums.items()
              if n not in got.checksums or not _close(got.checksums[n], (s, norm), rel)]
    if gap <= tolerance and not differ:
        return None
    where = (f"parameters that differ ({len(differ)} of {len(expected.checksums)}): "
             + ", ".join(f"{n} (sum {expected.checksums[n][0]:.6g} in the trainer, "
                         f"{got.checksums[n][0] if n in got.checksums else float('nan'):.6g} in the worker)"
                         for n in differ[:5]) + (", ..." if len(differ) > 5 else "")
             if differ else "every trained parameter has the trainer's values: the difference comes from how the "
                            "worker runs the model (dtype, kernels, a module it does not sync)")
    return (f"after the weight sync of step {expected.version}, the worker's probe log-probs differ from the "
            f"trainer's by up to {gap:.3g} (sync_probe_tolerance={tolerance}); {where}")


def _close(a: tuple[float, float], b: tuple[float, float], rel: float) -> bool:
    return all(abs(x - y) <= rel * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))
