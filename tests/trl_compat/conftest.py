"""TRL's own GRPO trainer tests, run against grpokit offline (see README.md in this folder).

- `trl_standin_hub` (package scope, autouse): builds the stand-in models and datasets once
  (standins/), points huggingface_hub / datasets / transformers at them in offline mode while the
  tests of this folder run, and restores the environment, the module constants and the
  multiprocessing start method afterwards, so nothing leaks into the other test folders.
- `MARKS`: the one table of what does not pass on grpokit yet, applied at collection. A key is a
  node id relative to this folder (`file::Class::test[params]`), or `file::Class::test` for every
  parametrization, or `file::Class` for a whole class. The `xfail` entries are strict: once a
  fix lands, the test xpasses, which fails the run, and its entry must be removed.
- `GRPOKIT_TRL_COMPAT_MARKS=0` leaves the table out (every test runs unmarked).
- `GRPOKIT_TRL_COMPAT_IMPL=trl` leaves the table out too, to check the stand-ins against TRL itself
  with a copy of the test file whose import line is switched back to `trl` (see README.md); on a
  CPU-only machine it also defaults TRL's `bf16` to False, which TRL 1.16 sets to True and
  transformers 5 then refuses ("Your setup doesn't support bf16/gpu").
- the tiers (pyproject.toml): every test of this folder is marked `trl`, those of TRL's file that
  train `train` (tests.helpers.item_trains: TRL's file stays as it is upstream), those on the
  vision-language stand-ins ("VLM" or "multimodal" in the name) `vision`.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest

from .standins import hub_cache

try:
    from tests.helpers import item_trains
except ImportError:  # this folder copied alone, to check the stand-ins against TRL (README.md)
    def item_trains(item) -> bool:
        return False

IMPL = os.environ.get("GRPOKIT_TRL_COMPAT_IMPL", "grpokit")
# GRPOKIT_TRL_COMPAT_MARKS=0 runs every test unmarked (to see what a skip hides, or to re-check the table)
APPLY_MARKS = IMPL != "trl" and os.environ.get("GRPOKIT_TRL_COMPAT_MARKS", "1") != "0"
HERE = os.path.dirname(os.path.abspath(__file__))

G = "test_grpo_trainer.py::TestGRPOTrainer::"
LIGER = ("GRPOConfig refuses use_liger_kernel=True (TRL accepts it, checks the PEFT adapter for lm_head / "
         "prompt learning, and only then needs liger-kernel)")
# key -> ("skip" | "xfail", reason)
MARKS: dict[str, tuple[str, str]] = {
    # --- TRL internals: private helpers/attributes, mocks of TRL's methods, TRL's exact wording ---
    "test_grpo_trainer.py::TestGRPORolloutDispatch": (
        "skip", "builds the trainer with object.__new__(GRPOTrainer), sets TRL's attributes and calls its private "
                "_generate (rollout_func dispatch)"),
    G + "test_entropy_bonus_flows_gradients": (
        "skip", "calls TRL's private _get_per_token_logps_and_entropies and toggles _entropy_bonus_enabled"),
    G + "test_prepare_input_called_with_correct_data": (
        "skip", "wraps transformers' Trainer.training_step (grpokit has none) and checks its 48 calls' inputs; grpokit "
                "also refuses per_device_train_batch_size*gradient_accumulation_steps=18 with num_generations=4"),
    G + "test_train_with_mask_truncated_completions": (
        "skip", "mocks transformers' GenerationMixin.generate, which grpokit's engine never calls (it has its own "
                "decode loop)"),
    G + "test_warning_raised_all_rewards_none": (
        "skip", "expects TRL's wording 'All reward functions returned None for the following kwargs:' (grpokit warns "
                "'every reward function returned None for every completion of this step' in its log)"),
    # --- fails on grpokit today (strict xfail: remove the entry when it passes) ---
    G + "test_train_with_iterable_dataset": (
        "xfail", "GRPOConfig has no accelerator_config (the test asserts args.accelerator_config.dispatch_batches is "
                 "False for an IterableDataset)"),
    G + "test_iterable_dataset_requires_dispatch_batches_false": (
        "xfail", "GRPOConfig refuses accelerator_config={'dispatch_batches': True} (TRL takes it; GRPOTrainer then "
                 "raises 'Iterable datasets require `dispatch_batches=False`')"),
    G + "test_iterable_eval_keeps_map_style_train_workers": (
        "xfail", "the trainer has no get_train_dataloader() / get_eval_dataloader()"),
    G + "test_liger_kernel_with_peft_lm_head_raises": ("xfail", LIGER),
    G + "test_liger_kernel_with_peft_non_lm_head_target_allowed": ("xfail", LIGER),
    G + "test_liger_kernel_with_peft_modules_to_save_lm_head_allowed": ("xfail", LIGER),
    G + "test_liger_kernel_with_peft_prompt_learning_raises": ("xfail", LIGER),
}


def _marks_for(rel_nodeid: str):
    key = rel_nodeid
    if key in MARKS:
        return MARKS[key]
    base = key.split("[", 1)[0]
    if base in MARKS:
        return MARKS[base]
    cls = "::".join(base.split("::")[:2])
    return MARKS.get(cls)


def _rel(item) -> str | None:
    path = str(item.path)
    if not path.startswith(HERE + os.sep):
        return None
    return os.path.relpath(path, HERE).replace(os.sep, "/") + "::" + item.nodeid.split("::", 1)[1]


_SKIPPED = pytest.StashKey[set]()


def _is_vision(nodeid: str) -> bool:
    return "VLM" in nodeid or "multimodal" in nodeid


def pytest_configure(config):
    # the tiers applied below, declared here too for a copy of this folder run without pyproject.toml
    for line in ("trl: TRL's own tests and the checks on its stand-ins (tests/trl_compat)",
                 "train: runs optimizer steps", "vision: vision-language models"):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(session, config, items):
    used = set()
    skipped = config.stash.setdefault(_SKIPPED, set())
    for item in items:
        rel = _rel(item)
        if rel is None:
            continue
        item.add_marker(pytest.mark.trl)
        if rel.startswith("test_grpo_trainer.py::"):  # TRL's file, unchanged: its tiers are set here
            if item_trains(item):
                item.add_marker(pytest.mark.train)
            if _is_vision(item.nodeid):
                item.add_marker(pytest.mark.vision)
        mark = _marks_for(rel) if APPLY_MARKS else None
        if mark is not None:
            for key in (rel, rel.split("[", 1)[0], "::".join(rel.split("[", 1)[0].split("::")[:2])):
                if key in MARKS:
                    used.add(key)
                    break
            kind, reason = mark
            if kind == "skip":  # first, so that its reason wins over a require_* skipif
                item.add_marker(pytest.mark.skipif(True, reason=reason), append=False)
                skipped.add(item.nodeid)
                continue
            item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
    # A stale entry (a test renamed upstream, a typo) must not hide silently: when the whole folder
    # is collected without selection, every entry must name a collected test.
    selected = config.getoption("keyword") or config.getoption("markexpr") or any("::" in a for a in config.args)
    files = {rel.split("::", 1)[0] for rel in map(_rel, items) if rel}
    if APPLY_MARKS and not selected and files:
        stale = sorted(key for key in set(MARKS) - used if key.split("::", 1)[0] in files)
        if stale:
            raise pytest.UsageError(f"tests/trl_compat/conftest.py MARKS names tests that were not collected: {stale}")


def _needs_image_datasets(session) -> bool:
    """Whether a test that will run (not deselected, not skipped by MARKS) reads zen-image."""
    skipped = session.config.stash.get(_SKIPPED, set())
    return any(_is_vision(item.nodeid) and item.nodeid not in skipped
               for item in session.items if _rel(item))


@pytest.fixture(scope="package", autouse=True)
def trl_standin_hub(request, tmp_path_factory):
    """The stand-in hub cache, offline, for the tests of this folder only."""
    # a TRL test forces the "spawn" start method; building the datasets fixes the default context
    start_method = multiprocessing.get_start_method(allow_none=True)
    root = tmp_path_factory.mktemp("trl_compat_hub")
    paths = hub_cache.build(root, image_datasets=_needs_image_datasets(request.session))
    with hub_cache.offline(paths):
        yield paths
    if multiprocessing.get_start_method(allow_none=True) != start_method:
        multiprocessing.set_start_method(start_method, force=True)


if IMPL == "trl":  # only when checking the stand-ins against TRL (see the module docstring)
    import torch

    if not torch.cuda.is_available():
        import trl.trainer.base_config as _trl_base_config

        _trl_post_init = _trl_base_config._BaseConfig.__post_init__

        def _post_init_bf16_off_on_cpu(self):
            if self.bf16 is None and not self.fp16:
                self.bf16 = False
            _trl_post_init(self)

        _trl_base_config._BaseConfig.__post_init__ = _post_init_bf16_off_on_cpu
