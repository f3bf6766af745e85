"""torch.distributed for grpokit, launched by `torchrun`: nothing home-made.

- `init_distributed` opens the default process group from torchrun's environment (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on CUDA (after
  `torch.cuda.set_device(local_rank)`), gloo on CPU, with `ddp_timeout` seconds for a collective.
- `wrap_for_training` puts the training forward (`core.forward.completion_logprobs`) in a small module,
  `TrainingForward`, and wraps that in DDP or FSDP2 (`fully_shard` per decoder layer, then the
  root). `completion_logprobs` calls the decoder and the lm_head weight directly, which would skip
  the forward of a DDP/FSDP wrapper around the model: going through `TrainingForward.forward`
  arms DDP's gradient all-reduce (exactly once per backward) and FSDP2's root all-gather of the
  embedding / final norm / lm_head. The user's model object stays the one `trainer.model` returns.
- `full_parameters` all-gathers every FSDP2 parameter once for generation (the HF engine then
  decodes with no collectives, so ranks may decode different numbers of tokens).
- `full_state` / `load_full_state`: FSDP2 checkpoints through torch.distributed.checkpoint's
  `get_state_dict` / `set_state_dict` with *full* state dicts, converted to the same files a
  one-process run writes, so any checkpoint resumes on any number of ranks, DDP or FSDP2.
- `rank_guard`: an exception on one rank inside the guarded phase ends every rank at once, with
  the failing rank and its error in the message, instead of a hang until the collective timeout.

Gradient scale: DDP and FSDP2 *average* gradients over ranks; the loss normalisers of dapo /
dr_grpo / cispo are global counts (all ranks) divided by world_size in trainer._accumulate_gradients,
so the averaged gradient equals the one-process gradient of the same global batch
(tests/distributed check it numerically).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import os
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from typing_extensions import TypeIs

STRATEGIES = ("ddp", "fsdp2")


class RankFailedError(RuntimeError):
    """One or more ranks raised inside a `rank_guard`; raised on every rank, naming them."""


# --------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------

def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher setting RANK and WORLD_SIZE > 1) started us."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


_GUARD: dict[str, Any] = {"group": None, "timeout": None}
"""The gloo group the rank guard meets in (the default group on CPU; a gloo side group next to
NCCL, so the guard needs no GPU sync and can use gloo's monitored barrier), and its timeout."""


def init_distributed(*, use_cpu: bool = False, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Open the default process group when launched by torchrun; returns (rank, world_size).

    No-op (and (0, 1)) for a single process; an existing group (the user's own) is used as is."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launched_by_torchrun():
        return 0, 1
    cuda = torch.cuda.is_available() and not use_cpu
    if cuda:
        torch.cuda.set_device(local_rank())
    timeout = datetime.timedelta(seconds=float(timeout_s))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    _GUARD["group"] = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    _GUARD["timeout"] = timeout
    return dist.get_rank(), dist.get_world_size()


def cleanup() -> None:
    """Destroy the default process group (the CLI calls it at the end of a run).

    Every rank meets at a barrier first: a rank that tears its gloo connections down while a peer
    still has work in flight on them can make that peer abort ("terminate called without an active
    exception") after a run that itself succeeded. Callers drop their trainer first: DDP's reducer
    and FSDP2's sharded parameters hold the process group, and one freed only at interpreter exit
    outlives the group's shutdown; the `gc.collect()` here frees them before the group goes."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for(use_cpu: bool) -> torch.device:
    """cuda:<local rank> when CUDA is used, else cpu."""
    if torch.cuda.is_available() and not use_cpu:
        return torch.device("cuda", local_rank() if launched_by_torchrun() else torch.cuda.current_device())
    return torch.device("cpu")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# --------------------------------------------------------------------------------------------
# the collectives a run makes (every rank calls each one, whatever its data)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Collectives:
    """The run's rank, world size and device, and the reductions it makes over ranks (all
    identity on one process). Every rank makes the same calls in the same order."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def guard(self, what: str):
        """If this phase raises on any rank, every rank raises naming it (`rank_guard`)."""
        return rank_guard(what, self.device if self.device.type == "cuda" else None)

    def global_sum(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device).detach().clone()
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def global_max(self, n: int) -> int:
        x = torch.tensor([int(n)], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return int(x)

    def gather_values(self, values: torch.Tensor) -> torch.Tensor:
        """The 1-D `values` of every rank, concatenated in rank order (ranks may hold different counts)."""
        if self.world_size == 1:
            return values
        values = values.detach().reshape(-1)
        longest = self.global_max(values.numel())
        padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
        padded[:values.numel()] = values
        counts = [torch.zeros(1, dtype=torch.int64, device=values.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([values.numel()], dtype=torch.int64, device=values.device))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:int(n)] for part, n in zip(parts, counts)])

    def gather_objects(self, obj: Any) -> list:
        """`obj` of every rank (picklable), in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Means over the ranks that have each name (a reward may log a metric on some ranks only:
        the names are gathered first, so every rank reduces the same vector)."""
        if self.world_size == 1:
            return dict(values)
        names: list[Any] = [None] * self.world_size
        dist.all_gather_object(names, sorted(values))
        union = sorted({n for ns in names for n in ns})
        if not union:
            return {}
        pairs = torch.tensor([[values.get(n, 0.0), 1.0 if n in values else 0.0] for n in union], device=self.device)
        dist.all_reduce(pairs)
        return {n: float(s / c) for n, (s, c) in zip(union, pairs.cpu().tolist()) if c}

    def reduce_metrics(self, local: dict[str, torch.Tensor]) -> dict[str, float]:
        """The mean over ranks of each scalar."""
        keys = sorted(local)
        vec = torch.stack([torch.as_tensor(local[k], dtype=torch.float32).detach().cpu().reshape(()) for k in keys])
        if self.world_size > 1:
            vec = vec.to(self.device)
            dist.all_reduce(vec)
            vec = (vec / self.world_size).cpu()
        return {k: float(v) for k, v in zip(keys, vec)}


# --------------------------------------------------------------------------------------------
# the training forward as a module, wrapped in DDP or FSDP2
# --------------------------------------------------------------------------------------------

class TrainingForward(nn.Module):
    """`forward(mb, **kw)` = `fn(self.model, mb, **kw)` (the training forward,
    `core.forward.completion_logprobs`) as a module, so that DDP's / FSDP2's forward hooks run
    around the real training forward."""

    def __init__(self, model: nn.Module, fn: Callable[..., tuple]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args, **kwargs):
        logps, *rest = self.fn(self.model, *args, **kwargs)
        # a fresh tensor, not a view: FSDP2 hooks its pre-backward on the output
        return (logps.clone() if logps._base is not None else logps, *rest)


def wrap_for_training(model: nn.Module, strategy: str, device: torch.device, *, fn: Callable[..., tuple],
                      frozen: bool = False) -> nn.Module:
    """`TrainingForward(model, fn)`, wrapped for the current process group.

    One process: returned as is. "ddp": `DistributedDataParallel` (the model is broadcast from
    rank 0; gradients all-reduced and averaged in backward). "fsdp2": rank 0's weights are
    broadcast, then `fully_shard` is applied to every decoder layer and to the `TrainingForward`
    root (embedding, final norm and lm_head are sharded with the root). `frozen=True` is for the
    reference model (no gradients: DDP is not needed, FSDP2 still shards it)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed_strategy={strategy!r}: use one of {', '.join(STRATEGIES)}.")
    forward = TrainingForward(model, fn)
    if world_size() == 1:
        return forward
    if strategy == "ddp":
        if frozen:
            return forward
        # The buffers (rotary frequencies) are constants, the same on every rank: synced once at
        # construction, not at every forward (a collective for nothing).
        ddp = nn.parallel.DistributedDataParallel
        no_buffer_sync: dict[str, Any] = (
            {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": False})
        return ddp(forward, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        raise ValueError("distributed_strategy='fsdp2' needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); "
                         "use distributed_strategy='ddp' or a newer torch.") from None

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)  # every rank shards the same weights
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    root = fully_shard(forward, reshard_after_forward=False)  # `forward` itself, now an FSDPModule
    # The root must be initialised before any layer runs on its own (generation calls the model,
    # not the root): FSDP2 takes the first module to run forward as the root otherwise.
    root._get_fsdp_state()._lazy_init()
    return forward


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the classes in the transformers model's
    `_no_split_modules` (e.g. LlamaDecoderLayer), else the decoder's `layers`."""
    from grpokit.modeling.info import unwrap

    inner = unwrap(model)
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers and hasattr(inner, "get_decoder") and hasattr(inner.get_decoder(), "layers"):
        layers = list(inner.get_decoder().layers)
    if not layers:
        raise ValueError(f"distributed_strategy='fsdp2': cannot find the decoder layers of {type(inner).__name__} "
                         "(no _no_split_modules and no decoder .layers); use distributed_strategy='ddp'.")
    return layers


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2 here, so nothing is sharded
        return None
    return FSDPModule


def is_fsdp2(module: object) -> TypeIs[FSDPModule]:
    fsdp_type = _fsdp_module_type()
    return fsdp_type is not None and isinstance(module, fsdp_type)


@contextlib.contextmanager
def full_parameters(root: nn.Module):
    """FSDP2: all-gather every parameter under `root` once and keep it gathered inside the
    context (generation with the model's own forward, no collective per decode step); the shards
    are restored on exit. Peak memory is the full model, as with TRL's ds3_gather_for_generation.
    Every rank must enter it (one all-gather per sharded module). No-op for other modules."""
    if not is_fsdp2(root):
        yield
        return
    modules = [m for m in root.modules() if is_fsdp2(m)]
    for m in modules:
        m.unshard()
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(m is not root, recurse=False)  # the wrap_for_training values
            m.reshard()


def no_sync(module: nn.Module):
    """DDP: skip the gradient all-reduce of a micro-batch that is not the last one. FSDP2
    reduce-scatters every micro-batch (the gradients stay sharded; correct, more traffic)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# faults: one rank's exception ends every rank at once
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def rank_guard(what: str, device: torch.device | None = None):
    """Run a phase in which ranks do not talk to each other (generation, rewards, rank 0
    writing a checkpoint), then all-reduce an "ok" flag. If any rank raised, every rank raises
    `RankFailedError` naming the rank(s), the phase and the error, instead of the healthy ranks
    waiting in their next collective until the timeout. One tiny all-reduce per phase, in gloo
    (the default group on CPU, a gloo side group beside NCCL), after gloo's monitored barrier: a
    rank that never finishes the phase (hung in a reward function) is named by rank 0 once
    `ddp_timeout` has passed."""
    if world_size() == 1:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    group = _GUARD["group"]
    if dist.get_backend(group) == "gloo":
        # rank 0 waits for every rank and names the ones that do not arrive (a rank hung in a
        # reward function), instead of every rank timing out in the next collective, unnamed
        timeout = _GUARD["timeout"] or datetime.timedelta(minutes=30)
        try:
            dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
        except RuntimeError as exc:
            missing = _ranks_named_in(str(exc))
            who = (f"rank(s) {', '.join(map(str, missing))}" if missing
                   else "rank 0 did not confirm that every rank finished; a rank")
            raise RankFailedError(
                f"{who} did not finish {what} within ddp_timeout={timeout.total_seconds():.0f} s (hung?); "
                f"stopping all {dist.get_world_size()} ranks") from (error or exc)
        device = torch.device("cpu")
    else:  # another backend without a monitored barrier: the plain all-reduce below
        device = device or (torch.device("cuda", torch.cuda.current_device())
                            if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    flag = torch.tensor([0.0 if error is None else 1.0], device=device)
    dist.all_reduce(flag, group=group)
    if float(flag) == 0.0:
        return
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
    failed = "; ".join(f"rank {r} failed in {what}: {m}" for r, m in enumerate(messages) if m is not None)
    raise RankFailedError(f"{failed} (stopping all {len(messages)} ranks)") from error


def _ranks_named_in(message: str) -> list[int]:
    """The ranks gloo's monitored barrier reports as missing ("Rank 1 failed to pass
    monitoredBarrier ..." or "Ranks 1, 3 failed to pass ...")."""
    import re

    match = re.search(r"Ranks? ([\d, ]+) failed to pass", message)
    return [int(x) for x in re.findall(r"\d+", match.group(1))] if match else []


# --------------------------------------------------------------------------------------------
# FSDP2 checkpoints: full state dicts through torch.distributed.checkpoint
# --------------------------------------------------------------------------------------------

def _trainable_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order: index i of optimizer.state_dict()."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the model (with FSDP2 the optimizer "
                         "must be made after sharding: let grpokit build it)") from None


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Every rank calls it (all-gathers); rank 0 gets the full model state dict (CPU) and the
    optimizer state in `optimizer.state_dict()` form (parameter indices, full tensors); the
    other ranks get ({}, {})."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    # tied weights (embedding = lm_head) come back as two copies: make them one tensor again, so
    # the files are those of a one-process save (stored once)
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in model_state and first[id(p)] in model_state:
            model_state[name] = model_state[first[id(p)]]
        first.setdefault(id(p), name)
    if optimizer is None:
        return model_state, None
    # Any: torch types the state as nested unions of every value kind; here it is {"state", "param_groups"}
    by_name: dict[str, Any] = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:
        return model_state, {}
    index = {n: i for i, n in enumerate(_trainable_names(model, optimizer))}
    optim_state = {
        "state": {index[n]: s for n, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }
    return model_state, optim_state


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    model_state: dict, optim_state: dict | None, *, strict: bool = True) -> None:
    """Every rank calls it; only rank 0's `model_state` (full tensors, the model's own names)
    and `optim_state` (`optimizer.state_dict()` form) are read, broadcast, and each rank keeps
    its shards. `strict=False` for a partial state (a LoRA adapter)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is None:
        return
    by_name: dict = {}
    if optim_state:
        names = _trainable_names(model, optimizer)
        by_name = {"state": {names[int(i)]: s for i, s in optim_state["state"].items()},
                   "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                    for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
