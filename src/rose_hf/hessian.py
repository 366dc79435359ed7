"""Accumulate ``H = 2/N X^T X`` (and the dense objective's cross term) from rows of layer inputs.

Pure tensor math; the hooks that feed it live in ``rose_hf.collector``. Accumulation is float32 on
the device of the rows given (CUDA when the block is there). Only the upper triangle of ``X^T X``
is computed, in panels of ``GRAM_PANEL`` rows (``gram_update``), and mirrored once at the end
(``symmetrize``): about a third fewer flops than a full product.
"""

from __future__ import annotations

import torch

GRAM_PANEL = 128


def gram_update(total: torch.Tensor, X: torch.Tensor) -> None:
    """Add ``X^T X`` to ``total`` in place, on and above the diagonal only.

    Row panels of ``GRAM_PANEL``: ``total[a:b, a:] += X[:, a:b]^T X[:, a:]``. Below the diagonal,
    only the panels' diagonal blocks are filled; ``symmetrize`` reads the upper triangle alone.
    """
    cols = X.shape[1]
    for start in range(0, cols, GRAM_PANEL):
        stop = min(start + GRAM_PANEL, cols)
        total[start:stop, start:].addmm_(X[:, start:stop].T, X[:, start:])


def symmetrize(upper: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale`` times the symmetric matrix with ``upper``'s upper triangle (a new tensor)."""
    strict = upper.triu(1)
    full = strict + strict.T
    del strict
    torch.diagonal(full).copy_(torch.diagonal(upper))
    return full.mul_(scale)


class GramSum:
    """Running ``X^T X`` (upper triangle) of one layer input and the number of token rows in it.

    ``update(X)`` with ``X: (tokens, cols)`` float32; ``hessian()`` gives ``2/N X^T X``. An optional
    cross term ``X^T (X_d - X)`` (``update(X, X_dense)``) is kept beside it for the dense objective:
    exactly zero where the two inputs agree, and free of the cancellation that subtracting two large
    ``X^T X``-sized sums would suffer.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.count = 0

    def update(self, X: torch.Tensor, X_dense: torch.Tensor | None = None) -> None:
        """Add the rows of ``X`` (and, with ``X_dense`` of the same shape, the cross term)."""
        if self.total is None:
            self.total = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
        gram_update(self.total, X)
        self.count += X.shape[0]
        if X_dense is not None:
            if self.cross is None:
                self.cross = torch.zeros_like(self.total)
            self.cross.addmm_(X.T, X_dense - X)

    def hessian(self) -> torch.Tensor | None:
        """``2/N X^T X`` as a new symmetric tensor, or ``None`` before any token."""
        if self.total is None or self.count == 0:
            return None
        return symmetrize(self.total, 2.0 / self.count)

    def cross_term(self) -> torch.Tensor | None:
        """``2/N X^T (X_d - X)``, or ``None`` without a dense reference."""
        if self.cross is None or self.count == 0:
            return None
        return self.cross * (2.0 / self.count)
