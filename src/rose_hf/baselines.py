"""Baselines that only choose a mask and never update weights: magnitude and Wanda.

Pure tensor math, same conventions as ``rose_hf.sparsegpt``: ``W`` is ``(rows, cols)``, inputs are
never modified, the result is float32 with a bool ``mask`` (``True`` = pruned).
"""

from __future__ import annotations

import torch

from rose_hf.masks import nm_mask, smallest_mask


def input_norms(H: torch.Tensor) -> torch.Tensor:
    """Per-input-feature activation norm ``||X_j||`` up to a constant, from ``diag(H)``.

    ``H = 2/N X^T X`` weights every calibration token equally, so ``sqrt(H_jj)`` is
    ``sqrt(2/N) * ||X_j||_2``: the constant drops out of every comparison made with it.
    """
    return torch.sqrt(torch.clamp(torch.diagonal(H.detach().to(torch.float32)), min=0.0))


def magnitude_prune(W: torch.Tensor, sparsity: float, *, n: int = 0, m: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the smallest ``|W|`` over the whole matrix (or per ``N:M`` group).

    Returns:
        ``(weight, mask)``, both ``(rows, cols)``.
    """
    Wf = W.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    mask = nm_mask(Wf.abs(), n, m) if m else smallest_mask(Wf.abs(), sparsity)
    Wf[mask] = 0.0
    return Wf, mask


def wanda_prune(
    W: torch.Tensor, H: torch.Tensor, sparsity: float, *, n: int = 0, m: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda (Sun et al., 2024): zero the smallest ``|W_ij| * ||X_j||`` within each output row.

    Args:
        W: ``(rows, cols)`` weights.
        H: ``(cols, cols)`` Hessian; only its diagonal is read.

    Returns:
        ``(weight, mask)``, both ``(rows, cols)``.
    """
    Wf = W.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    scores = Wf.abs() * input_norms(H).unsqueeze(0)
    mask = nm_mask(scores, n, m) if m else smallest_mask(scores, sparsity, per_row=True)
    Wf[mask] = 0.0
    return Wf, mask
