"""Re-fit the kept weights of a pruned matrix on its fixed mask: exact least squares, by batched CG.

Pure tensor math: inputs are never modified, nothing is printed, nothing is CUDA-only.

SparseGPT (and so ROSE) updates each row greedily, column by column, and then freezes it. On the
final mask the best weights are the least-squares solution of the layer objective restricted to
the kept support (ALPS, Meng et al. 2024, arXiv 2406.07831, Sec. 3.3; Boža 2024, arXiv 2401.02938).
For each row ``w`` of the dense ``W`` and its kept set ``S``::

    minimise  (v - w) (H + λI) (v - w)^T   over v with v_j = 0 for j not in S
    <=>       (H + λI)_SS v_S = ((H + λI) w^T)_S

``λ = percdamp * mean(diag(H))`` is SparseGPT's dampening; here it also keeps the re-fit close to
the dense weights where ``H`` says little (a ridge towards ``w``). Every row is its own system with
its own support, so they are solved together by Jacobi-preconditioned conjugate gradients on the
masked operator ``V -> K * (V (H + λI))`` (``K`` the keep mask), started from the pruner's own
weights. A row whose undamped layer error ``(v - w) H (v - w)^T`` comes out higher than its start
keeps its start, so the re-fit never raises a module's layer error.
"""

from __future__ import annotations

import torch

REFIT_ITERS = 50


def row_errors(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` layer output errors ``(w_hat - w) H (w_hat - w)^T`` of each row."""
    D = (W_hat - W).to(torch.float32)
    return ((D @ H) * D).sum(dim=1)


def refit_weights(
    W: torch.Tensor,
    H: torch.Tensor,
    W_pruned: torch.Tensor,
    *,
    percdamp: float = 0.01,
    iters: int = REFIT_ITERS,
) -> torch.Tensor:
    """Least-squares weights on the support of ``W_pruned`` (its non-zeros), a new float32 tensor.

    Args:
        W: ``(rows, cols)`` dense weights, the target.
        H: ``(cols, cols)`` Hessian ``2/N X^T X``.
        W_pruned: ``(rows, cols)`` pruned weights; their zeros are the mask (kept zero) and their
            values the starting point.
        percdamp: Dampening as a fraction of ``mean(diag(H))``.
        iters: Conjugate-gradient iterations (each costs one ``(rows, cols) @ (cols, cols)`` product).

    Returns:
        ``(rows, cols)`` weights with the same zeros as ``W_pruned`` and, row by row, a layer error
        no higher than ``W_pruned``'s.

    Example: with ``H = I`` the least-squares weights are the dense weights on the kept support,
    ``refit_weights(W, eye, W_pruned) == W * (W_pruned != 0)``.
    """
    W32, start = W.to(torch.float32), W_pruned.to(torch.float32)
    H32 = H.to(torch.float32)
    keep = start != 0
    damp = percdamp * float(torch.diagonal(H32).mean())
    Hd = H32 + damp * torch.eye(H32.shape[0], dtype=torch.float32, device=H32.device)
    inverse_diagonal = 1.0 / torch.diagonal(Hd).clamp_min(torch.finfo(torch.float32).tiny)

    def apply(V: torch.Tensor) -> torch.Tensor:
        return (V @ Hd).mul_(keep)

    X = start.clone()
    R = (W32 @ Hd).mul_(keep).sub_(apply(X))
    Z = R * inverse_diagonal
    P = Z.clone()
    rz = (R * Z).sum(dim=1)
    for _ in range(iters):
        AP = apply(P)
        curvature = (P * AP).sum(dim=1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        X.addcmul_(alpha.unsqueeze(1), P)
        R.addcmul_(alpha.unsqueeze(1), AP, value=-1.0)
        Z = R * inverse_diagonal
        rz_next = (R * Z).sum(dim=1)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        P = Z.add_(P * beta.unsqueeze(1))
        rz = rz_next
    X.mul_(keep)
    worse = row_errors(W32, X, H32) > row_errors(W32, start, H32)
    X[worse] = start[worse]
    return X
