"""Property-based tests of the math (hypothesis): random shapes, patterns, damping, column orders,
and singular or badly conditioned Hessians always give exact sparsity or a valid N:M pattern,
finite weights, and an order that is undone exactly."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rose_hf.config import RoseConfig
from rose_hf.masks import count_for
from rose_hf.pruning import prune_matrix
from rose_hf.refit import refit_weights, row_errors
from rose_hf.sparsegpt import apply_order, default_blocks, invert_permutation, sparsegpt_prune, undo_order

PROFILE = settings(max_examples=40, deadline=None, derandomize=True, database=None)


@st.composite
def problems(draw):
    """``(W, H)`` with ``tokens`` possibly below ``cols`` (singular H), columns scaled over up to
    six orders of magnitude (ill-conditioned), and possibly a dead input column."""
    rows = draw(st.integers(1, 10))
    cols = 8 * draw(st.integers(1, 6))
    tokens = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**16))
    spread = draw(st.floats(0.0, 3.0))
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) * 10.0 ** (spread * (2 * torch.rand(cols, generator=g) - 1))
    if draw(st.booleans()):
        X[:, draw(st.integers(0, cols - 1))] = 0.0  # an input that is always zero
    W = torch.randn(rows, cols, generator=g)
    return W, 2.0 / tokens * X.T @ X


@PROFILE
@given(problems(), st.floats(0.0, 0.95), st.sampled_from([4, 8, 16, 32]), st.floats(1e-4, 1.0), st.booleans())
def test_unstructured_pruning_is_exact_and_finite_under_any_order(problem, sparsity, blocksize, percdamp, shuffle):
    W, H = problem
    cols = W.shape[1]
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(cols)) if shuffle else None
    result = sparsegpt_prune(W, H, sparsity, blocksize=blocksize, percdamp=percdamp, perm=perm)
    assert torch.isfinite(result.weight).all()
    assert (result.weight[result.mask] == 0).all()
    want = sum(count_for(sparsity, W.shape[0] * b) for b in default_blocks(cols, blocksize))
    assert int(result.mask.sum()) == want


@PROFILE
@given(
    problems(), st.sampled_from([(2, 4), (1, 4), (4, 8)]), st.floats(1e-4, 1.0), st.sampled_from(["always", "never"])
)
def test_nm_pruning_through_rose_keeps_the_pattern(problem, nm, percdamp, reorder):
    W, H = problem
    n, m = nm
    config = RoseConfig(pattern=f"{n}:{m}", blocksize=8, percdamp=percdamp, reorder=reorder)
    weight, _ = prune_matrix(W, H, config)
    assert torch.isfinite(weight).all()
    zeros = (weight == 0).reshape(W.shape[0], -1, m).sum(dim=2)
    assert (zeros >= m - n).all()


@PROFILE
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**16))
def test_an_order_is_undone_exactly(cols, rows, seed):
    g = torch.Generator().manual_seed(seed)
    W, H = torch.randn(rows, cols, generator=g), torch.randn(cols, cols, generator=g)
    perm = torch.randperm(cols, generator=g)
    Wp, Hp = apply_order(W, H, perm)
    assert torch.equal(undo_order(Wp, perm), W)
    inverse = invert_permutation(perm)
    assert torch.equal(Hp[inverse][:, inverse], H)


@PROFILE
@given(problems(), st.floats(0.3, 0.9), st.floats(1e-4, 1.0))
def test_refit_keeps_the_mask_stays_finite_and_never_raises_a_row_error(problem, sparsity, percdamp):
    W, H = problem
    pruned = sparsegpt_prune(W, H, sparsity, blocksize=8).weight
    refit = refit_weights(W, H, pruned, percdamp=percdamp, iters=8)
    assert torch.isfinite(refit).all() and torch.equal(refit == 0, pruned == 0)
    assert (row_errors(W, refit, H) <= row_errors(W, pruned, H)).all()
