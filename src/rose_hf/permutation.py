"""Channel permutations that balance N:M groups: the math (pure tensor functions, fp32, no I/O).

An N:M pattern keeps ``n`` weights of every ``m`` consecutive input columns in each row, so which
columns share a group decides what can be kept: two important columns in one group of 4 under 2:4
force every row to drop one of them, or a lesser weight of another group has to go instead.
Permuting the columns before pruning regroups them (NVIDIA's channel permutations for N:M sparsity,
Pool & Yu, NeurIPS 2021; RIA, Zhang et al., ICLR 2024). The permutation is exact wherever the
columns' order is a free choice of the model: the MLP's hidden channels (``gate_proj``/``up_proj``
rows and ``down_proj`` columns: the activation between them is elementwise) and the channels of a
key/value head (``v_proj`` rows and ``o_proj`` columns of every query head that reads it).

The cost of a grouping is what the pattern drops by importance alone: per row and group, the sum of
the ``m - n`` smallest importances (SparseGPT's ``W_ij² / [H⁻¹]_jj``, ``rose_hf.rotation.importance``).
``balance_permutation`` lowers it by local search: each round pairs the groups at random and, in
every pair, makes the best of the ``m²`` single-column swaps if it lowers the pair's cost.
"""

from __future__ import annotations

import torch


def group_cost(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group: the sum over rows of the ``m - n`` smallest entries of each row's group.

    Args:
        S: ``(rows, groups, m)`` non-negative importances, or ``(rows, ..., m)``.

    Returns:
        ``S.shape[1:-1]``: the importance an ``n:m`` pattern drops in each group, summed over rows.
    """
    return S.topk(m - n, dim=-1, largest=False).values.sum(-1).sum(0)


def permutation_cost(S: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> float:
    """The importance an ``n:m`` pattern drops when column ``k`` holds ``S[:, perm[k]]``.

    Args:
        S: ``(rows, cols)`` non-negative importances; ``cols`` a multiple of ``m``.
        perm: ``(cols,)`` a permutation of ``range(cols)``.
    """
    rows, cols = S.shape
    return float(group_cost(S[:, perm].reshape(rows, cols // m, m), n, m).sum())


def balance_permutation(
    S: torch.Tensor, n: int, m: int, rounds: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A column permutation of ``S`` whose ``n:m`` groups drop less importance than the identity's.

    Never worse than the identity (a swap is made only if it lowers its pair's cost); deterministic
    for a given ``generator`` state.

    Args:
        S: ``(rows, cols)`` non-negative importances; ``cols`` a multiple of ``m``, at least ``2 m``.
        n, m: the pattern (keep ``n`` of every ``m``), ``0 < n < m``.
        rounds: local-search rounds; each pairs every group once with another.
        generator: the random pairing's source.

    Returns:
        ``(cols,)`` long: column ``k`` of the permuted matrix is column ``perm[k]`` of ``S``.
    """
    rows, cols = S.shape
    if not 0 < n < m or cols % m:
        raise ValueError(f"balance_permutation needs 0 < n < m and cols % m == 0, got n={n}, m={m}, cols={cols}")
    groups = cols // m
    perm = torch.arange(cols, device=S.device)
    if groups < 2:
        return perm
    keep = m - n  # how many of a group's entries the pattern drops
    for _ in range(rounds):
        grid = S[:, perm].view(rows, groups, m)
        # A group that gives away slot i keeps the m - 1 others; r: those, sorted. Taking in x, it
        # drops the keep smallest of r and x: sum(r[:keep-1]) + min(x, r[keep-1]). Read off the
        # group's own sort: v, and q the rank of slot i in it.
        v, where = grid.sort(dim=-1)
        q = torch.empty_like(where).scatter_(-1, where, torch.arange(m, device=S.device).expand_as(where))
        cumulative = v.cumsum(-1)
        below = cumulative[..., keep - 2 : keep - 1] if keep > 1 else torch.zeros_like(v[..., :1])
        prefix = torch.where(q < keep - 1, cumulative[..., keep - 1 : keep] - grid, below)  # (rows, groups, m)
        pivot = torch.where(q <= keep - 1, v[..., keep : keep + 1], v[..., keep - 1 : keep])
        dropped = cumulative[..., keep - 1].sum(0)  # (groups,): the cost of each group as it is
        order = torch.randperm(groups, generator=generator).to(S.device)
        half = groups // 2
        a, b = order[:half], order[half : 2 * half]
        base = dropped[a] + dropped[b]  # (pairs,)
        # Swap (i, j): slot i of group a for slot j of group b; cost summed over rows, (pairs, m, m).
        into_a = torch.minimum(pivot[:, a].unsqueeze(-1), grid[:, b].unsqueeze(-2))  # (rows, pairs, m, m)
        into_b = torch.minimum(pivot[:, b].unsqueeze(-2), grid[:, a].unsqueeze(-1))
        cost_a = (prefix[:, a].unsqueeze(-1) + into_a).sum(0)
        cost_b = (prefix[:, b].unsqueeze(-2) + into_b).sum(0)
        gain = base[:, None] - (cost_a + cost_b).reshape(half, m * m)
        best, swap = gain.max(dim=1)
        # Only clear gains: a tie or rounding noise would swap back and forth.
        chosen = best > 1e-6 * base.clamp_min(torch.finfo(S.dtype).tiny)
        if not bool(chosen.any()):
            continue
        sw = swap[chosen]
        ia, ib = a[chosen] * m + sw // m, b[chosen] * m + sw % m
        perm[ia], perm[ib] = perm[ib].clone(), perm[ia].clone()
    return perm


def permute_square(M: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``M`` (a Hessian, ``(cols, cols)``) of an input whose column ``k`` becomes column ``order[k]``:
    ``Pᵀ M P`` for the permutation matrix ``P``, read off by indexing."""
    order = order.to(M.device)
    return M[order][:, order]


def head_permutation(
    S: torch.Tensor, heads: int, kv_heads: int, n: int, m: int, rounds: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One permutation of each key/value head's channels, balanced over every query head that reads it.

    Args:
        S: ``(rows, heads·head_dim)`` importances of ``o_proj``; query head ``h`` reads kv head
            ``h // (heads / kv_heads)`` (transformers' ``repeat_kv``).

    Returns:
        ``(kv_heads, head_dim)`` long: per kv head, the order of its channels.
    """
    rows = S.shape[0]
    head_dim = S.shape[1] // heads
    per_kv = S.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    return torch.stack(
        [
            balance_permutation(per_kv[:, g].reshape(-1, head_dim), n, m, rounds, generator)
            if head_dim % m == 0
            else torch.arange(head_dim, device=S.device)
            for g in range(kv_heads)
        ]
    )


def expand_head_permutation(perm: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The row order of ``v_proj`` and the column order of ``o_proj`` for per-kv-head orders ``perm``.

    Args:
        perm: ``(kv_heads, head_dim)`` from ``head_permutation``.

    Returns:
        ``(kv_heads·head_dim,)`` and ``(heads·head_dim,)`` long index vectors.
    """
    kv_heads, head_dim = perm.shape
    offsets = torch.arange(kv_heads, device=perm.device)[:, None] * head_dim
    v_order = (perm + offsets).reshape(-1)
    reads = torch.arange(heads, device=perm.device) // (heads // kv_heads)
    o_order = (perm[reads] + torch.arange(heads, device=perm.device)[:, None] * head_dim).reshape(-1)
    return v_order, o_order
