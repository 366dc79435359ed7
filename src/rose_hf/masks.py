"""Pure mask selection: which entries of a score matrix to prune.

Both functions return a boolean tensor, ``True`` where a weight is pruned, and never modify the
input. Ties are broken by ``torch.topk``'s deterministic order, so the same scores give the same mask.
"""

from __future__ import annotations

import torch


def count_for(fraction: float, total: int) -> int:
    """Number of entries to prune: ``fraction * total`` rounded half up (so 0.5 of 5 is 3)."""
    return min(total, int(fraction * total + 0.5))


def smallest_mask(scores: torch.Tensor, fraction: float, per_row: bool = False) -> torch.Tensor:
    """Mark the ``fraction`` smallest entries of ``scores``.

    Args:
        scores: ``(rows, cols)`` saliencies; smaller means cheaper to prune.
        fraction: Share of entries to mark, in ``[0, 1]``.
        per_row: Select within each row (Wanda's comparison group) instead of over the whole matrix.

    Returns:
        ``(rows, cols)`` bool mask with exactly ``count_for(fraction, n)`` ``True`` entries per
        selection group (``n`` = ``cols`` per row, or ``rows * cols`` for the whole matrix).

    Example: ``smallest_mask(tensor([[3., 1.], [2., 4.]]), 0.5)`` marks ``1.`` and ``2.``.
    """
    if per_row:
        k = count_for(fraction, scores.shape[1])
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False).indices
            mask.scatter_(1, idx, True)
        return mask
    flat = scores.reshape(-1)
    k = count_for(fraction, flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        mask[torch.topk(flat, k, largest=False).indices] = True
    return mask.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mark the ``m - n`` smallest of every ``m`` consecutive entries in each row (keep ``n``).

    Args:
        scores: ``(rows, cols)`` saliencies with ``cols % m == 0``.

    Example (2:4): ``[[4, 1, 3, 2]]`` -> ``[[False, True, False, True]]``.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} columns cannot be split into groups of M={m}.")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)
