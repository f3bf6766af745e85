"""Cross-check: one update's gradient of grpokit's GRPOTrainer against TRL's, on identical completions.

    benchmarks/.venv-trl/bin/python scripts/check_gradient_vs_trl.py

(TRL lives in the benchmark venv, see benchmarks/grpo_step.py.) The shipped starter model is loaded
twice (fp32, CPU); grpokit's engine samples 4 arithmetic prompts x G=8 and its reward functions
score them; both trainers then compute the loss and its gradient on those same completions --
grpokit through its training step (packed shared-prefix forward, merged micro-batches), TRL
through `GRPOTrainer.compute_loss` on the padded batch -- for each case of CASES (the loss types
and the knobs whose math TRL defines: GSPO with the entropy mask, the bias-corrected KL, cispo's
default cap, luspo, vespo, the entropy bonus). Prints the relative
difference of the whole gradient and of the worst tensor; float32 summation order alone gives
~1e-6. Exit status 1 when a difference exceeds 1e-4.
"""

from __future__ import annotations

import sys
import tempfile

import torch
import trl
from transformers import AutoModelForCausalLM

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.algos import group_advantages, is_local_mean
from grpokit.core.batch import make_micro_batches
from grpokit.core.loop import add_fixed_logprobs
from grpokit.data import get_task
from grpokit.models import load_tokenizer, starter_model_path

G, PROMPTS = 8, 4

CASES = {
    "dapo": {}, "grpo": {"loss_type": "grpo"}, "dr_grpo": {"loss_type": "dr_grpo"}, "bnpo": {"loss_type": "bnpo"},
    "cispo (default cap)": {"loss_type": "cispo"},
    "luspo (sequence)": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "vespo": {"loss_type": "vespo"},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    "dapo + entropy mask": {"top_entropy_quantile": 0.2},
    # (at quantile 0.5 the threshold of these completions falls on entropies that are tied across a
    # group's rows -- equal prefixes -- and float noise of 1e-7 between the two forwards flips
    # tokens at the tie: measured 2e-4 (dapo) and 9e-3 (gspo, where a flip rescales a sequence))
    "gspo + entropy mask": {"loss_type": "grpo", "importance_sampling_level": "sequence", "top_entropy_quantile": 0.2},
    "bias-corrected KL": {"beta": 0.04, "use_bias_correction_kl": True},
    "plain KL": {"beta": 0.04, "use_bias_correction_kl": False},
    "entropy bonus": {"entropy_coef": 0.01},
    # off-policy: old logprobs = the sampler's + noise (as after an update), the same for both
    "dapo (off-policy)": {"off_policy": True},
    "gspo (off-policy)": {"loss_type": "grpo", "importance_sampling_level": "sequence", "off_policy": True},
    "cispo (off-policy)": {"loss_type": "cispo", "epsilon_high": 1.1, "off_policy": True},
    "vespo (off-policy)": {"loss_type": "vespo", "off_policy": True},
    "off-policy mask": {"off_policy_mask_threshold": 0.002, "off_policy": True},
    "bias-corrected KL (off-policy)": {"beta": 0.04, "off_policy": True},
    "grpo + entropy bonus": {"loss_type": "grpo", "entropy_coef": 0.01},
}


def perturb(model) -> None:
    """Move a policy away from its reference (copied when its trainer was built), the same way for
    both trainers, so that the KL and its gradient are not zero."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def main() -> int:
    torch.manual_seed(0)
    path = starter_model_path()
    tok = load_tokenizer(path)
    task = get_task("arithmetic", seed=0, num_train=64, num_eval=8)
    worst_seen = 0.0
    rollout = advantages = None
    for case, knobs in CASES.items():
        ours, theirs = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for _ in range(2))
        common = dict(per_device_train_batch_size=G * PROMPTS, gradient_accumulation_steps=1, num_generations=G,
                      max_completion_length=8, temperature=1.0, top_p=1.0, top_k=0, loss_type="dapo", beta=0.0,
                      learning_rate=1e-4, max_steps=1, seed=0, use_cpu=True, bf16=False, report_to="none",
                      output_dir=tempfile.mkdtemp(), shuffle_dataset=False, reward_weights=list(task.reward_weights))
        common.update(knobs)
        off_policy = common.pop("off_policy", False)
        loss_type = common["loss_type"]
        trainer = GRPOTrainer(model=ours, reward_funcs=list(task.reward_funcs), processing_class=tok,
                              train_dataset=task.train_dataset,
                              args=GRPOConfig(**common, plot=False, save_strategy="no", disable_tqdm=True))
        run = trainer.parts
        if common["beta"] != 0.0:
            perturb(ours)
        if rollout is None:  # the same completions for every loss type
            rollout = run.score(run.sample(list(range(PROMPTS)), seed=123))
            advantages = group_advantages(rollout.rewards, G, scale_rewards="group")
        batches = make_micro_batches(rollout, G * PROMPTS, advantages=advantages, pad_id=run.pad_id,
                                     device=run.device, mask_truncated=False, merge=run.plan.merge,
                                     skip_zero_advantage=run.plan.skip_zero_advantage)
        add_fixed_logprobs(run, batches)
        old = None
        if off_policy:
            (mb,) = batches  # one micro-batch of every row, in order: [B, C] as TRL's padded tensors
            noise = torch.randn(mb.sampling_logps.shape, generator=torch.Generator().manual_seed(3)) * 0.05
            old = (mb.sampling_logps + noise) * mb.completion_mask
            mb.old_logps = old
        num_items = sum(mb.completion_mask.sum() for mb in batches)
        trainer.algorithm.accumulate_gradients(run, batches, num_items, torch.tensor(float(G * PROMPTS)),
                                               len(batches) if is_local_mean(loss_type) else 1, len(batches))
        g_ours = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}

        ref = trl.GRPOTrainer(model=theirs, reward_funcs=list(task.reward_funcs), processing_class=tok,
                              train_dataset=task.train_dataset, args=trl.GRPOConfig(**common))
        ref.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
        if common["beta"] != 0.0:
            perturb(ref.model)
        p_len = max(len(p) for p in rollout.prompt_ids)
        c_len = max(len(c) for c in rollout.completion_ids)
        pad = tok.pad_token_id
        completion_mask = torch.tensor([[1] * len(c) + [0] * (c_len - len(c)) for c in rollout.completion_ids])
        inputs = {
            "prompt_ids": torch.tensor([[pad] * (p_len - len(p)) + p for p in rollout.prompt_ids]),
            "prompt_mask": torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in rollout.prompt_ids]),
            "completion_ids": torch.tensor([c + [pad] * (c_len - len(c)) for c in rollout.completion_ids]),
            "completion_mask": completion_mask, "advantages": advantages.clone(),
            "num_items_in_batch": completion_mask.sum().float(), "old_per_token_logps": old,
        }
        if common["beta"] != 0.0:
            with torch.no_grad():
                ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
                mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
                inputs["ref_per_token_logps"] = ref._get_per_token_logps_and_entropies(
                    ref.ref_model, ids, mask, c_len)[0]
        ref.model.train()
        ref.compute_loss(ref.model, inputs).backward()
        g_ref = {n: p.grad for n, p in ref.model.named_parameters() if p.grad is not None}
        if set(g_ours) != set(g_ref):
            print(f"{case}: different parameters got gradients: {sorted(set(g_ours) ^ set(g_ref))}")
            return 1
        whole = (torch.sqrt(sum((g_ours[n] - g_ref[n]).pow(2).sum() for n in g_ref))
                 / torch.sqrt(sum(g_ref[n].pow(2).sum() for n in g_ref))).item()
        worst = max((g_ours[n] - g_ref[n]).norm().item() / max(g_ref[n].norm().item(), 1e-30) for n in g_ref)
        worst_seen = max(worst_seen, whole, worst)
        print(f"{case:22s} relative gradient difference grpokit vs TRL: whole {whole:.2e}, worst tensor {worst:.2e} "
              f"({len(g_ref)} tensors)")
    print("advantages of the shared completions (per group):",
          [[round(a, 3) for a in row] for row in advantages.view(PROMPTS, G).tolist()])
    return 0 if worst_seen < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
