"""Shared fixtures: small random problems and tiny models built from configs (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _private_hub_cache(tmp_path_factory, monkeypatch):
    """Every test downloads into its own Hub cache: none reads another's files (the fake Hub's
    commits repeat between tests) and the user's ~/.cache/huggingface is never touched."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))


def correlated_problem(rows: int, cols: int, tokens: int, seed: int, columnar: bool = False):
    """``(W, X, H)`` with correlated inputs; ``columnar`` makes the last 16 inputs dominate."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, cols, generator=g)
    A = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols**0.5
    X = Z @ A
    if columnar:
        X[:, -16:] *= 8.0
    H = 2.0 / tokens * X.T @ X
    W = torch.randn(rows, cols, generator=g)
    return W, X, H


@pytest.fixture
def problem():
    return correlated_problem(24, 40, 256, seed=0)


TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights that matter least. "
    "Sparse models keep most of their accuracy when the right weights are removed. "
) * 40


def save_tiny_checkpoint(folder, arch: str = "llama"):
    """A tiny model of ``arch`` plus a byte-level BPE tokenizer trained on ``TEXT``, saved to ``folder``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from zoo import build

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    model = build(arch)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "base")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    return folder, text
