"""Rotations that concentrate importance before pruning: the math of DenoiseRotator's head rotations.

Pure tensor math: inputs are never modified, nothing is printed, nothing is CUDA-only; fp32.

DenoiseRotator ("DenoiseRotator: Enhance Pruning Robustness for LLMs via Importance Concentration",
NeurIPS 2025, arXiv 2505.23049) rotates a layer's weights so that the pruner's importance scores
pile up on fewer weights: the lower the entropy of the normalised
importance of a row (or a column), the fewer of its weights carry what matters, and the less pruning
the rest costs. This module holds the pieces for the rotation that merges exactly into the model:
one orthogonal ``R`` of ``(head_dim, head_dim)`` per key/value head, on ``v_proj``'s output and on
``o_proj``'s input (the paper's R2). Attention mixes positions, never the channels of a head, so

    V_g = X W_gᵀ  →  V_g R = X (Rᵀ W_g)ᵀ            W_g: rows of v_proj for kv head g
    (A_h V_g R) (W_o,h R)ᵀ = (A_h V_g) W_o,hᵀ        W_o,h: columns of o_proj for query head h

so ``v_proj ← Rᵀ W_g`` (and its bias ``Rᵀ b_g``), ``o_proj ← W_o,h R`` for every query head ``h``
that reads kv head ``g = h // (heads / kv_heads)`` (transformers' ``repeat_kv``) leave the block's
output unchanged, and ``o_proj``'s Hessian becomes ``Bᵀ H B`` with ``B`` the block-diagonal of the
``R`` of each query head, with no new calibration pass.

Importance is SparseGPT's ``W_ij² / [H⁻¹]_jj`` (its pruning error of one weight): rotating the input
basis by ``B`` turns it into ``(W B)_ij² / [Bᵀ H⁻¹ B]_jj``. ``R = qr(A).Q`` (signs fixed so that
``A = I`` gives ``R = I``) keeps ``R`` orthogonal while Adam moves the free ``A``.
"""

from __future__ import annotations

import torch


def orthogonal(A: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of ``A = QR`` with ``R``'s diagonal made positive (so ``A = I`` gives ``I``).

    Args:
        A: ``(..., n, n)`` free parameters, full rank.

    Returns:
        ``(..., n, n)`` orthogonal matrices, differentiable in ``A``.
    """
    Q, R = torch.linalg.qr(A)
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2)


def entropy(S: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of the Shannon entropies of ``S`` normalised to sum 1 along ``dim`` (DenoiseRotator's loss).

    ``S`` is non-negative (an importance). A slice that is all zero has entropy 0. Low entropy: the
    importance of the slice sits on few entries. Zero entries add nothing and pass a zero gradient
    (``p log p`` has an infinite slope at 0, so their log reads ``log 1``).
    """
    total = S.sum(dim=dim, keepdim=True)
    p = S / torch.where(total > 0, total, torch.ones_like(total))
    return -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()


ROTATION_OBJECTIVES = ("entropy", "dropped")  # config.ROTATION_OBJECTIVES: the pure math keeps its own


def dropped_share(S: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """The share of ``S``'s total that the sparsity pattern would drop by ``S`` alone.

    ``S`` is a non-negative importance ``(rows, cols)``. With ``n:m`` (``m > 0``): in each row's
    aligned groups of ``m`` columns, the ``m - n`` smallest entries; else the ``round(sparsity ·
    cols)`` smallest of each row. Divided by ``S.sum()``, so every matrix counts alike whatever its
    scale. Lower is better: the pattern then removes less of what matters. Differentiable in ``S``
    wherever the chosen entries do not tie.
    """
    total = S.sum().clamp_min(torch.finfo(S.dtype).tiny)
    if m > 0:
        if S.shape[-1] % m:
            raise ValueError(f"{S.shape[-1]} columns are not whole groups of m={m}")
        smallest = S.reshape(*S.shape[:-1], -1, m).sort(-1).values[..., : m - n]
    else:
        k = round(sparsity * S.shape[-1])
        smallest = S.sort(-1).values[..., :k]
    return smallest.sum() / total


def matrix_loss(S: torch.Tensor, objective: str, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """One matrix's share of a rotation loss, from its importance ``S`` ``(rows, cols)``: the row and
    column entropies (``objective="entropy"``) or ``dropped_share(S, sparsity, n, m)`` (``"dropped"``)."""
    if objective == "dropped":
        return dropped_share(S, sparsity, n, m)
    if objective != "entropy":
        raise ValueError(f"objective={objective!r} is not one of {list(ROTATION_OBJECTIVES)}")
    return entropy(S, 1) + entropy(S, 0)


def importance(W: torch.Tensor, Hinv: torch.Tensor) -> torch.Tensor:
    """SparseGPT's importance ``W_ij² / [H⁻¹]_jj``: the layer error of pruning one weight alone.

    Args:
        W: ``(rows, cols)``.
        Hinv: ``(cols, cols)`` inverse of the dampened Hessian (or its ``(cols,)`` diagonal).
    """
    diag = Hinv if Hinv.dim() == 1 else torch.diagonal(Hinv)
    return W.square() / diag.clamp_min(torch.finfo(W.dtype).tiny)


def head_blocks(R: torch.Tensor, heads: int) -> torch.Tensor:
    """``(heads·head_dim, heads·head_dim)`` block-diagonal of the kv-head rotations, one per query head.

    Args:
        R: ``(kv_heads, head_dim, head_dim)``; query head ``h`` reads kv head ``h // (heads // kv_heads)``.
        heads: number of query heads, a multiple of ``kv_heads``.
    """
    kv_heads = R.shape[0]
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    return torch.block_diag(*R.repeat_interleave(heads // kv_heads, dim=0).unbind(0))


def head_diagonal_blocks(M: torch.Tensor, heads: int) -> torch.Tensor:
    """``(heads, head_dim, head_dim)``: the blocks of ``M`` ``(heads·head_dim, heads·head_dim)`` on its diagonal."""
    head_dim = M.shape[0] // heads
    return torch.diagonal(M.reshape(heads, head_dim, heads, head_dim), dim1=0, dim2=2).permute(2, 0, 1)


def head_rotation_loss(
    Wv: torch.Tensor,
    Hinv_v: torch.Tensor,
    Wo: torch.Tensor,
    Hinv_o: torch.Tensor,
    R: torch.Tensor,
    heads: int,
    objective: str = "entropy",
    pattern: tuple[float, int, int] = (0.5, 0, 0),
    o_sparsity: float | None = None,
) -> torch.Tensor:
    """Entropy of SparseGPT's importance of ``v_proj`` and ``o_proj`` after the head rotations ``R``
    (``objective="entropy"``, DenoiseRotator's), or the share of it the pattern would drop
    (``"dropped"``: ``dropped_share`` of each matrix with ``pattern = (sparsity, n, m)``, summed;
    ``o_sparsity``, where given, is ``o_proj``'s own sparsity when a plan prunes it unlike ``v_proj``).

    Rows and columns both count, as in DenoiseRotator: ``v_proj``'s rows move with ``R`` while its
    inputs stay; ``o_proj``'s inputs move, so its inverse Hessian becomes ``Bᵀ H⁻¹ B``, of which only
    the diagonal is read: per query head ``h``, ``diag(R_hᵀ M_h R_h)`` with ``M_h`` the head's diagonal
    block. Costs ``O(hidden · heads · head_dim²)``, never a product with the full ``B``.

    Args:
        Wv: ``(kv_heads·head_dim, hidden)``; Hinv_v: ``(hidden, hidden)`` or its diagonal.
        Wo: ``(hidden, heads·head_dim)``.
        Hinv_o: ``(heads·head_dim, heads·head_dim)``, or its diagonal blocks ``(heads, head_dim, head_dim)``.
        R: ``(kv_heads, head_dim, head_dim)`` orthogonal.
        heads: number of query heads, a multiple of ``kv_heads``.
    """
    kv_heads, head_dim, _ = R.shape
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    Wv_rot = (R.transpose(1, 2) @ Wv.reshape(kv_heads, head_dim, -1)).reshape(Wv.shape)
    Rq = R.repeat_interleave(heads // kv_heads, dim=0)  # (heads, head_dim, head_dim): the R each query head reads
    Wo_rot = torch.einsum("ohd,hde->ohe", Wo.reshape(Wo.shape[0], heads, head_dim), Rq).reshape(Wo.shape)
    blocks = Hinv_o if Hinv_o.dim() == 3 else head_diagonal_blocks(Hinv_o, heads)
    diag_o = ((blocks @ Rq) * Rq).sum(1).reshape(-1)  # diag(Rᵀ M R) = Σ_d (M R)_de R_de
    Sv = importance(Wv_rot, Hinv_v)
    So = importance(Wo_rot, diag_o)
    sparsity, n, m = pattern
    o_sparsity = sparsity if o_sparsity is None else o_sparsity
    return matrix_loss(Sv, objective, sparsity, n, m) + matrix_loss(So, objective, o_sparsity, n, m)


def learn_head_rotations(
    Wv: torch.Tensor,
    Hinv_v: torch.Tensor,
    Wo: torch.Tensor,
    Hinv_o: torch.Tensor,
    kv_heads: int,
    heads: int,
    steps: int = 100,
    lr: float = 0.01,
    objective: str = "entropy",
    pattern: tuple[float, int, int] = (0.5, 0, 0),
    o_sparsity: float | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Head rotations that lower ``head_rotation_loss`` (``objective``, ``pattern``, ``o_sparsity``:
    as there), by Adam on ``A`` from ``A = I`` (deterministic).

    Returns:
        ``(R, losses)``: ``R`` of ``(kv_heads, head_dim, head_dim)`` float32 orthogonal, detached, and
        the loss before each step plus after the last (``steps + 1`` values).
    """
    head_dim = Wv.shape[0] // kv_heads
    Wv, Wo = Wv.detach().to(torch.float32), Wo.detach().to(torch.float32)
    Hinv_v = torch.diagonal(Hinv_v).detach().to(torch.float32) if Hinv_v.dim() == 2 else Hinv_v.detach().float()
    Hinv_o = head_diagonal_blocks(Hinv_o, heads) if Hinv_o.dim() == 2 else Hinv_o
    Hinv_o = Hinv_o.detach().to(torch.float32)
    A = torch.eye(head_dim, dtype=torch.float32, device=Wv.device).repeat(kv_heads, 1, 1).requires_grad_(True)
    optimiser = torch.optim.Adam([A], lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            loss = head_rotation_loss(Wv, Hinv_v, Wo, Hinv_o, orthogonal(A), heads, objective, pattern, o_sparsity)
            losses.append(loss.item())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        R = orthogonal(A)
        losses.append(head_rotation_loss(Wv, Hinv_v, Wo, Hinv_o, R, heads, objective, pattern, o_sparsity).item())
    return R.detach(), losses


def fuse_head_rotations(
    Wv: torch.Tensor, bv: torch.Tensor | None, Wo: torch.Tensor, R: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """New ``(v_proj weight, v_proj bias, o_proj weight)`` with the head rotations merged (exact).

    ``o_proj``'s bias, if any, is untouched: it adds after the rotation has cancelled. Computed in
    float32 and returned in each input's dtype.
    """
    kv_heads, head_dim, _ = R.shape
    R32 = R.to(torch.float32)
    Wv_rot = (R32.transpose(1, 2) @ Wv.to(torch.float32).reshape(kv_heads, head_dim, -1)).reshape(Wv.shape)
    bv_rot = None
    if bv is not None:
        bv_rot = (R32.transpose(1, 2) @ bv.to(torch.float32).reshape(kv_heads, head_dim, 1)).reshape(bv.shape)
        bv_rot = bv_rot.to(bv.dtype)
    Wo_rot = Wo.to(torch.float32) @ head_blocks(R32, heads)
    return Wv_rot.to(Wv.dtype), bv_rot, Wo_rot.to(Wo.dtype)


def rotate_hessian(H: torch.Tensor, R: torch.Tensor, heads: int) -> torch.Tensor:
    """``o_proj``'s Hessian in the rotated basis, ``Bᵀ H B``: no new calibration pass is needed."""
    B = head_blocks(R.to(torch.float32), heads)
    return B.T @ H.to(torch.float32) @ B


# The residual rotation (DenoiseRotator's R1, shared by every block so that it merges exactly).
#
# With every RMSNorm's weight folded into the Linears that read it, a norm computes ``x / rms(x)``,
# which commutes with any orthogonal ``R`` (``rms(x R) = rms(x)``). Rotating the residual stream by
# one ``R`` everywhere (embeddings ``E R``; each reader ``W R``; each writer ``Rᵀ W``; the head
# ``W R``) leaves the model's function unchanged, and each reader's Hessian becomes ``Rᵀ H R``, whose
# inverse is ``Rᵀ H⁻¹ R``: its diagonal is ``diag(Rᵀ H⁻¹ R)_j = Σ_i (H⁻¹ R)_ij R_ij``.


def residual_rotation_loss(
    groups: list[tuple[list[torch.Tensor], torch.Tensor]],
    R: torch.Tensor,
    objective: str = "entropy",
    pattern: tuple[float, int, int] = (0.5, 0, 0),
) -> torch.Tensor:
    """Entropy of SparseGPT's importance of every reader of the residual stream after the rotation ``R``
    (``objective="entropy"``), or the share of it the pattern would drop (``"dropped"``, as in
    ``head_rotation_loss``).

    Args:
        groups: one entry per norm output (a block's attention input, its MLP input): the weights
            ``(rows, hidden)`` of the Linears that read it and the inverse of its Hessian
            ``(hidden, hidden)``. Rows may be a sample of the module's rows.
        R: ``(hidden, hidden)`` orthogonal.
        objective, pattern: as in ``head_rotation_loss``.

    Returns:
        The sum over groups and modules of the row and column entropies (``entropy``) of
        ``S = (W R)_ij² / diag(Rᵀ H⁻¹ R)_j``, or of ``dropped_share(S, *pattern)``.
    """
    total = R.new_zeros(())
    for weights, Hinv in groups:
        diag = ((Hinv @ R) * R).sum(0)
        for W in weights:
            total = total + matrix_loss(importance(W @ R, diag), objective, *pattern)
    return total


def learn_residual_rotation(
    groups: list[tuple[list[torch.Tensor], torch.Tensor]],
    steps: int = 100,
    lr: float = 0.01,
    groups_per_step: int = 16,
    rows_per_module: int = 256,
    seed: int = 0,
    objective: str = "entropy",
    pattern: tuple[float, int, int] = (0.5, 0, 0),
    device: torch.device | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """One residual rotation that lowers ``residual_rotation_loss`` (``objective``, ``pattern``: as
    there) over all groups, by Adam from ``I``.

    Each step reads a random sample of ``groups_per_step`` groups and, in each module, of
    ``rows_per_module`` rows (drawn from a generator seeded with ``seed``, so the result is
    deterministic): the loss is a sum over groups and rows, so the sample's gradient points the
    same way on average at a fraction of the cost. The groups may stay where they are, in any
    float dtype (the host, say, for a model larger than the compute device): the learning runs on
    ``device`` (default: the first inverse Hessian's) in float32, moving one sample, or one group
    of the full loss, there at a time.

    Returns:
        ``(R, losses)``: ``R`` of ``(hidden, hidden)`` float32 orthogonal on ``device``, detached, and
        the full loss (every group, every row) before the first step and after the last.
    """
    if not groups:
        raise ValueError("learn_residual_rotation needs at least one group of (weights, inverse Hessian)")
    hidden = groups[0][1].shape[0]
    device = device or groups[0][1].device

    def moved(Ws: list[torch.Tensor], Hinv: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [W.detach().to(device, torch.float32) for W in Ws], Hinv.detach().to(device, torch.float32)

    def full_loss(R: torch.Tensor) -> float:
        return sum(residual_rotation_loss([moved(*group)], R, objective, pattern).item() for group in groups)

    generator = torch.Generator().manual_seed(seed)
    A = torch.eye(hidden, dtype=torch.float32, device=device).requires_grad_(True)
    optimiser = torch.optim.Adam([A], lr=lr)
    with torch.no_grad():
        losses = [full_loss(orthogonal(A))]
    with torch.enable_grad():
        for _ in range(steps):
            picked = torch.randperm(len(groups), generator=generator)[:groups_per_step].tolist()
            sample = []
            for g in picked:
                Ws, Hinv = groups[g]
                rows = [torch.randperm(W.shape[0], generator=generator)[:rows_per_module].to(W.device) for W in Ws]
                sample.append(moved([W[r] for W, r in zip(Ws, rows)], Hinv))
            loss = residual_rotation_loss(sample, orthogonal(A), objective, pattern)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        R = orthogonal(A)
        losses.append(full_loss(R))
    return R.detach(), losses


def rotate_rows(weight: torch.Tensor, R: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(weight · diag(scale)) R`` in ``weight``'s dtype, computed in float64 a slice of rows at a time.

    For the embedding and head matrices (vocabulary × hidden): the product is rounded once to the
    weight's dtype, so merging the rotation costs the checkpoint one rounding; the slices bound the
    float64 copy's memory.
    """
    R64 = R.to(device=weight.device, dtype=torch.float64)
    s64 = None if scale is None else scale.to(device=weight.device, dtype=torch.float64)
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[0], 4096):
        rows = weight[start : start + 4096].to(torch.float64)
        out[start : start + 4096] = ((rows if s64 is None else rows * s64) @ R64).to(weight.dtype)
    return out
