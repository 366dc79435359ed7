"""Pure mask selection: which entries of a score matrix to prune.

Every function returns a boolean tensor, ``True`` where a weight is pruned, and never modifies the
input. Ties go to the lower index, so the same scores give the same mask on every device.
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
        return smallest_k(scores, count_for(fraction, scores.shape[1]))
    flat = scores.reshape(1, -1)
    return smallest_k(flat, count_for(fraction, flat.shape[1])).reshape(scores.shape)


def smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mark the ``k`` smallest entries of each row of a 2-D ``scores``; ties go to the lower index.

    A k-th value threshold instead of ``torch.topk``: the same set up to ties, several times faster
    on CPU at the sizes SparseGPT selects from (docs/performance.md measures it), and tie-breaking
    that does not depend on the sort kernel. NaN scores count as the largest.

    Example: ``smallest_k(tensor([[2., 1., 1., 3.]]), 2)`` marks both ``1.``.
    """
    cols = scores.shape[1]
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    values = torch.nan_to_num(scores, nan=torch.inf)
    threshold = torch.kthvalue(values, k, dim=1, keepdim=True).values
    mask = values < threshold
    short = k - mask.sum(dim=1, keepdim=True)  # entries equal to the threshold still to take
    ties = values == threshold
    if bool((ties.sum(dim=1, keepdim=True) == short).all()):
        mask |= ties  # every tie is taken (the usual case: the k-th value is unique)
    else:
        mask |= ties & (torch.cumsum(ties, dim=1) <= short)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mark the ``m - n`` smallest of every ``m`` consecutive entries in each row (keep ``n``).

    Each entry's rank in its group is the number of entries before it in (score, index) order, so
    ties go to the lower index and NaN scores count as the largest, on every device (``torch.topk``
    promises neither). The ``m``-by-``m`` comparison per group is cheap for the small ``M`` of
    hardware patterns.

    Args:
        scores: ``(rows, cols)`` saliencies with ``cols % m == 0``.

    Example (2:4): ``[[4, 1, 3, 2]]`` -> ``[[False, True, False, True]]``; ``[[1, 1, 1, 1]]`` ->
    ``[[True, True, False, False]]``.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} columns cannot be split into groups of M={m}.")
    groups = torch.nan_to_num(scores, nan=torch.inf).reshape(rows, cols // m, m)
    entry, other = groups.unsqueeze(3), groups.unsqueeze(2)  # compare entry i with every entry j
    index = torch.arange(m, device=scores.device)
    lower = index.view(1, 1, 1, m) < index.view(1, 1, m, 1)  # j < i
    before = (other < entry) | ((other == entry) & lower)
    rank = before.sum(dim=3)
    return (rank < m - n).reshape(rows, cols)
