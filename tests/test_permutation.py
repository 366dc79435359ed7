"""The N:M channel-permutation math: valid permutations, never worse, the swap gain computed right."""

from __future__ import annotations

import itertools

import pytest
import torch

from rose_hf.permutation import (
    balance_permutation,
    expand_head_permutation,
    group_cost,
    head_permutation,
    permutation_cost,
    permute_square,
)


def _scores(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).square() * (torch.rand(cols, generator=g) ** 4 * 10 + 0.1)


def test_group_cost_is_what_the_pattern_drops():
    S = torch.tensor([[[4.0, 1.0, 3.0, 2.0]], [[0.5, 0.25, 8.0, 1.0]]])  # (rows, groups, 4)
    assert group_cost(S, 2, 4).tolist() == [pytest.approx(3.0 + 0.75)]
    assert group_cost(S, 1, 4).tolist() == [pytest.approx(6.0 + 1.75)]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (1, 2)])
def test_balance_is_a_permutation_never_worse_and_deterministic(n, m):
    S = _scores(40, 16 * m)
    perm = balance_permutation(S, n, m, 20, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(S.shape[1]))
    identity = permutation_cost(S, torch.arange(S.shape[1]), n, m)
    assert permutation_cost(S, perm, n, m) < 0.9 * identity
    assert torch.equal(perm, balance_permutation(S, n, m, 20, torch.Generator().manual_seed(0)))


def test_balance_moves_a_heavy_column_out_of_a_crowded_group():
    S = torch.ones(3, 8)
    S[:, :3] = 100.0  # three heavy columns in group 0: 2:4 must drop one of them in every row
    perm = balance_permutation(S, 2, 4, 5, torch.Generator().manual_seed(0))
    assert permutation_cost(S, torch.arange(8), 2, 4) == pytest.approx(3 * (100 + 1 + 1 + 1))
    assert permutation_cost(S, perm, 2, 4) == pytest.approx(3 * 4.0)  # only ones dropped


def test_balance_reaches_the_best_grouping_of_a_small_matrix():
    """Eight columns, 2:4: the search ends at the exhaustive optimum over the 35 groupings."""
    S = _scores(6, 8, seed=3)
    best = min(
        permutation_cost(S, torch.tensor([*first, *(c for c in range(8) if c not in first)]), 2, 4)
        for first in itertools.combinations(range(8), 4)
    )
    perm = balance_permutation(S, 2, 4, 30, torch.Generator().manual_seed(0))
    assert permutation_cost(S, perm, 2, 4) == pytest.approx(best, rel=1e-6)


def test_balance_refuses_a_width_the_pattern_does_not_divide():
    with pytest.raises(ValueError, match="cols % m == 0, got n=2, m=4, cols=10"):
        balance_permutation(torch.ones(2, 10), 2, 4, 5)


def test_head_permutation_is_shared_by_the_query_heads_of_a_kv_head():
    heads, kv_heads, head_dim = 6, 2, 8
    perm = head_permutation(_scores(10, heads * head_dim), heads, kv_heads, 2, 4, 10, torch.Generator().manual_seed(0))
    assert perm.shape == (kv_heads, head_dim)
    v_order, o_order = expand_head_permutation(perm, heads)
    assert sorted(v_order.tolist()) == list(range(kv_heads * head_dim))
    assert sorted(o_order.tolist()) == list(range(heads * head_dim))
    for h in range(heads):  # query head h reads kv head h // 3 and sees its channels in the same order
        g = h // (heads // kv_heads)
        assert torch.equal(
            o_order[h * head_dim : (h + 1) * head_dim] - h * head_dim,
            v_order[g * head_dim : (g + 1) * head_dim] - g * head_dim,
        )


def test_permute_square_is_the_hessian_of_the_permuted_input():
    g = torch.Generator().manual_seed(3)
    X, order = torch.randn(20, 8, generator=g), torch.randperm(8, generator=g)
    P = torch.eye(8)[:, order]  # x P: column k of the new input is column order[k]
    assert torch.allclose(X @ P, X[:, order])
    assert torch.allclose(permute_square(X.T @ X, order), P.T @ (X.T @ X) @ P)
    assert torch.allclose(permute_square(X.T @ X, order), X[:, order].T @ X[:, order])
