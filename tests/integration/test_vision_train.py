"""End to end with images: GRPOTrainer on tiny vision-language models built in the test (Qwen2-VL,
LLaVA), a dataset with an `images` / `image` column (PIL images, file paths, rows without an image),
rewards that read the image column; clear errors before step 1."""

import pytest
import torch
from datasets import Dataset
from PIL import Image

from grpokit import GRPOConfig, GRPOTrainer
from tests.helpers import make_char_tokenizer, make_tiny_model, make_tiny_vlm

pytestmark = pytest.mark.vision


def colour(rgb):
    return Image.new("RGB", (56, 56), rgb)


def config(tmp_path, **over):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                num_generations=4, max_completion_length=4, learning_rate=5e-2, logging_steps=1,
                save_strategy="no", use_cpu=True, disable_tqdm=True, plot=False, seed=1, report_to=[])
    return GRPOConfig(**{**base, **over})


def saved_vlm(tmp_path, family):
    processor, model = make_tiny_vlm(family, seed=0)
    path = tmp_path / f"tiny-{family}"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.mark.train
@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_train_on_images_by_model_path(tmp_path, family):
    path = tmp_path / "red.png"
    colour((255, 0, 0)).save(path)
    images = [[colour((0, 0, 255))], [str(path)], [], [colour((0, 255, 0)), colour((9, 9, 9))]]
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "colour?"}]] * 4, "images": images})
    seen = []

    def reward(completions, images, **kw):
        seen.extend(len(x) if x else 0 for x in images)
        return [float(len(c[0]["content"])) for c in completions]

    model_path = saved_vlm(tmp_path, family)
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward, args=config(tmp_path, max_steps=4, shuffle_dataset=False),
                          train_dataset=ds)
    assert type(trainer.processing_class).__name__.endswith("Processor")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert any("visual" in n or "vision_tower" in n for n in changed)  # full fine-tuning trains the tower (TRL)
    assert seen == [1] * 4 + [1] * 4 + [0] * 4 + [2] * 4  # every row once, in order, with its own images


def test_text_model_given_images_is_an_error_before_step_1(tmp_path):
    tok = make_char_tokenizer()
    model = make_tiny_model(tok)
    ds = Dataset.from_dict({"prompt": ["a", "b"], "image": [colour((1, 2, 3)), None]})
    with pytest.raises(ValueError, match=r"the dataset has images \(column image\), but .* is a text-only model"):
        GRPOTrainer(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                    args=config(tmp_path), train_dataset=ds, processing_class=tok)


def test_bad_image_and_long_prompt_are_errors_naming_the_row(tmp_path):
    model_path = saved_vlm(tmp_path, "qwen2_vl")
    fn = lambda completions, **k: [0.0] * len(completions)  # noqa: E731
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "x"}]] * 2,
                            "image": [colour((1, 2, 3)), str(tmp_path / "nope.png")]})
    with pytest.raises(ValueError, match=r"row 1.*: cannot open (the|its) image .*nope.png"):
        GRPOTrainer(model=model_path, reward_funcs=fn, args=config(tmp_path), train_dataset=ds)
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "x"}]], "image": [Image.new("RGB", (224, 224))]})
    with pytest.raises(ValueError, match=r"prompt of row 0 is \d+ tokens long \(\d+ of them for its 1 image\(s\)\), "
                                         r"over max_prompt_length=20"):
        GRPOTrainer(model=model_path, reward_funcs=fn, args=config(tmp_path, max_prompt_length=20), train_dataset=ds)


@pytest.mark.train
def test_lora_on_a_vlm_adapts_the_language_model_and_leaves_the_vision_tower_frozen(tmp_path):
    from grpokit.modeling.vision import vision_parameters, vision_tower_trained

    model_path = saved_vlm(tmp_path, "qwen2_vl")
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "colour?"}]] * 2,
                            "image": [colour((255, 0, 0)), colour((0, 0, 255))]})
    trainer = GRPOTrainer(model=model_path, reward_funcs=lambda completions, **k: [float(len(c[0]["content"]))
                                                                                  for c in completions],
                          args=config(tmp_path, use_peft=True, lora_target_modules="all-linear", max_steps=2),
                          train_dataset=ds)
    inner = trainer.model.get_base_model()
    lora = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert lora and all("language_model" in n and "lora_" in n for n in lora)
    assert not vision_tower_trained(inner) and vision_parameters(inner)
    trainer.train()
    assert trainer.parts.image_features.calls == 2  # frozen tower: once per prompt for the whole step


@pytest.mark.train
def test_freeze_vision_tower_in_full_fine_tuning(tmp_path):
    """freeze_vision_tower=True: full fine-tuning trains the language model only; the tower and
    projector do not move and their features are computed once per prompt for the step. On a text
    model the field is an error naming it."""
    from grpokit.modeling.vision import vision_parameters

    model_path = saved_vlm(tmp_path, "qwen2_vl")
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "colour?"}]] * 2,
                            "image": [colour((255, 0, 0)), colour((0, 0, 255))]})

    def reward(completions, **k):
        return [float(len(c[0]["content"])) for c in completions]

    trainer = GRPOTrainer(model=model_path, reward_funcs=reward, train_dataset=ds,
                          args=config(tmp_path, freeze_vision_tower=True, max_steps=2, learning_rate=1e-2))
    tower = {n: p.detach().clone() for n, p in vision_parameters(trainer.model)}
    text = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n not in tower}
    assert tower and "vision tower and projector frozen" in trainer.parts.summary()
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in tower.items())
    assert any(not torch.equal(params[n], v) for n, v in text.items())
    assert trainer.parts.image_features.calls == 2  # frozen: once per prompt for the whole step
    with pytest.raises(ValueError, match="freeze_vision_tower=True, but .* is not a vision-language model"):
        tok = make_char_tokenizer()
        GRPOTrainer(model=make_tiny_model(tok), reward_funcs=reward, processing_class=tok,
                    train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
                    args=config(tmp_path / "text", freeze_vision_tower=True))


def test_eval_set_with_images(tmp_path):
    model_path = saved_vlm(tmp_path, "llava")
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "colour?"}]] * 2,
                            "image": [colour((255, 0, 0)), None], "answer": ["red", "none"]})
    looked = []

    def reward(completions, image, answer, **kw):
        looked.extend(x is not None for x in image)
        return [float(c[0]["content"].strip() == a) for c, a in zip(completions, answer)]

    trainer = GRPOTrainer(model=model_path, reward_funcs=reward, args=config(tmp_path, max_steps=1),
                          train_dataset=ds, eval_dataset=ds)
    assert trainer.parts.evaluation.evaluator.prompts.vision[0] is not None and trainer.parts.evaluation.evaluator.prompts.vision[1] is None
    metrics = trainer.evaluate()
    assert any(k.startswith("eval") for k in metrics) and True in looked and False in looked


@pytest.mark.train
@pytest.mark.parametrize("algo", ["ppo", "dpo"])
def test_ppo_and_dpo_baselines_train_on_images(tmp_path, algo):
    from grpokit.baselines.dpo import DPOConfig, DPOTrainer
    from grpokit.baselines.ppo import PPOConfig, PPOTrainer

    model_path = saved_vlm(tmp_path, "qwen2_vl")
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "colour?"}]] * 2,
                            "image": [colour((255, 0, 0)), colour((0, 0, 255))]})
    cfg_cls, trainer_cls = (PPOConfig, PPOTrainer) if algo == "ppo" else (DPOConfig, DPOTrainer)
    fields = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=4, learning_rate=5e-2, logging_steps=1, save_strategy="no", use_cpu=True,
                  disable_tqdm=True, plot=False, seed=1, report_to=[])
    trainer = trainer_cls(model=model_path, args=cfg_cls(**fields), train_dataset=ds,
                          reward_funcs=lambda completions, **k: [float(len(c[0]["content"])) for c in completions])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


@pytest.mark.train
def test_a_vlm_trains_on_text_prompts_through_its_processor(tmp_path):
    model_path = saved_vlm(tmp_path, "qwen2_vl")
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "say something"}], [{"role": "user", "content": "hi"}]]})
    trainer = GRPOTrainer(model=model_path, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                          args=config(tmp_path, max_steps=1), train_dataset=ds)
    assert trainer.parts.train.vision is None
    trainer.train()
