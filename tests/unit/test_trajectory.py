"""Typed trajectories: model segments are trained, external ones (tool / environment output) are
context only; the forward plan is chosen once and printed as it is."""

import dataclasses

import pytest
import torch

from grpokit.algos import policy_loss
from grpokit.core.batch import make_micro_batches
from grpokit.core.forward import completion_logprobs
from grpokit.trajectory import EXTERNAL, MODEL, Segment, Trajectories
from tests.helpers import make_char_tokenizer, make_tiny_model, tiny_trainer


def tool_trajectories(seed=0, g=3, n_prompts=2, vocab=60):
    """Each sample: model tokens, then a tool result (external), then model tokens again; lengths
    differ per sample; one sample is model-only and one ends on an external segment."""
    gen = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    prompts, comps, segs = [], [], []
    for p in range(n_prompts):
        prompt = toks(4 + p)
        for i in range(g):
            a, t, b = 2 + i, 3 + (i + p) % 3, 1 + (i * 2) % 4
            if (p, i) == (0, 1):            # no tool call: one model segment
                comps.append(toks(a))
                segs.append([Segment(0, a)])
            elif (p, i) == (1, 2):          # cut by the budget inside a tool result
                comps.append(toks(a + t))
                segs.append([Segment(0, a), Segment(a, a + t, EXTERNAL)])
            else:
                comps.append(toks(a + t + b))
                segs.append([Segment(0, a), Segment(a, a + t, EXTERNAL), Segment(a + t, a + t + b, MODEL)])
            prompts.append(prompt)
    n = len(comps)
    return Trajectories(row_index=[i // g for i in range(n)], prompts=[None] * n, completions=[None] * n,
                        prompt_ids=prompts, completion_ids=comps,
                        sampling_logps=[[0.0] * len(c) for c in comps], truncated=torch.zeros(n, dtype=torch.bool),
                        segments=segs)


def test_segments_must_cover_the_completion_in_order():
    traj = tool_trajectories()
    with pytest.raises(ValueError, match="cover"):
        dataclasses.replace(traj, segments=[s[:-1] if len(s) > 1 else s for s in traj.segments])
    with pytest.raises(ValueError, match="gap or overlap"):
        dataclasses.replace(traj, segments=[[Segment(1, len(c))] for c in traj.completion_ids])
    with pytest.raises(ValueError, match="source"):
        Segment(0, 1, "tool")


def test_external_tokens_are_out_of_the_mask_and_so_of_every_normaliser():
    traj = tool_trajectories()
    mb = make_micro_batches(traj, len(traj), pad_id=0, device="cpu", mask_truncated=False)[0]
    # sample 0 of prompt 0: 2 model tokens, 3 external, 1 model
    assert traj.trained_mask(0) == [True, True, False, False, False, True]
    assert mb.completion_mask[0, :6].tolist() == [1, 1, 0, 0, 0, 1]
    assert mb.completion_mask.sum() == sum(sum(traj.trained_mask(i)) for i in range(len(traj)))
    # the tool tokens are still in the sequence: the context of the model's next segment
    assert mb.completion_ids[0, 2:5].tolist() == traj.completion_ids[0][2:5]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_a_trajectory_with_external_segments_gives_the_loss_and_gradient_of_the_plain_forward(loss_type):
    """Packed shared-prefix forward vs the plain padded forward, the mask leaving the tool tokens
    out: the same loss and parameter gradients; no gradient reaches a tool token's logprob; and
    the loss is the one of hand-computed normalisers over model tokens only."""
    model = make_tiny_model(make_char_tokenizer(), arch="qwen2")
    traj = tool_trajectories(seed=1)
    adv = torch.randn(len(traj), generator=torch.Generator().manual_seed(2))
    mb = make_micro_batches(traj, len(traj), pad_id=0, device="cpu", mask_truncated=False, advantages=adv)[0]
    num_items = float(mb.completion_mask.sum())

    def loss_and_grads(packed):
        model.zero_grad(set_to_none=True)
        logps, _ = completion_logprobs(model, mb, temperature=0.8, packed=packed)
        logps.retain_grad()
        loss, _ = policy_loss(logps, None, mb.advantages, mb.completion_mask, loss_type=loss_type,
                              max_completion_length=12, num_items_in_batch=num_items, num_sequences=len(traj))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, logps

    loss_packed, grads_packed, logps = loss_and_grads(True)
    loss_plain, grads_plain, _ = loss_and_grads(False)
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-5, atol=1e-7)
    for name in grads_plain:
        torch.testing.assert_close(grads_packed[name], grads_plain[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    external = mb.completion_mask == 0
    assert float(logps.grad[external].abs().max()) == 0.0  # nothing trains a tool token
    assert float(logps.grad[~external].abs().max()) > 0.0
    # on-policy the clipped objective is -A per model token: the normalisers count model tokens only
    mask = mb.completion_mask
    model_tokens = mask.sum(1)
    per_seq = -adv * model_tokens
    expected = {"dapo": per_seq.sum() / num_items, "bnpo": per_seq.sum() / num_items,
                "grpo": (per_seq / model_tokens).mean(), "dr_grpo": per_seq.sum() / (len(traj) * 12)}[loss_type]
    torch.testing.assert_close(loss_packed, expected, rtol=1e-5, atol=1e-6)


def test_the_forward_plan_is_chosen_once_printed_as_it_is_and_overridable(tmp_path):
    run = tiny_trainer(tmp_path, max_steps=1, num_iterations=2).parts
    assert run.plan.old_logps == "sampler"  # fp32 HF engine, untruncated sampling: reused
    assert "old logprobs: the sampler's, reused" in run.summary()
    run = tiny_trainer(tmp_path, max_steps=1, num_iterations=2, top_p=0.9, output_dir=str(tmp_path / "b")).parts
    assert run.plan.old_logps == "recomputed" and "computed once per generated batch" in run.summary()
    run = tiny_trainer(tmp_path, max_steps=1, output_dir=str(tmp_path / "c"), forward_plan={"packed": False,
                                                                                            "merge": False}).parts
    assert not run.plan.packed and "padded rows" in run.summary()
    with pytest.raises(ValueError, match="unknown field 'pack'"):
        tiny_trainer(tmp_path, max_steps=1, output_dir=str(tmp_path / "d"), forward_plan={"pack": False})
    with pytest.raises(ValueError, match="merge=True needs"):
        tiny_trainer(tmp_path, max_steps=1, loss_type="grpo", output_dir=str(tmp_path / "e"),
                     forward_plan={"merge": True})
    with pytest.raises(ValueError, match="skip_zero_advantage=True needs beta=0"):
        tiny_trainer(tmp_path, max_steps=1, beta=0.1, output_dir=str(tmp_path / "f"),
                     forward_plan={"skip_zero_advantage": True})


def test_tool_stats_select_and_concat_by_name():
    """Each count is a named [N] column; select and concat (dynamic sampling's rounds) keep them
    attached to their samples, a single-turn part counts zeros."""
    from grpokit.trajectory import ToolCounts, ToolStats

    stats = ToolStats.of([ToolCounts(turns=1), ToolCounts(turns=2, tool_calls=1), ToolCounts(turns=3, tool_calls=2,
                                                                                            tool_failures=1)])
    picked = stats.select([2, 0])
    assert picked["turns"].tolist() == [3, 1] and picked["tool_calls"].tolist() == [2, 0]
    both = ToolStats.concat([picked, ToolStats.zeros(2)])
    assert both["turns"].tolist() == [3, 1, 0, 0] and both.sums()["tool_failures"] == 1.0 and len(both) == 4
