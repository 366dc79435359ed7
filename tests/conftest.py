"""Shared fixtures: small random problems and tiny models built from configs (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


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
