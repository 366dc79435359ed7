"""ADMM over the mask and the weights of one matrix, started from the pruner's own solution.

Pure tensor math: inputs are never modified, nothing is printed, nothing is CUDA-only.

The layer objective with a sparsity constraint (ALPS, Meng et al. 2024, arXiv 2406.07831, Sec. 3)::

    minimise  (B - W) H (B - W)^T   over B with B in the sparsity set (k kept weights, or N of M)

is split as ``B = D`` with ``D`` in the set, and solved by ADMM with penalty ``ρ`` and dual ``V``::

    B <- (W H - V + ρ D) (H + ρ I)^-1          (a ridge solve: one Cholesky factor per ρ)
    D <- project(B + V / ρ)                    (keep the k largest |.|, or N of every M)
    V <- V + ρ (B - D)

in the coordinates where ``diag(H) = 1`` (columns scaled by ``sqrt(H_jj)``, so ``project`` keeps
the largest ``|w| sqrt(H_jj)``). ``ρ`` rises on a schedule driven by how much of the support moved
since the last check, so ``B`` and ``D`` are pulled together and the support settles; ``B`` on
``D``'s support is the result (ALPS follows with a least-squares re-fit on that support,
``rose_hf.refit``: ``refit_iters``, measured to change the layer error by about 0.1 % once the
support has settled, docs/algorithm.md). Unlike ALPS, which
starts from the magnitude mask, ``D`` starts at the pruner's result (SparseGPT's or ROSE's), and a
result whose layer error is higher than that start's is discarded: never worse than the method.

Cost, per iteration: one Cholesky solve with ``rows`` right-hand sides (cheaper than the two
products with an eigenbasis that ALPS uses, and no ``(cols, cols)`` eigendecomposition), one
projection; per check, one Cholesky factor of ``(cols, cols)`` for the new ``ρ``, made in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rose_hf.refit import refit_weights, row_errors

ADMM_ITERS = 120
ADMM_RHO = 0.1
CHECK_EVERY = 2
MIN_ITERS = 8 * CHECK_EVERY
ADMM_REFIT_ITERS = 0


@dataclass(frozen=True)
class AdmmResult:
    """``weight``: the refined ``(rows, cols)`` float32 weights; ``iterations`` run; ``final_rho``;
    ``support_moved``: the share of kept weights not kept by the start; ``kept_start``: whether
    the start was returned because the ADMM result's layer error was not lower."""

    weight: torch.Tensor
    iterations: int
    final_rho: float
    support_moved: float
    kept_start: bool


def project(B: torch.Tensor, keep: int, n: int = 0, m: int = 0) -> torch.Tensor:
    """Boolean mask of the weights ``B`` keeps in the sparsity set (Euclidean projection's support).

    Unstructured: the ``keep`` largest ``|B|`` of the whole matrix (ties broken by position).
    ``n:m``: in each row, the ``n`` largest ``|B|`` of every ``m`` consecutive columns (``cols``
    must be a multiple of ``m``; ``keep`` is then ignored).
    """
    rows, cols = B.shape
    if m:
        groups = B.abs().reshape(rows, cols // m, m)
        top = groups.topk(n, dim=2).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True).reshape(rows, cols)
    mask = torch.zeros(rows * cols, dtype=torch.bool, device=B.device)
    if keep > 0:
        mask[B.abs().flatten().topk(keep, sorted=False).indices] = True
    return mask.reshape(rows, cols)


def _rho_factor(moved: float) -> float:
    # ALPS's schedule shape: a support still moving a lot is pulled in faster.
    if moved > 0.1:
        return 1.3
    if moved > 0.005:
        return 1.2
    return 1.1


def _ridge_factor(Hn: torch.Tensor, rho: float, L: torch.Tensor) -> None:
    """Write the lower Cholesky factor of ``Hn + ρ I`` into ``L`` (``Hn``: unit diagonal, positive
    semi-definite), in place: no third ``(cols, cols)`` matrix."""
    L.copy_(Hn).diagonal().add_(rho)
    info = torch.empty((), dtype=torch.int32, device=L.device)
    torch.linalg.cholesky_ex(L, out=(L, info))
    if int(info) != 0:  # cannot happen for ρ > 0 in exact arithmetic: say so rather than guess
        raise FloatingPointError(
            f"ADMM: H + {rho:.3g} I is not positive definite in float32 (order {int(info)}); "
            "the Hessian is damaged. Try a larger percdamp such as 0.1."
        )


def admm_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    W_start: torch.Tensor,
    *,
    n: int = 0,
    m: int = 0,
    percdamp: float = 0.01,
    rho: float = ADMM_RHO,
    iters: int = ADMM_ITERS,
    tol: float = 3e-4,
    refit_iters: int = ADMM_REFIT_ITERS,
) -> AdmmResult:
    """ADMM on mask and weights from ``W_start``, then the least-squares re-fit on its support.

    Args:
        W: ``(rows, cols)`` dense weights, the target.
        H: ``(cols, cols)`` Hessian ``2/N X^T X``.
        W_start: ``(rows, cols)`` the method's pruned weights: their number of non-zeros is the
            budget ``k`` (unstructured), and they are the starting ``D``.
        n, m: ``N:M`` pattern (``0, 0``: unstructured, ``k`` kept over the whole matrix).
        percdamp: Dampening of ``H`` as a fraction of ``mean(diag(H))`` (also the re-fit's).
        rho: Starting penalty, in units of the normalised ``diag(H) = 1``.
        iters: Most ADMM iterations (each costs one Cholesky solve with ``rows`` right-hand sides).
        tol: Stop when, after at least ``MIN_ITERS`` iterations, less than this share of the
            kept weights changed since the last check.
        refit_iters: Conjugate-gradient iterations of the final re-fit (``rose_hf.refit``); at the
            end of the schedule ``B`` already sits on its support, so the default is none.

    Returns:
        ``AdmmResult``; its ``weight`` has the budget's number of non-zeros (at most, where
        weights are exactly zero) and a layer error ``(B - W) H (B - W)^T`` no higher than
        ``W_start``'s.

    Example: with ``H = I`` the objective is ``||B - W||^2``, whose best ``k``-sparse ``B`` keeps
    the ``k`` largest ``|W|``; from a random mask ``admm_prune(W, eye, W_start)`` moves the support
    to that one or next to it (a heuristic: ADMM on this non-convex set has no optimality proof).
    """
    W32, start = W.to(torch.float32), W_start.to(torch.float32)
    keep = int((start != 0).sum())
    diagonal = torch.diagonal(H).to(torch.float64)
    damp = percdamp * float(diagonal.mean())
    scale = (diagonal + damp).clamp_min(torch.finfo(torch.float32).tiny).sqrt().to(torch.float32)
    Hn = H.to(torch.float32, copy=True)  # normalised in place: one (cols, cols) copy, not several
    Hn.diagonal().add_(damp)
    Hn.div_(scale.unsqueeze(0)).div_(scale.unsqueeze(1))

    # Working set: five (rows, cols) float32 buffers (target, D, V, the right-hand side R, B) and
    # two (cols, cols) ones beside H (Hn and the factor L, re-made in place).
    target = (W32 * scale) @ Hn  # W H in normalised coordinates
    D = start * scale
    support = D != 0
    V = torch.zeros_like(D)
    R = torch.empty_like(D)
    B = D
    L = torch.empty_like(Hn)
    _ridge_factor(Hn, rho, L)
    done = 0
    for done in range(1, iters + 1):
        # B (Hn + ρI) = target - V + ρ D, solved as (Hn + ρI) B^T = R^T with the factor.
        torch.sub(target, V, out=R).add_(D, alpha=rho)
        del B
        B = torch.cholesky_solve(R.T, L).T
        torch.div(V, rho, out=D).add_(B)  # D <- B + V / ρ, then projected
        support_next = project(D, keep, n, m)
        D.mul_(support_next)
        V.add_(B, alpha=rho).sub_(D, alpha=rho)  # V <- V + ρ (B - D)
        if done % CHECK_EVERY == 0:
            moved = float((support_next & ~support).sum()) / max(keep, 1)
            support = support_next
            if done >= MIN_ITERS and moved < tol:
                break
            # ρ changes: the dual is kept in absolute units, as in the method of multipliers.
            rho = min(rho * _rho_factor(moved), 1e6)
            _ridge_factor(Hn, rho, L)
    del target, D, V, R, L, Hn
    final = project(B, keep, n, m)
    candidate = (B / scale) * final
    if refit_iters > 0:
        candidate = refit_weights(W32, H.to(torch.float32), candidate, percdamp=percdamp, iters=refit_iters)
    moved_total = float((final & (start == 0)).sum()) / max(keep, 1)
    H32 = H.to(torch.float32)
    if float(row_errors(W32, candidate, H32).sum()) >= float(row_errors(W32, start, H32).sum()):
        return AdmmResult(start.clone(), done, rho, moved_total, True)
    return AdmmResult(candidate, done, rho, moved_total, False)
