"""Shared fixtures: a character-level tokenizer and a tiny seeded model (see tests/helpers.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `from tests.helpers import ...` works

from tests.helpers import make_char_tokenizer, make_tiny_model  # noqa: E402


@pytest.fixture
def tiny_tokenizer():
    """Character-level tokenizer, left padding, no chat template."""
    return make_char_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A ~30k-parameter Qwen2-shaped model for `tiny_tokenizer`, float32, eval mode, seed 0."""
    return make_tiny_model(tiny_tokenizer, arch="qwen2")
