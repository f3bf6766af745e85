"""The distributed helpers in one process (no launcher): config fields, the example configs,
and that every helper is a no-op that changes nothing when there is a single rank."""

from pathlib import Path

import pytest
import torch
import yaml

from grpokit import GRPOConfig, distributed
from grpokit.core.batch import make_micro_batches
from grpokit.core.forward import completion_logprobs
from grpokit.trajectory import Trajectories
from tests.helpers import make_tiny_llama

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_config_fields():
    assert GRPOConfig().distributed_strategy == "ddp" and GRPOConfig().ddp_timeout == 1800
    assert GRPOConfig(distributed_strategy="fsdp2", ddp_timeout=120).ddp_timeout == 120  # TRL's ddp_timeout
    with pytest.raises(ValueError, match="distributed_strategy='fsdp'"):
        GRPOConfig(distributed_strategy="fsdp")
    with pytest.raises(ValueError, match="ddp_timeout"):
        GRPOConfig(ddp_timeout=0)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    cfg = GRPOConfig(**yaml.safe_load(path.read_text()))
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps % cfg.num_generations == 0


def test_single_process_helpers_change_nothing(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_distributed(use_cpu=True) == (0, 1)
    assert distributed.device_for(use_cpu=True) == torch.device("cpu")
    with pytest.raises(KeyError):  # an exception passes through unchanged
        with distributed.rank_guard("anything"):
            raise KeyError("x")

    model, tok = make_tiny_llama()
    forward = distributed.wrap_for_training(model, "fsdp2", torch.device("cpu"), fn=completion_logprobs)
    assert type(forward) is distributed.TrainingForward and forward.model is model
    assert not distributed.is_fsdp2(forward)
    with distributed.full_parameters(forward), distributed.no_sync(forward):
        pass
    ids = [tok("q1:")["input_ids"]] * 2
    rollout = Trajectories(row_index=[0, 0], prompts=["q1:"] * 2, completions=["ab", "c"], prompt_ids=ids,
                           completion_ids=[[5, 6], [7]], sampling_logps=[[0.0, 0.0], [0.0]],
                           truncated=torch.zeros(2, dtype=torch.bool))
    mb = make_micro_batches(rollout, 2, pad_id=tok.pad_token_id, device="cpu", mask_truncated=False)[0]
    torch.testing.assert_close(forward(mb, temperature=0.7)[0], completion_logprobs(model, mb, temperature=0.7)[0],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="distributed_strategy='zero3'"):
        distributed.wrap_for_training(model, "zero3", torch.device("cpu"), fn=completion_logprobs)
