"""What the test folders share: tiny models, tokenizers and processors made in the test (never
downloaded), the pieces several test modules use, and the scan behind the `train` marker rule.
A test module imports from here (or takes a fixture of tests/conftest.py), never from another test
module (tests/unit/test_hygiene.py checks it).

    from tests.helpers import make_char_tokenizer, make_tiny_model
    tok = make_char_tokenizer()                       # ~100 tokens, one per character
    model = make_tiny_model(tok, arch="qwen2")       # ~30k params, float32, seeded, eval mode

`make_tiny_model` is the one builder of tiny causal LMs; `make_tiny_llama` (the end-to-end runs'
model and tokenizer) and `make_bench_tiny_model` (the benchmarks' tiny shape) are settings of it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

import torch

from grpokit.models import new_char_tokenizer, new_model_from_config

ROOT = Path(__file__).resolve().parents[1]

# A minimal ChatML-like template for tests of the conversational format.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

# ---------------------------------------------------------------------------------------- builders

# make_tiny_model's size arguments -> the config field of each layout (GPT-2's names, everyone else's)
_GPT2_FIELDS = {"hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head", "max_positions": "n_positions"}
_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
           "max_positions": "max_position_embeddings"}


def make_char_tokenizer(chat_template: str | None = None, padding_side: str = "left"):
    """The character-level tokenizer (pad=0, bos=1, eos=2, unk=3); pass CHAT_TEMPLATE for chat tests."""
    tokenizer = new_char_tokenizer(chat_template=chat_template)
    tokenizer.padding_side = padding_side
    return tokenizer


def make_tiny_model(
    tokenizer=None,
    arch: str = "qwen2",
    *,
    hidden_size: int | None = 32,
    num_layers: int | None = 2,
    num_heads: int | None = 4,
    num_kv_heads: int | None = 2,
    intermediate_size: int | None = 64,
    max_positions: int | None = 128,
    seed: int | None = 0,
    eval_mode: bool = True,
    **config_overrides,
):
    """A freshly initialised tiny causal LM, float32, seeded (`grpokit.models.new_model_from_config`).

    - `arch`: any causal-LM `model_type` of transformers ("qwen2", "llama", "gpt2", "qwen3_moe", ...).
    - the sizes go to the config's fields (`num_layers` -> `num_hidden_layers`, GPT-2: `n_layer`, ...);
      a size given as None is left to the config class's default; GPT-2 has no `num_kv_heads` nor
      `intermediate_size` (its MLP is 4 x hidden), they are ignored there.
    - `config_overrides`: any other config field, by its own name (it wins over the sizes).
    - `tokenizer`: gives `vocab_size` and the pad/bos/eos ids (of the config and the generation
      config) unless overridden; without one, pass `vocab_size`.
    - `eval_mode=False` leaves the model in the mode its constructor leaves it (training).
    Same arguments, same model: the numbers depend on nothing else.
    """
    fields = _GPT2_FIELDS if arch == "gpt2" else _FIELDS
    sizes = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 intermediate_size=intermediate_size, max_positions=max_positions)
    config = {"model_type": arch}
    config.update({fields[k]: v for k, v in sizes.items() if k in fields and v is not None})
    config.update(config_overrides)
    model = new_model_from_config(config, tokenizer, seed=seed)
    return model.eval() if eval_mode else model


def make_tiny_llama(seed: int = 0, chat_template: str | None = None, **config_overrides):
    """`(model, tokenizer)` of the end-to-end runs: a ~27k-parameter Llama (4 key-value heads, 64
    positions, training mode) for the character tokenizer (left padding)."""
    tokenizer = make_char_tokenizer(chat_template=chat_template)
    model = make_tiny_model(tokenizer, arch="llama", num_kv_heads=4, max_positions=64, seed=seed, eval_mode=False,
                            **config_overrides)
    return model, tokenizer


def make_tiny_vlm(family: str, seed: int = 0):
    """`(processor, model)`: a tiny vision-language model of `family` ("qwen2_vl", "llava") built
    here (`grpokit.models.new_vision_processor` / `new_vision_model`)."""
    from grpokit.models import new_vision_model, new_vision_processor

    processor = new_vision_processor(family)
    return processor, new_vision_model(processor, family, seed=seed)


@functools.lru_cache(maxsize=None)
def bench_models():
    """benchmarks/_models.py, loaded once: the benchmarks' tokenizer (`build_tokenizer`: pad/eos/bos =
    0/1/2, characters, filler words), `make_eos_likely`, `EOS`, and the model shapes `SIZES`."""
    spec = importlib.util.spec_from_file_location("grpokit_bench_models", ROOT / "benchmarks" / "_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_bench_tiny_model(tokenizer, arch: str = "qwen2", seed: int = 0):
    """The benchmarks' "tiny" shape (`bench_models().SIZES["tiny"]`: hidden 64, 2 layers, tied
    embeddings, 4096 positions, GPT-2 2048) for the benchmarks' tokenizer, eval mode: the model of
    `benchmarks/_models.build_model("tiny", arch, seed)`, built by `make_tiny_model`."""
    size = bench_models().SIZES["tiny"]
    if len(tokenizer) != size["vocab_size"]:
        raise ValueError(f"the tiny shape has {size['vocab_size']} ids, the tokenizer {len(tokenizer)}")
    return make_tiny_model(tokenizer, arch, hidden_size=size["hidden_size"], num_layers=size["num_hidden_layers"],
                           num_heads=size["num_attention_heads"], num_kv_heads=size["num_key_value_heads"],
                           intermediate_size=size["intermediate_size"],
                           max_positions=2048 if arch == "gpt2" else 4096,
                           tie_word_embeddings=size["tie_word_embeddings"], seed=seed)


# ------------------------------------------------------------------------------ rewards and data

def digit_first(prompts, completions, completion_ids=None, **kw):
    """1 when the completion starts with a digit: a random char-level model does it ~10% of the time."""
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def prompts_ds(n=32):
    """`n` prompts "q0:", "q1:", ... with their index in an `idx` column."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"q{i}:" for i in range(n)], "idx": list(range(n))})


def random_rollout(g=4, n_prompts=3, seed=0, vocab=100, max_prompt=12, max_completion=9, empty_row=None):
    """n_prompts groups of g rows; prompt and completion lengths random (completions >= 1 token)."""
    from grpokit.trajectory import Trajectories

    gen = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(4, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),), generator=gen).tolist()

    prompts, comps = [], []
    for _ in range(n_prompts):
        p = ids(1, max_prompt)
        for _ in range(g):
            prompts.append(p)
            comps.append(ids(1, max_completion))
    if empty_row is not None:
        comps[empty_row] = []
    n = len(prompts)
    return Trajectories(row_index=[i // g for i in range(n)], prompts=[None] * n, completions=[None] * n,
                        prompt_ids=prompts, completion_ids=comps, sampling_logps=[[0.0] * len(c) for c in comps],
                        truncated=torch.zeros(n, dtype=torch.bool))


def tiny_trainer(tmp_path, reward=None, model=None, peft_config=None, prefix="", forward_plan=None, **over):
    """A GRPOTrainer on a tiny Qwen2 (64 positions), 16 prompts "q<i>:" + "x" * (i % 5), reward
    len(completion) unless given; `over`: GRPOConfig fields."""
    from datasets import Dataset

    from grpokit import GRPOConfig, GRPOTrainer

    tok = make_char_tokenizer()
    model = model or make_tiny_model(tok, arch="qwen2", max_positions=64)
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                gradient_accumulation_steps=2, num_generations=4, max_completion_length=6, learning_rate=1e-2,
                logging_steps=100, save_strategy="no", use_cpu=True, disable_tqdm=True, plot=False, seed=3,
                log_completions=False)
    ds = Dataset.from_dict({"prompt": [prefix + f"q{i}:" + "x" * (i % 5) for i in range(16)]})
    reward = reward or (lambda prompts, completions, **kw: [float(len(c)) for c in completions])
    return GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**{**base, **over}), train_dataset=ds,
                       processing_class=tok, peft_config=peft_config, forward_plan=forward_plan)


# ------------------------------------------------------------------ vision: the models' own forward

def picture(seed: int, size=(56, 56)):
    """A random RGB PIL image, the same for the same seed."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy())


def reference_logprobs(model, traj, temperature):
    """The model's own forward, one row at a time, with the row's pixel values (as TRL runs it)."""
    out = []
    for p, c, v in zip(traj.prompt_ids, traj.completion_ids, traj.images):
        ids = torch.tensor([p + c])
        kw = {}
        if v is not None:
            kw.update(v.tensors)
            for key, t in v.token_tensors.items():
                kw[key] = torch.cat([t, torch.zeros((1, len(c)), dtype=t.dtype)], dim=1)
        logits = model(input_ids=ids, **kw).logits[0, len(p) - 1:-1] / temperature
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0])
    return out


def weighted(logps_rows):
    return sum((lp * torch.linspace(0.5, 1.5, lp.numel())).sum() for lp in logps_rows)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_matches_reference(model, traj, ref, ref_grads, *, temperature, packed, features, pad_id, atol=2e-5):
    """grpokit's training forward of `traj` (one micro-batch) gives the reference logprobs `ref`
    (per row) and, through the same weighted sum, the reference gradients of every parameter."""
    from grpokit.core.batch import make_micro_batches
    from grpokit.core.forward import completion_logprobs

    model.zero_grad(set_to_none=True)
    (mb,) = make_micro_batches(traj, len(traj), pad_id=pad_id, device="cpu", mask_truncated=False)
    logps, _ = completion_logprobs(model, mb, temperature=temperature, packed=packed, image_features=features)
    rows = [logps[b, :len(c)] for b, c in enumerate(traj.completion_ids)]
    for got, want in zip(rows, ref):
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
    weighted(rows).backward()
    got_grads = grads(model)
    assert set(got_grads) == set(ref_grads), (packed, set(got_grads) ^ set(ref_grads))
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=atol, rtol=1e-3, msg=lambda m, k=name: f"{k}: {m}")


# ------------------------------------------------------------------- the `train` marker rule (scan)

# Functions that run optimizer steps when called (besides `<trainer>.train(...)` and `<optimizer>.step()`).
TRAINING_CALLS = frozenset({"run_sft"})


def _receiver_name(func: ast.Attribute) -> str:
    value = func.value
    return value.attr if isinstance(value, ast.Attribute) else value.id if isinstance(value, ast.Name) else ""


def _calls_train(node: ast.Call) -> bool:
    """A call that trains: `<trainer>.train(...)` (not `model.train()` / `.train(False)` / `.train(mode=...)`,
    which set a module's mode), `<optimizer>.step()`, or one of TRAINING_CALLS."""
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in TRAINING_CALLS
    if not isinstance(func, ast.Attribute):
        return False
    name = _receiver_name(func).lower()
    if func.attr in TRAINING_CALLS or (func.attr == "step" and "optim" in name):
        return True
    if func.attr != "train" or node.args or any(k.arg == "mode" for k in node.keywords):
        return False
    return "model" not in name


def training_functions(source: str) -> set[str]:
    """Qualified names ("f", "Class.method") of the functions of a test module that train: they call
    a trainer's `.train(...)`, an optimizer's `.step()` or `run_sft(...)` (`_calls_train`), or (by name,
    `self.` included) a function of the same module that does. Nested functions count for the function
    that holds them. The command line's `train` (main([...]), a subprocess) is not seen: mark those by hand."""
    tree = ast.parse(source)
    bodies: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            bodies[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    bodies[f"{node.name}.{sub.name}"] = sub
    direct, callees = set(), {}
    for qualname, node in bodies.items():
        calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
        if any(_calls_train(c) for c in calls):
            direct.add(qualname)
        cls = qualname.rpartition(".")[0]
        names = set()
        for c in calls:
            if isinstance(c.func, ast.Name):
                names.add(c.func.id)
            elif isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name) and c.func.value.id in (
                    "self", "cls") and cls:
                names.add(f"{cls}.{c.func.attr}")
        callees[qualname] = names & set(bodies)
    trains = set(direct)
    changed = True
    while changed:
        changed = False
        for qualname, names in callees.items():
            if qualname not in trains and names & trains:
                trains.add(qualname)
                changed = True
    return trains


@functools.lru_cache(maxsize=None)
def training_functions_of(path: str) -> frozenset[str]:
    return frozenset(training_functions(Path(path).read_text()))


def instrument(obj, **attrs) -> None:
    """Replace attributes of a frozen record (a run's parts) in a test, to count or capture
    calls: `instrument(trainer.parts, train_forward=counted)`. The run stays the same object."""
    for name, value in attrs.items():
        object.__setattr__(obj, name, value)


def item_trains(item) -> bool:
    """Whether a collected test trains: its function does (`training_functions`), or a fixture of its
    own module that it uses."""
    if not hasattr(item, "originalname") or not str(item.path).endswith(".py"):
        return False
    names = training_functions_of(str(item.path))
    qualname = f"{item.cls.__name__}.{item.originalname}" if item.cls is not None else item.originalname
    return qualname in names or any(name in names for name in item.fixturenames)


def code_reward_or_skip(**kwargs):
    """A CodeReward on this machine's local sandbox, or the test skipped when the sandbox refuses
    to run here (as it should where it cannot isolate)."""
    import pytest

    from grpokit.rewards.code import CodeReward
    from grpokit.rewards.sandbox import SandboxUnavailable

    try:
        return CodeReward(**kwargs)
    except SandboxUnavailable as e:
        pytest.skip(f"no local sandbox on this machine (it refused to run, as it should): {e}")


def tiny_grpo_trainer(tmp_path, reward_funcs, **cfg_kw):
    """A GRPOTrainer on the tiny model and character tokenizer: 8 prompts "q0:".."q7:", 2 steps of
    2 prompts x G=4, 6 tokens each, logging every step into tmp_path/run (cfg_kw override)."""
    from datasets import Dataset

    from grpokit import GRPOConfig, GRPOTrainer

    tok = make_char_tokenizer()
    data = Dataset.from_dict({"prompt": [f"q{i}:" for i in range(8)]})
    cfg = GRPOConfig(**{**dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                               gradient_accumulation_steps=1, num_generations=4, max_completion_length=6,
                               use_cpu=True, disable_tqdm=True, plot=False, save_strategy="no", logging_steps=1),
                        **cfg_kw})
    return GRPOTrainer(model=make_tiny_model(tok), reward_funcs=reward_funcs, args=cfg, processing_class=tok,
                       train_dataset=data)


def save_tiny_classifier(path, words, chat_template=None, seed: int = 0, max_positions: int = 128) -> str:
    """A tiny Qwen2 sequence classifier (one label) with a byte-level BPE tokenizer trained on
    `words` (the kind Qwen2's tokenizer class rebuilds from vocab + merges; pad [PAD], eos [EOS]),
    saved to `path` -> the path as a string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(words)] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[EOS]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      num_labels=1, pad_token_id=tok.token_to_id("[PAD]"))
    Qwen2ForSequenceClassification(cfg).save_pretrained(path)
    hf_tok.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------ multi-turn rollouts by rule
# (tests/unit/test_multiturn_kv.py, tests/unit/test_draft_decoding.py)

TURN_VOCAB = 256
TURN_PROMPTS = [[5, 40, 77, 100, 3, 9, 31], [60, 61], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
TURN_END = set(range(20, 45))  # "end of turn" ids: about 10% of the vocabulary, so turns end after a few tokens


class ScriptedDriver:
    """Tool results by rule: a turn that ends on a TURN_END id gets 1-4 result tokens (depending on the
    sample and the turn) and goes on, for at most `turns` turns; the budget is respected as the
    TurnDriver does (a result that leaves no room ends the sample)."""

    def __init__(self, n_samples, prompts_of, max_tokens, turns=3):
        self.max_tokens, self.turns = max_tokens, turns
        self.prompt = prompts_of
        self.ids = [[] for _ in range(n_samples)]
        self.logps = [[] for _ in range(n_samples)]
        self.model_tokens = [[] for _ in range(n_samples)]
        self.n_turns = [0] * n_samples
        self.pending = {}

    def remaining(self, s):
        return self.max_tokens - len(self.ids[s])

    def context_ids(self, s):
        return self.prompt[s] + self.ids[s]

    def turn_ended(self, s, ids, logps, reason):
        self.ids[s] += ids
        self.logps[s] += logps
        self.model_tokens[s].append(list(ids))
        self.n_turns[s] += 1
        if reason == "stop" and self.n_turns[s] < self.turns:
            self.pending[s] = [100 + (s * 7 + self.n_turns[s] * 3 + j) % 50 for j in range(1 + (s + self.n_turns[s]) % 4)]

    def continuations(self):
        out = {}
        for s, ext in sorted(self.pending.items()):
            if len(self.ids[s]) + len(ext) < self.max_tokens:
                self.ids[s] += ext
                self.logps[s] += [0.0] * len(ext)
                out[s] = ext
        self.pending = {}
        return out


def reencoded_turns(model, prompts, n, params, max_tokens, turns):
    """Each sample alone, the whole sequence re-encoded for every token."""
    from grpokit.rollout.sampling import row_keys, row_uniforms, sample

    samples = [p for p in prompts for _ in range(n)]
    driver = ScriptedDriver(len(samples), samples, max_tokens, turns)
    uniforms = row_uniforms(row_keys(params.seed, torch.arange(len(samples))), max_tokens)
    with torch.no_grad():
        for s in range(len(samples)):
            while True:
                turn, lps = [], []
                room = driver.remaining(s)
                reason = "length"
                while len(turn) < room:
                    seq = driver.context_ids(s) + turn
                    logits = model(input_ids=torch.tensor([seq])).logits[:, -1, :].float()
                    tok, lp = sample(logits, params, uniforms[s:s + 1, len(driver.ids[s]) + len(turn)])
                    turn.append(int(tok[0]))
                    lps.append(float(lp[0]))
                    if turn[-1] in TURN_END:
                        reason = "stop"
                        break
                driver.turn_ended(s, turn, lps, reason)
                if s not in driver.continuations():
                    break
    return driver


def engine_turns(model, tok, prompts, n, params, max_tokens, turns, **engine_kw):
    """The same conversations through HFEngine.generate_multiturn (KV kept across turns)."""
    from grpokit.envs import run_turns
    from grpokit.rollout import HFEngine

    engine = HFEngine(model, tok, **engine_kw)
    engine.eos_ids = set(TURN_END)
    samples = [p for p in prompts for _ in range(n)]
    driver = ScriptedDriver(len(samples), samples, max_tokens, turns)
    run_turns(engine, prompts, n, params, driver)
    return driver, engine
