"""Independent, deliberately naive SparseGPT written from the paper (Frantar & Alistarh, 2023).

No Cholesky factor, no lazy block updates: at every column the inverse of the Hessian restricted to
the columns not yet visited is formed explicitly, and the OBS update of Sec. 3.1,
``delta_F = -(w_p / [H_F^-1]_pp) * [H_F^-1]_{:, p}``, is applied to all later columns at once.
Masks are chosen from ``w^2 / [H_F^-1]_pp`` per ``blocksize`` columns (or per N:M group) on the
weights as they stand when that block (group) is reached, as the paper's adaptive selection does.
"""

from __future__ import annotations

import torch


def naive_sparsegpt(
    W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int, percdamp: float = 0.01, n: int = 0, m: int = 0
) -> torch.Tensor:
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    W[:, dead] = 0.0
    # d[j] = [H_F^-1]_jj where F = {j, ..., cols-1}.
    inverses = [torch.linalg.inv(H[j:, j:]) for j in range(cols)]
    d = torch.tensor([inv[0, 0].item() for inv in inverses], dtype=H.dtype)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if not m and j % blocksize == 0:
            end = min(j + blocksize, cols)
            saliency = (W[:, j:end] ** 2 / d[j:end]).reshape(-1)
            k = int(sparsity * saliency.numel() + 0.5)
            order = torch.argsort(saliency, stable=True)[:k]
            block_mask = torch.zeros(saliency.numel(), dtype=torch.bool)
            block_mask[order] = True
            mask[:, j:end] = block_mask.reshape(rows, end - j)
        if m and j % m == 0:
            saliency = W[:, j : j + m] ** 2 / d[j : j + m]
            for r in range(rows):
                drop = torch.argsort(saliency[r], stable=True)[: m - n]
                mask[r, j + drop] = True
        inv = inverses[j]
        for r in range(rows):
            if mask[r, j]:
                W[r, j:] -= (W[r, j] / inv[0, 0]) * inv[0, :]
                W[r, j] = 0.0
    return W.float()
