"""Per-layer sparsity allocation: pure math, tensors in and out.

Two statistics say how much a block can take, and one rule turns either into sparsities.

OWL (Yin et al., "Outlier Weighed Layerwise Sparsity", ICML 2024, arXiv 2310.05175, Sec. 3) gives
layers with more *outlier* weights less sparsity. A weight's importance is Wanda's score
``S_ij = |W_ij| · ‖X_j‖`` (``‖X_j‖`` the norm of input column ``j`` over the calibration tokens);
the layer outlier ratio ``D_l`` is the share of its scores above ``M`` times the mean score (all of
the layer's modules together). The ratios are scaled to a range of ``2λ`` and turned into keep
ratios, more kept where ``D_l`` is larger, whose mean is ``1 - s``.

The error rule (``allocation="error"``) uses, instead of outliers, the share of the Wanda score
mass that pruning at the target would remove: for each module, with rows as Wanda's comparison
groups, ``e = Σ_i Σ_{j pruned in row i} S_ij² / Σ S_ij²`` (the relative layer error under a diagonal
``H``); a block's ``e`` is its modules' parameter-weighted mean. Blocks that lose more of their
mass at the target are pruned less.

OWL takes the plain mean over layers (all of LLaMA's layers are the same size); here the mean is
weighted by each layer's parameter count, so the pruned fraction of all target weights is exactly
the target ``s``, and the allocation stays inside ``[0, max_sparsity]`` by moving the shift, not by
clipping (which would break the mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rose_hf.masks import count_for


def outlier_ratio(scores: Sequence[torch.Tensor], M: float) -> float:
    """Share of the entries of all ``scores`` above ``M`` times their common mean (OWL's ``D_l``).

    Example: scores ``[1, 1, 1, 1, 16]`` have mean 4; with ``M = 3`` one entry of five exceeds 12: 0.2.
    """
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
    return float((flat > M * flat.mean()).double().mean())


def pruned_share(scores: Sequence[torch.Tensor], sparsity: float) -> float:
    """The parameter-weighted mean over ``scores`` (one ``(rows, cols)`` tensor per module) of the
    share of ``Σ S²`` that the ``count_for(sparsity, cols)`` smallest scores of each row hold.

    Example: one module ``[[1, 2], [3, 4]]`` at 0.5 prunes 1 and 3: ``(1 + 9) / 30 = 1/3``.
    """
    total, weights = 0.0, 0
    for S in scores:
        squares = S.to(torch.float64).pow(2)
        k = count_for(sparsity, squares.shape[1])
        smallest = squares.sort(dim=1).values[:, :k].sum()
        total += float(smallest / squares.sum().clamp_min(torch.finfo(torch.float64).tiny)) * squares.numel()
        weights += squares.numel()
    return total / max(weights, 1)


def allocate_sparsities(
    importance: torch.Tensor, sizes: torch.Tensor, target: float, lam: float, max_sparsity: float = 0.99
) -> torch.Tensor:
    """Per-layer sparsity from a per-layer statistic (OWL's outlier ratio, or the error rule's
    pruned share), with parameter-weighted mean exactly ``target``.

    Args:
        importance: ``(L,)`` the statistic ``D_l``; larger means pruned less.
        sizes: ``(L,)`` parameter counts of each layer's target modules (the mean's weights).
        target: The sparsity of all target weights together, in ``[0, max_sparsity]``.
        lam: Half the spread: before the shift, layer sparsities span ``[target - lam, target + lam]``.
        max_sparsity: No layer is pruned more than this.

    Returns:
        ``(L,)`` float64 sparsities; the layer with the largest statistic gets the least.
    """
    D = importance.to(torch.float64)
    w = sizes.to(torch.float64) / sizes.to(torch.float64).sum()
    spread = D.max() - D.min()
    density = (D - D.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(D)
    base = 1.0 - density  # sparsity before the shift, up to a constant
    # The shift c with sum_l w_l * clamp(base_l + c) = target: monotone in c, so bisect.
    lo, hi = -2.0, 2.0
    for _ in range(200):
        c = (lo + hi) / 2
        if float((w * (base + c).clamp(0.0, max_sparsity)).sum()) < target:
            lo = c
        else:
            hi = c
    return (base + (lo + hi) / 2).clamp(0.0, max_sparsity)
