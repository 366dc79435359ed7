"""SparseGPT (Frantar & Alistarh, 2023) for one weight matrix, with an optional column order.

Pure tensor math: inputs are never modified, nothing is printed, nothing is CUDA-only.

Objective (SparseGPT Sec. 3): find a mask and new weights ``W_hat`` minimising
``||W X^T - W_hat X^T||^2`` given ``H = 2/N * X^T X``. Columns are visited in order; pruning a
weight leaves an error ``(w - q) / [U]_jj`` that the Optimal Brain Surgeon update pushes onto the
columns not yet visited, where ``U`` is the upper Cholesky factor of ``H^-1``::

    columns in processing order ->
    | done (frozen) | current block (lazy, column by column) | later blocks (one matmul per block) |

ROSE changes only *which* order the columns are visited in: pass ``perm`` (a permutation of the
columns) and ``blocks`` (block sizes in that order); the result is mapped back to the caller's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rose_hf.masks import nm_mask, smallest_mask

MAX_DAMPING_TRIES = 6
INNER_STEP = 16


class HessianError(RuntimeError):
    """The Hessian could not be inverted, even after raising the dampening."""


@dataclass(frozen=True)
class PruneResult:
    """What pruning one matrix produced.

    Attributes:
        weight: ``(rows, cols)`` pruned and updated weights, float32, in the caller's column order.
        mask: ``(rows, cols)`` bool, ``True`` where a weight was pruned.
        obs_loss: SparseGPT's accumulated OBS loss ``sum (w - q)^2 / (2 U_jj^2)``.
        damp_scale: The factor the base dampening had to be multiplied by for a stable inverse
            (1.0 unless the Hessian was ill-conditioned).
        block_errors: With ``track_error=True``, the layer output error ``tr(D H D^T) / 2`` of the
            partially pruned matrix after each block (``D`` = original minus current weights), in
            processing order: how the error grows as pruning proceeds. Empty otherwise.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    obs_loss: float
    damp_scale: float
    block_errors: tuple[float, ...] = ()


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of the dampened ``H^-1`` (so ``H^-1 = U^T U``).

    Dead inputs (``H_jj == 0``: the input feature was always zero) get ``H_jj = 1`` so the matrix stays
    invertible; their weights are irrelevant to the output and the caller zeroes them.
    A failed factorisation retries with ten times the dampening, up to ``MAX_DAMPING_TRIES`` times,
    then raises ``HessianError`` with advice. No silent fallback.

    Args:
        H: ``(cols, cols)`` symmetric positive semi-definite Hessian.
        percdamp: Dampening as a fraction of ``mean(diag(H))``.

    Returns:
        ``(U, dead, damp_scale)``: ``U`` is ``(cols, cols)`` float32 upper triangular, ``dead`` a
        ``(cols,)`` bool tensor, ``damp_scale`` the multiplier of ``percdamp`` that succeeded.
    """
    H = H.detach().to(torch.float32).clone()
    if not torch.isfinite(H).all():
        raise HessianError(
            "the Hessian holds NaN or inf; the calibration activations overflowed. Run the model in "
            "float32 or bfloat16 (not float16) or check the calibration inputs."
        )
    diag = torch.diagonal(H)
    dead = diag == 0
    H[dead, dead] = 1.0
    base = percdamp * torch.mean(torch.diagonal(H)).item()
    scale, added = 1.0, 0.0
    # In place on the working copy (no identity matrix, no H + damp temporary): at most three
    # (cols, cols) matrices are alive at once, which bounds streaming mode's peak memory.
    for _ in range(MAX_DAMPING_TRIES):
        torch.diagonal(H).add_(base * scale - added)
        added = base * scale
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0 and torch.isfinite(U).all():
                return U, dead, scale
        scale *= 10.0
    raise HessianError(
        f"the Hessian ({H.shape[0]} columns) is not positive definite even with percdamp="
        f"{percdamp * scale / 10:g}. Use more calibration samples (at least as many tokens as "
        "columns), or a larger percdamp such as 0.1."
    )


def _inner_step(m: int) -> int:
    """Columns updated one by one before a matmul updates the rest of the block.

    Pure speed (2x on CPU at 16 columns): the result is the same up to float rounding. A multiple of
    ``m`` so an N:M group never straddles two steps.
    """
    return INNER_STEP if not m or INNER_STEP % m == 0 else m * -(-INNER_STEP // m)


def default_blocks(cols: int, blocksize: int) -> tuple[int, ...]:
    """Block sizes covering ``cols`` columns left to right; the last block may be shorter."""
    full, rest = divmod(cols, blocksize)
    return (blocksize,) * full + ((rest,) if rest else ())


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``invperm`` with ``x[:, perm][:, invperm] == x``."""
    return torch.argsort(perm)


def apply_order(W: torch.Tensor, H: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute the columns of ``W`` and both axes of ``H`` into processing order (copies)."""
    return W[:, perm], H[perm][:, perm]


def undo_order(W: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Map columns of ``W`` in processing order back to the original order (a copy)."""
    return W[:, invert_permutation(perm)]


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    *,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    perm: torch.Tensor | None = None,
    blocks: tuple[int, ...] | None = None,
    track_error: bool = False,
) -> PruneResult:
    """Prune ``W`` with SparseGPT, visiting columns in the order ``perm`` (default left to right).

    Args:
        W: ``(rows, cols)`` weights, output features by input features (``nn.Linear`` layout).
        H: ``(cols, cols)`` Hessian ``2/N X^T X`` of the layer input.
        sparsity: Fraction to prune (unstructured: chosen per block from ``w^2 / U_jj^2``, exactly
            ``round(sparsity * rows * block_cols)`` per block). Ignored when ``m > 0``.
        n, m: ``N:M`` pattern (keep ``n`` of every ``m`` consecutive columns), or ``0, 0``.
        blocksize: Block width when ``blocks`` is not given.
        percdamp: Dampening, see ``inverse_hessian_factor``.
        perm: ``(cols,)`` processing order; ``perm[k]`` is the original column visited k-th.
            For ``N:M`` it must keep every aligned group of ``m`` columns contiguous and aligned.
        blocks: Block sizes in processing order (sum ``cols``); required to keep ROSE's blocks
            intact when a short last block is moved. Defaults to ``default_blocks(cols, blocksize)``.
        track_error: Record ``PruneResult.block_errors`` (one extra ``(rows, cols) @ (cols, cols)``
            product per block; for analysis, off by default).

    Returns:
        A ``PruneResult`` in the caller's column order; ``W`` and ``H`` are left untouched.
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({cols}, {cols}) for W {tuple(W.shape)}.")
    if m and cols % m:
        raise ValueError(f"{cols} input columns are not a multiple of M={m}; use unstructured pruning.")
    blocks = default_blocks(cols, blocksize) if blocks is None else tuple(blocks)
    if sum(blocks) != cols or min(blocks) <= 0:
        raise ValueError(f"blocks {blocks} must be positive sizes summing to {cols}.")
    if m and any(b % m for b in blocks):
        raise ValueError(f"blocks {blocks} must be multiples of M={m}.")

    Wp = W.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    Hp = H.detach().to(torch.float32)
    if perm is not None:
        Wp, Hp = apply_order(Wp, Hp, perm)
    U, dead, damp_scale = inverse_hessian_factor(Hp, percdamp)
    Wp[:, dead] = 0.0
    # The dense weights and the ordered Hessian are kept only to track the error; otherwise the
    # Hessian copy is dropped here, before the column loop.
    W0, H0 = (Wp.clone(), Hp) if track_error else (None, None)
    del Hp
    block_errors: list[float] = []
    mask = torch.zeros_like(Wp, dtype=torch.bool)
    obs_loss = torch.zeros(rows, dtype=torch.float32, device=Wp.device)
    i1 = 0
    for width in blocks:
        i2 = i1 + width
        W1 = Wp[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not m:
            # Adaptive mask selection (SparseGPT Sec. 3.3) over the whole block at once.
            mask1 = smallest_mask(W1**2 / d.unsqueeze(0) ** 2, sparsity)
        keep = (~mask1).to(W1.dtype) if not m else torch.ones_like(W1)
        dinv = 1.0 / d
        step = _inner_step(m)
        for s1 in range(0, width, step):
            s2 = min(s1 + step, width)
            for i in range(s1, s2):
                if m and i % m == 0:
                    group = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                    mask1[:, i : i + m] = nm_mask(group, n, m)
                    keep[:, i : i + m] = (~mask1[:, i : i + m]).to(W1.dtype)
                # err = (w - q) / d with q = w where kept, 0 where pruned; the rank-1 OBS update then
                # leaves exactly q in column i (pruned entries are set to exact zeros below).
                err = W1[:, i] * (1.0 - keep[:, i]) * dinv[i]
                W1[:, i:s2].addr_(err, U1[i, i:s2], alpha=-1.0)
                Err1[:, i] = err
            # The same lazy update one level down: the rest of the block in one matmul.
            W1[:, s2:].sub_(Err1[:, s1:s2] @ U1[s1:s2, s2:])
        W1[mask1] = 0.0
        obs_loss += (Err1**2).sum(dim=1) / 2
        Wp[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        Wp[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
        if W0 is not None and H0 is not None:
            D = W0 - Wp
            block_errors.append(float(((D @ H0) * D).sum().item()) / 2)
        i1 = i2

    # Pruned entries are exactly zero; dead inputs count as pruned only where the mask says so.
    Wp[mask] = 0.0
    if perm is not None:
        Wp, mask = undo_order(Wp, perm), undo_order(mask, perm)
    return PruneResult(Wp, mask, float(obs_loss.sum().item()), damp_scale, tuple(block_errors))


def dense_target_weights(W: torch.Tensor, H: torch.Tensor, G: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Dense weights that map the pruned model's inputs to the dense model's outputs.

    With ``X`` the layer inputs in the partly pruned model and ``X_d`` the dense model's inputs for
    the same tokens, ``||X_d W^T - X W_hat^T||^2 = ||X (W* - W_hat)^T||^2 + const`` for
    ``W* = W G^T H^-1`` (``H = 2/N X^T X``, ``G = 2/N X^T X_d``): pruning ``W*`` with SparseGPT on ``H``
    minimises the error against the dense model instead of against the layer's own dense output.
    Computed as the correction ``W* = W + W (G - H)^T H^-1`` with ``H`` dampened as in
    ``inverse_hessian_factor``, so the dampening only shrinks the correction: where the inputs agree
    (``X_d = X``, e.g. in the first block) the result is exactly ``W``.

    Args:
        W: ``(rows, cols)`` dense weights.
        H: ``(cols, cols)`` Hessian of the pruned model's inputs.
        G: ``(cols, cols)`` cross term ``2/N X^T X_d``.
        percdamp: Dampening as a fraction of ``mean(diag(H))``.

    Returns:
        ``(rows, cols)`` float32 weights in ``W``'s layout.
    """
    Hd = H.detach().to(torch.float32).clone()
    diag = torch.diagonal(Hd)
    diag[diag == 0] = 1.0
    diag.add_(percdamp * torch.mean(diag).item())
    Wf = W.detach().to(torch.float32)
    rhs = (G.detach().to(torch.float32) - H.detach().to(torch.float32)) @ Wf.T
    return Wf + torch.linalg.solve(Hd, rhs).T


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """Layer output error ``||(W - W_hat) X^T||^2 / N`` and the same relative to ``||W X^T||^2 / N``.

    With ``H = 2/N X^T X`` this is ``tr(D H D^T) / 2`` for ``D = W - W_hat``: no activations needed.

    Returns:
        ``(absolute, relative)``; ``relative`` is 0 when the dense output is identically zero.
    """
    Hf = H.detach().to(torch.float32)
    Wf = W.detach().to(torch.float32)
    D = Wf - W_hat.detach().to(torch.float32)
    absolute = float(((D @ Hf) * D).sum().item()) / 2
    dense = float(((Wf @ Hf) * Wf).sum().item()) / 2
    return absolute, (absolute / dense if dense > 0 else 0.0)
