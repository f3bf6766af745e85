"""Two ranks (torchrun, gloo on 127.0.0.1) against one process on the same global batch.

- DDP and FSDP2, full fine-tune (dapo, KL to a frozen copy, tied embeddings, clipping) and LoRA
  (grpo, KL with the adapter off, mu=2): the same losses, rewards, gradient norms and final
  weights as one process (float32 summation order only).
- TRL's defaults (beta=0, dapo) with rank 1's groups all of equal rewards while rank 0's are not:
  rank 1 has nothing to train, yet runs the same collectives (zeroadv scenario).
- A generation worker per rank sampling one step ahead (max_staleness=1): the same as one process
  whose worker samples what the two ranks' workers sample; its checkpoint resumes exactly.
- A 2-rank checkpoint resumes on 2 ranks (the same weights as the straight run) and on 1 rank
  (the same weights as the 2-rank run: checkpoints have the one-process format).
- Through the CLI (`torchrun -m grpokit train`): a reward function that raises on rank 1, or a
  rank 1 that dies, ends the whole job within seconds, the message naming rank 1 and the cause.

The three torchrun launches start together (module fixture), the one-process references run in
this process meanwhile: most of the time is the import of torch/transformers in 6 processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.helpers import make_tiny_llama

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # on the launched processes' path too: dist_common imports tests.helpers
sys.path.insert(0, str(HERE))

from dist_common import (MAX_STEPS, SAVE_STEPS, WORLD, as_if_ranks, config, model_for,  # noqa: E402
                         prompts_ds, reward_for)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.train,  # every test reads runs trained on two ranks (or one)
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

TRAIN_JOBS = ["full:ddp", "full:fsdp2", "lora:ddp", "lora:fsdp2", "zeroadv:ddp", "zeroadv:fsdp2", "group:ddp",
              "async:ddp"]
RESUME_JOBS = ["full:ddp:resume", "full:fsdp2:resume", "lora:fsdp2:resume", "async:ddp:resume"]
LAUNCH_TIMEOUT = 420       # seconds; a hang fails the test instead of stalling CI
FAULT_TO_EXIT_LIMIT = 30   # seconds from the fault on rank 1 to the end of the whole job
HANG_TIMEOUT = 10          # ddp_timeout of the run whose rank 1 hangs in a reward function


# ----------------------------------------------------------------------------- launching

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")]),
               TOKENIZERS_PARALLELISM="false", **extra)
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    return env


class Launch:
    """`torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port <free> ARGS` in the background."""

    def __init__(self, args: list[str], log: Path, **env):
        self.log_path = log
        self._log = open(log, "w")
        self.started = time.time()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={WORLD}",
               "--master_addr", "127.0.0.1", f"--master_port={_free_port()}", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=_env(**env))
        self.ended: float | None = None  # when the job ended (a watcher thread notes it)
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        try:
            self.proc.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:  # a hang: fail the test, not CI
            self.proc.kill()
            self.proc.wait()
        self.ended = time.time()

    def wait(self) -> tuple[int, str]:
        self._watcher.join()
        self._log.close()
        return self.proc.returncode, self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    # for the CLI runs: a tiny model saved to disk and a JSONL dataset
    model, tok = make_tiny_llama()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts_ds()["prompt"])
    out = {"train": Launch([str(HERE / "_worker.py"), str(root / "two_ranks"), *TRAIN_JOBS, *RESUME_JOBS],
                           root / "train.log")}
    for kind in ("raise", "die", "hang"):
        cfg = {"model_name_or_path": str(root / "model"), "dataset_name": str(root / "prompts.jsonl"),
               "reward_funcs": [f"dist_common:{kind}_on_rank_1_at_step_2"], "output_dir": str(root / f"cli_{kind}"),
               "max_steps": 3, "per_device_train_batch_size": 8, "num_generations": 4,
               "max_completion_length": 4, "use_cpu": True, "disable_tqdm": True, "plot": False,
               "save_strategy": "no", "learning_rate": 1e-2,
               **({"ddp_timeout": HANG_TIMEOUT} if kind == "hang" else {})}
        (root / f"{kind}.yaml").write_text(json.dumps(cfg))  # JSON is YAML
        out[kind] = Launch(["-m", "grpokit", "train", str(root / f"{kind}.yaml")], root / f"{kind}.log",
                           GRPOKIT_FAULT_STAMP=str(root / f"{kind}.stamp"))
    out["root"] = root
    yield out
    for launch in out.values():
        if isinstance(launch, Launch):
            if launch.proc.poll() is None:
                launch.proc.kill()
            launch.wait()


@pytest.fixture(scope="module")
def two_ranks(launches, one_process) -> Path:
    for scenario in ("full", "lora", "zeroadv", "async"):  # the one-process references run while the ranks run
        one_process(scenario)
    rc, log = launches["train"].wait()
    assert rc == 0, log[-6000:]
    return launches["root"] / "two_ranks"


# ----------------------------------------------------------------------------- one process

@pytest.fixture(scope="module")
def one_process(launches):
    """One-process runs (this process), sampling what the two ranks sample (common.as_if_ranks)."""
    root, cache = launches["root"], {}

    def run(scenario: str, resume_from: Path | None = None) -> Path:
        key = (scenario, str(resume_from))
        if key not in cache:
            out = root / f"one_process_{scenario}_{len(cache)}"
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny matrices: faster, and fair to the torchrun launches beside us
            try:
                from grpokit import GRPOTrainer

                model, tok = model_for(scenario)
                trainer = GRPOTrainer(model=model, reward_funcs=reward_for(scenario), args=config(out, scenario, world=1),
                                      train_dataset=prompts_ds(), processing_class=tok)
                as_if_ranks(trainer.parts, WORLD)
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            finally:
                torch.set_num_threads(threads)
            cache[key] = out
        return cache[key]

    return run


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r for r in rows if "loss" in r}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def _assert_same_weights(a: dict, b: dict, tol: float) -> float:
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    worst = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")
        worst = max(worst, float((a[k] - b[k]).abs().max()))
    return worst


# ----------------------------------------------------------------------------- equality

@pytest.mark.parametrize("job", TRAIN_JOBS)
def test_two_ranks_give_the_losses_and_weights_of_one_process(job, two_ranks, one_process):
    scenario, strategy = job.split(":")
    ranks, single = two_ranks / f"{scenario}-{strategy}", one_process(scenario)
    m2, m1 = _metrics(ranks), _metrics(single)
    assert m2.keys() == m1.keys() and max(m1) == MAX_STEPS
    if scenario == "zeroadv":  # rank 1 had nothing to train (all its groups' rewards equal), rank 0 had
        assert all(0.5 <= m1[step]["frac_reward_zero_std"] < 1.0 for step in m1), m1
    for step in m1:
        assert m2[step]["reward"] == pytest.approx(m1[step]["reward"], abs=1e-6), step  # the same samples
        assert m2[step]["loss"] == pytest.approx(m1[step]["loss"], abs=1e-6), step
        assert m2[step]["grad_norm"] == pytest.approx(m1[step]["grad_norm"], rel=1e-5), step
        assert m2[step]["samples"] == m1[step]["samples"], step
    w2, w1 = _final_weights(ranks), _final_weights(single)
    worst = _assert_same_weights(w2, w1, tol=1e-5)  # measured: <= 3e-6 (float32 summation order)
    print(f"{job}: largest weight difference to one process {worst:.2e}")
    # and the runs did train: weights moved far more than the tolerance
    untrained = {k: v for k, v in model_for(scenario)[0].state_dict().items()}
    if scenario == "lora":
        moved = max(float(v.abs().max()) for k, v in w1.items() if "lora_B" in k)  # lora_B starts at 0
    else:
        moved = max(float((w1[k] - untrained[k]).abs().max()) for k in w1)
    assert moved > 1e-3, moved


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("job", RESUME_JOBS)
def test_two_rank_checkpoint_resumes_on_two_ranks(job, two_ranks):
    scenario, strategy, _ = job.split(":")
    straight, resumed = two_ranks / f"{scenario}-{strategy}", two_ranks / f"{scenario}-{strategy}-resume"
    m_straight, m_resumed = _metrics(straight), _metrics(resumed)
    assert min(m_resumed) > SAVE_STEPS  # it did start from the checkpoint
    for step in m_resumed:
        assert m_resumed[step]["loss"] == pytest.approx(m_straight[step]["loss"], abs=1e-7), step
    worst = _assert_same_weights(_final_weights(resumed), _final_weights(straight), tol=1e-6)
    print(f"{job} on 2 ranks: largest weight difference to the straight run {worst:.2e}")


@pytest.mark.parametrize("job", ["full:ddp", "full:fsdp2", "lora:fsdp2"])
def test_two_rank_checkpoint_resumes_on_one_rank(job, two_ranks, one_process):
    scenario, strategy = job.split(":")
    straight = two_ranks / f"{scenario}-{strategy}"
    resumed = one_process(scenario, resume_from=straight / f"checkpoint-{SAVE_STEPS}")
    assert min(_metrics(resumed)) > SAVE_STEPS
    worst = _assert_same_weights(_final_weights(resumed), _final_weights(straight), tol=1e-5)
    print(f"{job} resumed on 1 process: largest weight difference to the 2-rank run {worst:.2e}")


def test_fsdp2_checkpoint_files_are_those_of_one_process(two_ranks):
    """Full tensors, tied weights stored once, optimizer state by parameter index."""
    ckpt = two_ranks / "full-fsdp2" / f"checkpoint-{SAVE_STEPS}"
    plain = model_for("full")[0]
    weights = load_file(ckpt / "model.safetensors")
    expected = {k: v.shape for k, v in plain.state_dict().items()}
    assert "lm_head.weight" not in weights  # stored once, as an alias of the embedding
    assert {k: v.shape for k, v in weights.items()} == {k: s for k, s in expected.items() if k != "lm_head.weight"}
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    trainable = [p for p in plain.parameters() if p.requires_grad]
    assert sorted(optim["state"]) == list(range(len(trainable)))
    assert [optim["state"][i]["exp_avg"].shape for i in range(len(trainable))] == [p.shape for p in trainable]


# ----------------------------------------------------------------------------- faults

def _fault(launches, kind: str) -> tuple[int, str, float]:
    rc, log = launches[kind].wait()
    stamp = launches["root"] / f"{kind}.stamp"
    assert stamp.exists(), f"rank 1 never reached its failing reward call:\n{log[-6000:]}"
    return rc, log, launches[kind].ended - float(stamp.read_text())


def test_a_reward_that_raises_on_one_rank_stops_every_rank_quickly(launches):
    rc, log, seconds = _fault(launches, "raise")
    assert rc != 0
    assert seconds < FAULT_TO_EXIT_LIMIT, seconds   # measured: 5-9 s on a loaded 2-core machine (teardown)
    print(f"raise on rank 1 -> job ended after {seconds:.1f} s")
    message = "grpokit train: error: rank 1 failed in the reward functions: RewardError"
    assert log.count(message) == WORLD, log[-6000:]  # each rank says it, and why
    assert "boom: the reward server is down" in log
    steps = [json.loads(line)["step"] for line in open(launches["root"] / "cli_raise" / "metrics.jsonl")]
    assert steps == [1]  # step 1 trained on two ranks through the CLI; step 2 failed


def test_a_rank_that_dies_stops_the_job_quickly(launches):
    rc, log, seconds = _fault(launches, "die")
    assert rc != 0
    assert seconds < FAULT_TO_EXIT_LIMIT, seconds   # torchrun ends the other rank: measured 2-4 s
    print(f"rank 1 died -> job ended after {seconds:.1f} s")
    # torchrun's summary names the rank that died and its exit code as the root cause
    root_cause = log[log.index("Root Cause"):]
    assert "rank      : 1" in root_cause and "exitcode  : 17" in root_cause, log[-4000:]


def test_a_rank_that_hangs_is_named_when_ddp_timeout_has_passed(launches):
    rc, log, seconds = _fault(launches, "hang")
    assert rc != 0
    assert seconds < HANG_TIMEOUT + FAULT_TO_EXIT_LIMIT, seconds
    print(f"rank 1 hung -> job ended after {seconds:.1f} s (ddp_timeout={HANG_TIMEOUT})")
    assert "rank(s) 1 did not finish the reward functions within ddp_timeout=10 s" in log, log[-6000:]
