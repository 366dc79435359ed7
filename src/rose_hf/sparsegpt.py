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


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``. A finite sum proves it in one reduction; only a sum that is not
    finite (a NaN, an inf, or a sum of finite values that overflowed) needs the elementwise check."""
    return bool(torch.isfinite(t.sum()).item()) or bool(torch.isfinite(t).all().item())


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
    if not all_finite(H):
        raise HessianError(
            "the Hessian holds NaN or inf: the module's calibration inputs were not finite (a NaN or inf "
            "weight in an earlier module, or activations beyond the model's dtype, such as float16's range). "
            "Check the weights, or run the model in float32 or bfloat16."
        )
    cols = H.shape[0]
    dead = torch.diagonal(H) == 0
    # With J the column reversal, chol(J H J) = L gives H = R R^T for the upper triangular R = J L J,
    # so H^-1 = R^-T R^-1 and U = R^-1: one Cholesky and one triangular solve, instead of a Cholesky,
    # an explicit inverse and a second Cholesky (half the flops).
    # Only the reversed copy is modified, and at most two (cols, cols) matrices besides the caller's
    # are alive at once (the solve writes into its right-hand side): this bounds streaming mode's
    # peak memory.
    flipped = H.detach().to(torch.float32).flip(0, 1)
    diag = torch.diagonal(flipped)
    diag[dead.flip(0)] = 1.0
    base = percdamp * torch.mean(diag).item()
    del diag  # a view: it would keep ``flipped`` alive after the Cholesky
    scale, added = 1.0, 0.0
    for _ in range(MAX_DAMPING_TRIES):
        torch.diagonal(flipped).add_(base * scale - added)
        added = base * scale
        L, info = torch.linalg.cholesky_ex(flipped)
        if info.item() == 0:
            del flipped
            R = L.flip(0, 1)
            del L
            # The identity in column-major layout, LAPACK's own, is solved in place (bitwise the
            # same as letting torch allocate the result).
            U = torch.eye(cols, dtype=R.dtype, device=R.device).T
            torch.linalg.solve_triangular(R, U, upper=True, out=U)
            del R
            if all_finite(U):
                return U, dead, scale
            raise HessianError(
                f"the inverse Hessian ({cols} columns) is not finite: the calibration activations "
                "are out of float32 range. Check the calibration inputs, or use a larger percdamp such as 0.1."
            )
        del L
        scale *= 10.0
    raise HessianError(
        f"the Hessian ({cols} columns) is not positive definite even with percdamp="
        f"{percdamp * scale / 10:g}. Use more calibration samples (at least as many tokens as "
        "columns), or a larger percdamp such as 0.1."
    )


def inverse_hessian(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The dampened ``H⁻¹`` itself, ``Uᵀ U`` from ``inverse_hessian_factor`` (same dampening and retries)."""
    U, _, _ = inverse_hessian_factor(H, percdamp)
    return U.T @ U


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

    Wp, Hp = W.detach().to(torch.float32), H.detach().to(torch.float32)
    if perm is not None:
        Wp, Hp = apply_order(Wp, Hp, perm)
    # The factor first: its temporaries are the largest, and nothing else is allocated yet.
    U, dead, damp_scale = inverse_hessian_factor(Hp, percdamp)
    # Work on a transposed copy (processing order x rows): a column of W is then a contiguous row,
    # and the column loop below touches contiguous memory only.
    WT = Wp.T.clone(memory_format=torch.contiguous_format)
    del Wp
    WT[dead] = 0.0
    # The dense weights and the ordered Hessian are kept only to track the error; otherwise the
    # Hessian copy is dropped here, before the column loop.
    W0T, H0 = (WT.clone(), Hp) if track_error else (None, None)
    del Hp
    block_errors: list[float] = []
    maskT = torch.zeros_like(WT, dtype=torch.bool)
    obs_loss = torch.zeros(rows, dtype=torch.float32, device=WT.device)
    step = _inner_step(m)
    i1 = 0
    for width in blocks:
        i2 = i1 + width
        W1 = WT[i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1).unsqueeze(1)
        mask1 = maskT[i1:i2]
        if not m:
            # Adaptive mask selection (SparseGPT Sec. 3.3) over the whole block at once.
            mask1.copy_(smallest_mask(W1**2 / d**2, sparsity))
        # err = (w - q) / d with q = w where kept, 0 where pruned: err = w * factor, factor = mask / d.
        # The rank-1 OBS update then leaves exactly q in the column (pruned entries are zeroed below).
        factor = mask1.to(W1.dtype) / d
        Err1 = torch.empty_like(W1)
        w_rows, f_rows, e_rows, u_rows = W1.unbind(0), factor.unbind(0), Err1.unbind(0), U1.unbind(0)
        for s1 in range(0, width, step):
            s2 = min(s1 + step, width)
            for i in range(s1, s2):
                if m and i % m == 0:
                    group = W1[i : i + m] ** 2 / d[i : i + m] ** 2
                    mask1[i : i + m] = nm_mask(group.T, n, m).T
                    factor[i : i + m] = mask1[i : i + m].to(W1.dtype) / d[i : i + m]
                err = torch.mul(w_rows[i], f_rows[i], out=e_rows[i])
                W1[i:s2].addr_(u_rows[i][i:s2], err, alpha=-1.0)
            # The same lazy update one level down: the rest of the block in one matmul.
            W1[s2:].sub_(U1[s1:s2, s2:].T @ Err1[s1:s2])
        W1[mask1] = 0.0
        obs_loss += (Err1**2).sum(dim=0) / 2
        WT[i2:].sub_(U[i1:i2, i2:].T @ Err1)
        if W0T is not None and H0 is not None:
            D = W0T - WT
            block_errors.append(float(((H0 @ D) * D).sum().item()) / 2)
        i1 = i2

    # Pruned entries are exactly zero; dead inputs count as pruned only where the mask says so.
    WT[maskT] = 0.0
    weight, mask = WT.T, maskT.T
    if perm is not None:
        weight, mask = undo_order(weight, perm), undo_order(mask, perm)
    return PruneResult(
        weight.contiguous(), mask.contiguous(), float(obs_loss.sum().item()), damp_scale, tuple(block_errors)
    )


def dense_target_weights(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Dense weights that map the pruned model's inputs to the dense model's outputs.

    With ``X`` the layer inputs in the partly pruned model and ``X_d`` the dense model's inputs for
    the same tokens, ``||X_d W^T - X W_hat^T||^2 = ||X (W* - W_hat)^T||^2 + const`` for
    ``W* = W + W C^T H^-1`` (``H = 2/N X^T X``, ``C = 2/N X^T (X_d - X)``): pruning ``W*`` with
    SparseGPT on ``H`` minimises the error against the dense model instead of against the layer's
    own dense output. ``H`` is dampened as in ``inverse_hessian_factor``, so the dampening only
    shrinks the correction: where the inputs agree (``C = 0``, e.g. in the first block) the result
    is exactly ``W``.

    Args:
        W: ``(rows, cols)`` dense weights.
        H: ``(cols, cols)`` Hessian of the pruned model's inputs.
        C: ``(cols, cols)`` cross term ``2/N X^T (X_d - X)`` (``HessianCollector.crosses``).
        percdamp: Dampening as a fraction of ``mean(diag(H))``.

    Returns:
        ``(rows, cols)`` float32 weights in ``W``'s layout.
    """
    Hd = H.detach().to(torch.float32).clone()
    diag = torch.diagonal(Hd)
    diag[diag == 0] = 1.0
    diag.add_(percdamp * torch.mean(diag).item())
    Wf = W.detach().to(torch.float32)
    rhs = C.detach().to(torch.float32) @ Wf.T
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
