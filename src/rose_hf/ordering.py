"""ROSE's column order (Su & Wang, CPAL 2026, Sec. 4): pre-prune, measure, gate, reorder.

Pure tensor math. The pipeline for one ``(rows, cols)`` weight ``W`` with Hessian ``H``::

    S = score(W, H)                          (rows, cols)   |W_ij| * ||X_j||  ("paper")
    pre-prune the smallest p % of S in each block of B columns (or N:M per group)
    column_loss[j] = sum of pruned S in column j                 (cols,)
    block_loss[b]  = sum of column_loss over block b             (ceil(cols / B),)
    gate: (max - min) / max of block_loss per column > threshold ?
    order: blocks by descending block_loss per column, columns inside a block by descending column_loss

Blocks are those of the original order, so a short last block stays one block wherever it lands.
The gate and the block order compare ``block_loss / block width``: with equal blocks this is the
paper's rule exactly, and it keeps a short last block (576 = 4 x 128 + 64 columns) from looking
"columnar" merely because it holds half as many columns.
For ``N:M`` the unit inside a block is the aligned group of ``M`` columns, never split, so the mask
is N:M in the original column order too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rose_hf.baselines import input_norms
from rose_hf.masks import count_for, nm_mask, smallest_k, smallest_mask
from rose_hf.sparsegpt import default_blocks, inverse_hessian_factor


@dataclass(frozen=True)
class ColumnOrder:
    """A processing order: ``perm[k]`` is the original column visited k-th; ``blocks`` its block sizes."""

    perm: torch.Tensor
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class RoseDecision:
    """The gate's verdict for one matrix.

    Attributes:
        order: The order to prune in, or ``None`` for SparseGPT's left to right.
        relative_range: ``(max - min) / max`` of the per-column block losses.
        column_loss: ``(cols,)`` pre-pruning loss per column.
        block_loss: ``(blocks,)`` pre-pruning loss per original block (a sum, as in the paper).
    """

    order: ColumnOrder | None
    relative_range: float
    column_loss: torch.Tensor
    block_loss: torch.Tensor


def prepruning_scores(W: torch.Tensor, H: torch.Tensor, score: str = "paper", percdamp: float = 0.01) -> torch.Tensor:
    """Importance of every weight for ROSE's pre-pruning, ``(rows, cols)``.

    ``"paper"``: ``|W_ij| * ||X_j||`` with ``||X_j||`` over *all* calibration tokens, each weighted
    equally (read from ``diag(H)``; the paper's code weights samples harmonically by accident).
    ``"obs"``: ``|W_ij| / sqrt([H^-1]_jj)``, the square root of the Optimal Brain Surgeon saliency,
    which accounts for correlated inputs that ``||X_j||`` ignores.
    """
    Wabs = W.detach().to(torch.float32).abs()
    if score == "paper":
        return Wabs * input_norms(H).unsqueeze(0)
    if score == "obs":
        U, dead, _ = inverse_hessian_factor(H, percdamp)
        hinv_diag = (U * U).sum(dim=0)  # diag(U^T U) = diag(H^-1)
        scores = Wabs / torch.sqrt(hinv_diag).unsqueeze(0)
        scores[:, dead] = 0.0
        return scores
    raise ValueError(f"score={score!r} is not one of ['paper', 'obs'].")


def prepruned_losses(
    S: torch.Tensor, sparsity: float, blocksize: int, *, n: int = 0, m: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and block losses of pre-pruning ``S`` block by block.

    Args:
        S: ``(rows, cols)`` scores.
        sparsity: Fraction pre-pruned in each block (unstructured); ignored for ``N:M``.
        blocksize: ``B``; the last block may be shorter.

    Returns:
        ``(column_loss (cols,), block_loss (nblocks,))``.

    Example: ``S = [[1, 5, 2, 8]]``, ``sparsity=0.5``, ``B=2`` prunes 1 and 2:
    ``column_loss = [1, 0, 2, 0]``, ``block_loss = [1, 2]``.
    """
    rows, cols = S.shape
    sizes = default_blocks(cols, blocksize)
    if m:
        column_loss = torch.cat([(part * nm_mask(part, n, m)).sum(dim=0) for part in S.split(sizes, dim=1)])
    else:
        column_loss = torch.zeros(cols, dtype=torch.float32, device=S.device)
        full = cols // blocksize * blocksize
        if full:
            # Every full block at once, one row each: the same selection as block by block (each
            # block flattened row-major), but one call that can use every thread.
            blocks = S[:, :full].reshape(rows, -1, blocksize).transpose(0, 1).reshape(-1, rows * blocksize)
            pruned = blocks * smallest_k(blocks, count_for(sparsity, rows * blocksize))
            column_loss[:full] = pruned.reshape(-1, rows, blocksize).sum(dim=1).reshape(-1)
        if full < cols:
            last = S[:, full:]
            column_loss[full:] = (last * smallest_mask(last, sparsity)).sum(dim=0)
    block_loss = torch.stack([part.sum() for part in column_loss.split(sizes)])
    return column_loss, block_loss


def per_column(block_loss: torch.Tensor, cols: int, blocksize: int) -> torch.Tensor:
    """Block losses divided by their block's width (only a short last block changes)."""
    widths = torch.tensor(default_blocks(cols, blocksize), dtype=block_loss.dtype, device=block_loss.device)
    return block_loss / widths


def relative_range(block_loss: torch.Tensor) -> float:
    """``(max - min) / max`` of the block losses; 0 when all are zero or there is one block."""
    top = float(block_loss.max().item())
    if top <= 0.0 or block_loss.numel() < 2:
        return 0.0
    return (top - float(block_loss.min().item())) / top


def _descending(values: torch.Tensor) -> torch.Tensor:
    # Stable, so equal losses keep their original left-to-right order (deterministic).
    return torch.sort(values, descending=True, stable=True).indices


def rose_order(column_loss: torch.Tensor, block_loss: torch.Tensor, blocksize: int, m: int = 0) -> ColumnOrder:
    """Blocks by descending ``block_loss``; inside each, columns (or aligned ``M``-groups, then
    their columns) by descending ``column_loss``.

    Example: losses ``[1, 0, 2, 0]``, block losses ``[1, 2]``, ``B=2`` give
    ``perm = [2, 3, 0, 1]``, ``blocks = (2, 2)``.
    """
    sizes = default_blocks(column_loss.numel(), blocksize)
    starts = [sum(sizes[:b]) for b in range(len(sizes))]
    pieces: list[torch.Tensor] = []
    for b in _descending(block_loss).tolist():
        start, width = starts[b], sizes[b]
        cols = column_loss[start : start + width]
        if m:
            groups = cols.reshape(-1, m)
            for g in _descending(groups.sum(dim=1)).tolist():
                inner = _descending(groups[g])
                pieces.append(start + g * m + inner)
        else:
            pieces.append(start + _descending(cols))
    perm = torch.cat(pieces).to(torch.long)
    blocks = tuple(sizes[b] for b in _descending(block_loss).tolist())
    return ColumnOrder(perm, blocks)


def rose_decision(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    blocksize: int,
    *,
    n: int = 0,
    m: int = 0,
    threshold: float = 0.5,
    mode: str = "auto",
    score: str = "paper",
    percdamp: float = 0.01,
) -> RoseDecision:
    """Run ROSE's pre-pruning and gate for one matrix and return the order to prune in.

    ``mode``: ``"auto"`` reorders when ``relative_range > threshold``; ``"always"``/``"never"``
    force the gate. The losses are returned either way for reporting. Gate and block order use
    the per-column block loss (``per_column``).
    """
    S = prepruning_scores(W, H, score, percdamp)
    column_loss, block_loss = prepruned_losses(S, sparsity, blocksize, n=n, m=m)
    block_mean = per_column(block_loss, S.shape[1], blocksize)
    rel = relative_range(block_mean)
    reorder = mode == "always" or (mode == "auto" and rel > threshold)
    order = rose_order(column_loss, block_mean, blocksize, m) if reorder else None
    return RoseDecision(order, rel, column_loss, block_loss)
