"""Shared fixtures (a character-level tokenizer, a tiny seeded model, one torch thread; the builders
are in tests/helpers.py) and the marker rule: a test that trains carries the `train` marker."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `from tests.helpers import ...` works

from tests.helpers import item_trains, make_char_tokenizer, make_tiny_model  # noqa: E402


@pytest.fixture
def tiny_tokenizer():
    """Character-level tokenizer, left padding, no chat template."""
    return make_char_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A ~30k-parameter Qwen2-shaped model for `tiny_tokenizer`, float32, eval mode, seed 0."""
    return make_tiny_model(tiny_tokenizer, arch="qwen2")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the tests of a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models run faster so (up to ~50x on a busy 2-core machine) and leave the other cores to other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.hookimpl(trylast=True)  # after the folders' own hooks (tests/trl_compat marks TRL's file)
def pytest_collection_modifyitems(config, items):
    """The marker rule: a test that trains carries the `train` marker (tests.helpers.item_trains finds
    the calls of a trainer's `.train()`, of `run_sft` and of an optimizer's `.step()`, also through a
    function or a fixture of the test's module), so that `-m "not train"` leaves no training out."""
    unmarked = [item.nodeid for item in items if item.get_closest_marker("train") is None and item_trains(item)]
    if unmarked:
        raise pytest.UsageError(
            f"{len(unmarked)} test(s) train but are not marked `train` (add `@pytest.mark.train`, or "
            "`pytestmark = pytest.mark.train` where every test of the module trains): " + ", ".join(unmarked[:20]))
