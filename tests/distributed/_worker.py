"""Run under torchrun by test_distributed.py: `_worker.py OUT JOB [JOB ...]`, a JOB being
`scenario:strategy` (train MAX_STEPS steps into OUT/scenario-strategy) or
`scenario:strategy:resume` (resume OUT/scenario-strategy/checkpoint-SAVE_STEPS on these ranks, into
OUT/scenario-strategy-resume). Rank 0 writes metrics.jsonl, checkpoints and final/."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_common import SAVE_STEPS, config, model_for, prompts_ds, reward_for  # noqa: E402

from grpokit import GRPOTrainer, distributed  # noqa: E402


def main(out, jobs):
    for job in jobs:
        t0 = time.perf_counter()
        scenario, strategy, *resume = job.split(":")
        name = f"{scenario}-{strategy}"
        model, tok = model_for(scenario)
        cfg = config(os.path.join(out, name + ("-resume" if resume else "")), scenario,
                     world=int(os.environ["WORLD_SIZE"]), strategy=strategy)
        trainer = GRPOTrainer(model=model, reward_funcs=reward_for(scenario), args=cfg, train_dataset=prompts_ds(),
                              processing_class=tok)
        trainer.train(resume_from_checkpoint=os.path.join(out, name, f"checkpoint-{SAVE_STEPS}") if resume else None)
        print(f"[rank {trainer.parts.comm.rank}] {job}: {time.perf_counter() - t0:.1f} s", flush=True)
        del trainer, model  # DDP/FSDP2 wrappers hold the process group: free them before it goes
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
