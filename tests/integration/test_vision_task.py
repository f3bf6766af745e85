"""The built-in vision task `colors` (pictures drawn by the program) and its shipped starter
vision-language model: the data, the reward, the colour-blind teacher of the starter, and GRPO
from the command line (`grpokit train task=colors`) improving the held-out greedy accuracy."""

import json
import os
import random

import pytest
import torch

from grpokit.data import get_task
from grpokit.data.vision_tasks import COLORS, PARTNER, SHAPES, answered_color, color_reward, draw_shape
from grpokit.models import starter_model_path

pytestmark = pytest.mark.vision


def test_the_pictures_hold_one_shape_of_the_answer_colour():
    rng = random.Random(0)
    for color in COLORS:
        for shape in SHAPES:
            image = draw_shape(color, shape, rng)
            assert image.size == (56, 56) and image.mode == "RGB"
            pixels = list(image.getdata())
            assert COLORS[color] in pixels  # the shape, in exactly its colour
            corner = pixels[0]  # a grey background (the shape never covers the whole picture)
            assert corner[0] == corner[1] == corner[2] or COLORS[color] == corner
    task = get_task("colors", seed=1, num_train=40, num_eval=8)
    assert task.train_dataset.column_names == ["prompt", "image", "answer", "shape", "picture"]
    assert set(task.train_dataset["answer"]) <= set(COLORS) and len(task.eval_dataset) == 8
    row = task.train_dataset[3]
    assert COLORS[row["answer"]] in list(row["image"].getdata())
    # the same seed gives the same pictures; eval and train pictures are different streams
    again = get_task("colors", seed=1, num_train=40, num_eval=8)
    assert again.train_dataset[3]["image"].tobytes() == row["image"].tobytes()
    assert task.eval_dataset[0]["image"].tobytes() != task.train_dataset[0]["image"].tobytes()


def test_the_reward_reads_one_colour_word():
    answers = ["red", "blue", "green", "yellow", "red"]
    completions = [[{"role": "assistant", "content": c}] for c in ("red", " Blue.", "green tea", "", "yellow")]
    assert color_reward(None, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert answered_color("Red.") == "red" and answered_color("it is red") is None
    with pytest.raises(ValueError, match="column 'answer'"):
        color_reward(None, completions)


def test_the_colour_blind_teacher_swaps_partners_at_its_rate():
    task = get_task("colors", seed=0, num_train=400, num_eval=8, reference_swap_rate=0.5)
    rows = [dict(r) for r in task.train_dataset.remove_columns(["image"])]
    refs = [task.reference_completion(r) for r in rows]
    swapped = sum(ref == PARTNER[r["answer"]] for ref, r in zip(refs, rows))
    assert all(ref in (r["answer"], PARTNER[r["answer"]]) for ref, r in zip(refs, rows))
    assert 160 < swapped < 240
    exact = get_task("colors", seed=0, num_train=20, num_eval=8)
    assert all(exact.reference_completion(dict(r)) == r["answer"] for r in exact.train_dataset)


def test_the_starter_is_a_vision_language_model_with_its_processor():
    from grpokit.data.vision import load_processor
    from grpokit.models import load_model

    path = starter_model_path("colors")
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    processor = load_processor(path)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    # one token per colour word: the answer is one decision, then the end of the turn
    for color in COLORS:
        assert len(processor.tokenizer(color, add_special_tokens=False)["input_ids"]) == 1
    meta = json.loads(open(os.path.join(path, "starter_config.json")).read())
    assert meta["reference_swap_rate"] == 0.5 and 0.4 < meta["held_out_after"]["accuracy"] < 0.65


@pytest.mark.train
def test_grpo_on_the_colors_task_from_the_command_line(tmp_path, capsys):
    """`grpokit train task=colors` on the shipped starter: 60 steps (about 10 s here) lift the
    held-out greedy accuracy (the starter mixes up the partner colours about half the time)."""
    from grpokit.cli import main

    out = tmp_path / "colors"
    assert main(["train", "task=colors", "max_steps=60", "eval_steps=60", f"output_dir={out}", "report_to=[]",
                 "plot=false", "disable_tqdm=true", "save_strategy=no"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert len(evals) == 2 and evals[0] < 0.6, evals
    assert evals[-1] >= evals[0] + 0.1, evals
    capsys.readouterr()
    # `grpokit eval` of the trained model: its processor puts the pictures in the prompts
    assert main(["eval", f"model_name_or_path={out / 'final'}", "task=colors", "task_num_eval=16", "n=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 16 and 0.0 <= result["eval/accuracy"] <= 1.0


@pytest.mark.train
@pytest.mark.parametrize("log_multimodal", [True, False])
def test_the_latest_steps_samples_keep_their_pictures(tmp_path, log_multimodal):
    """trainer._logs (TRL's record of the latest generation batch) holds each completion's prompt,
    rewards, advantage and, with log_multimodal (TRL's default), its pictures."""
    from PIL import Image

    from grpokit import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "run"), task="colors", task_num_train=8, task_num_eval=4, max_steps=1,
                      per_device_train_batch_size=8, num_generations=4, max_completion_length=4, save_strategy="no",
                      report_to=[], use_cpu=True, disable_tqdm=True, plot=False, log_multimodal=log_multimodal)
    trainer = GRPOTrainer(model=starter_model_path("colors"), args=args)
    assert trainer._logs["prompt"] == []
    trainer.train()
    logs = trainer._logs
    assert len(logs["prompt"]) == len(logs["completion"]) == len(logs["advantages"]) == 8
    assert list(logs["rewards"]) == ["color_reward"] and len(logs["rewards"]["color_reward"]) == 8
    if log_multimodal:
        assert len(logs["images"]) == 8 and all(len(x) == 1 and isinstance(x[0], Image.Image) for x in logs["images"])
    else:
        assert logs["images"] == []
