import pytest
import torch

from conftest import correlated_problem
from reference import naive_sparsegpt
from rose_hf.baselines import magnitude_prune
from rose_hf.sparsegpt import (
    HessianError,
    all_finite,
    apply_order,
    default_blocks,
    dense_target_weights,
    inverse_hessian_factor,
    reconstruction_error,
    sparsegpt_prune,
    undo_order,
)


def test_default_blocks_cover_ragged_width():
    assert default_blocks(576, 128) == (128, 128, 128, 128, 64)
    assert default_blocks(256, 128) == (128, 128)


@pytest.mark.parametrize("blocksize", [8, 16, 40, 64])
def test_blocked_matches_naive_reference(problem, blocksize):
    W, _, H = problem
    got = sparsegpt_prune(W, H, 0.6, blocksize=blocksize).weight
    want = naive_sparsegpt(W, H, 0.6, blocksize)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("n", "m", "blocksize"), [(2, 4, 8), (2, 4, 32), (3, 6, 24), (1, 8, 48)])
def test_blocked_matches_naive_reference_nm(n, m, blocksize):
    W, _, H = correlated_problem(24, 48, 256, seed=5)
    got = sparsegpt_prune(W, H, 0.5, n=n, m=m, blocksize=blocksize).weight
    want = naive_sparsegpt(W, H, 0.5, blocksize, n=n, m=m)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_permuted_run_equals_naive_on_permuted_problem(problem):
    W, _, H = problem
    perm = torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(3))
    got = sparsegpt_prune(W, H, 0.5, blocksize=16, perm=perm, blocks=(16, 16, 8)).weight
    Wp, Hp = apply_order(W, H, perm)
    want = undo_order(naive_sparsegpt(Wp, Hp, 0.5, 16), perm)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.8])
def test_exact_sparsity_per_block(problem, sparsity):
    W, _, H = problem
    result = sparsegpt_prune(W, H, sparsity, blocksize=16)
    for start, width in zip((0, 16, 32), (16, 16, 8)):
        block = result.mask[:, start : start + width]
        assert int(block.sum()) == int(sparsity * block.numel() + 0.5)
    assert torch.equal(result.weight == 0, result.mask)


def test_nm_pattern_is_exact(problem):
    W, _, H = problem
    result = sparsegpt_prune(W, H, 0.5, n=2, m=4, blocksize=16)
    zeros = (result.weight == 0).reshape(W.shape[0], -1, 4).sum(dim=2)
    assert (zeros == 2).all()


def test_inputs_are_not_modified(problem):
    W, _, H = problem
    W0, H0 = W.clone(), H.clone()
    sparsegpt_prune(W, H, 0.6, blocksize=16, perm=torch.arange(W.shape[1]).flip(0))
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_dead_inputs_are_zeroed_without_nan(problem):
    W, X, _ = problem
    X = X.clone()
    X[:, 5] = 0.0
    H = 2.0 / X.shape[0] * X.T @ X
    result = sparsegpt_prune(W, H, 0.5, blocksize=16)
    assert torch.isfinite(result.weight).all()
    assert (result.weight[:, 5] == 0).all()


def test_inverse_factor_is_the_upper_cholesky_of_the_dampened_inverse():
    _, X, _ = correlated_problem(8, 96, 400, seed=11)
    H = 2.0 / X.shape[0] * X.T @ X
    U, dead, scale = inverse_hessian_factor(H, 0.01)
    Hd = H.double() + 0.01 * H.diagonal().double().mean() * torch.eye(96, dtype=torch.float64)
    want = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert scale == 1.0 and not dead.any()
    assert torch.equal(U, U.triu()) and (U.diagonal() > 0).all()
    torch.testing.assert_close(U.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_all_finite_survives_an_overflowing_sum():
    big = torch.full((4, 4), 3e38)
    assert all_finite(big)  # the sum overflows; every entry is finite
    big[2, 3] = float("inf")
    assert not all_finite(big)
    assert not all_finite(torch.tensor([1.0, float("nan")]))


def test_ill_conditioned_hessian_retries_with_more_damping():
    cols = 12
    H = torch.eye(cols)
    H[0, 0] = -0.05  # one slightly negative eigenvalue: 0.01 * mean(diag) cannot fix it, 0.1 can
    U, dead, scale = inverse_hessian_factor(H, 0.01)
    assert scale == pytest.approx(10.0)
    assert torch.isfinite(U).all() and not dead.any()


def test_hopeless_hessian_raises_with_advice():
    with pytest.raises(HessianError, match="more calibration samples"):
        inverse_hessian_factor(-torch.eye(6), 0.01)
    bad = torch.eye(4)
    bad[1, 1] = float("nan")
    with pytest.raises(HessianError, match="NaN or inf"):
        inverse_hessian_factor(bad, 0.01)


def test_shape_errors_name_the_shapes(problem):
    W, _, H = problem
    with pytest.raises(ValueError, match=r"expected \(40, 40\)"):
        sparsegpt_prune(W, H[:10, :10], 0.5)
    with pytest.raises(ValueError, match="multiple of M=3"):
        sparsegpt_prune(W, H, 0.5, n=1, m=3)


def test_reconstruction_error_equals_output_error(problem):
    W, X, H = problem
    result = sparsegpt_prune(W, H, 0.6, blocksize=16)
    absolute, relative = reconstruction_error(W, result.weight, H)
    direct = ((W - result.weight) @ X.T).pow(2).sum().item() / X.shape[0]
    dense = (W @ X.T).pow(2).sum().item() / X.shape[0]
    assert absolute == pytest.approx(direct, rel=1e-4)
    assert relative == pytest.approx(direct / dense, rel=1e-4)


def test_sparsegpt_beats_magnitude_on_layer_error():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(256, 40, generator=g) @ torch.randn(40, 40, generator=g)  # strongly correlated
    H = 2.0 / 256 * X.T @ X
    W = torch.randn(24, 40, generator=g)
    sgpt = reconstruction_error(W, sparsegpt_prune(W, H, 0.6, blocksize=16).weight, H)[1]
    mag = reconstruction_error(W, magnitude_prune(W, 0.6)[0], H)[1]
    assert sgpt < 0.8 * mag


def test_deterministic(problem):
    W, _, H = problem
    a = sparsegpt_prune(W, H, 0.6, blocksize=16).weight
    b = sparsegpt_prune(W, H, 0.6, blocksize=16).weight
    assert torch.equal(a, b)


def test_block_errors_grow_to_the_final_error(problem):
    W, _, H = problem
    result = sparsegpt_prune(W, H, 0.6, blocksize=16, track_error=True)
    assert len(result.block_errors) == 3
    assert all(a <= b + 1e-6 for a, b in zip(result.block_errors, result.block_errors[1:]))
    assert result.block_errors[-1] == pytest.approx(reconstruction_error(W, result.weight, H)[0], rel=1e-4)
    assert sparsegpt_prune(W, H, 0.6, blocksize=16).block_errors == ()


def test_dense_target_weights_are_w_where_inputs_agree_and_least_squares_otherwise():
    W, X, H = correlated_problem(12, 20, 400, seed=7)
    assert torch.equal(dense_target_weights(W, H, torch.zeros_like(H), 0.01), W)  # X_d = X: nothing to correct
    Xd = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(8))
    C = 2.0 / X.shape[0] * X.T @ (Xd - X)
    target = dense_target_weights(W, H, C, 1e-9)
    expected = torch.linalg.lstsq(X.double(), (Xd @ W.T).double()).solution.T.float()
    torch.testing.assert_close(target, expected, rtol=1e-3, atol=1e-4)
    # The point of it: pruned inputs through the target reproduce the dense outputs better than W does.
    assert ((X @ target.T - Xd @ W.T) ** 2).sum() < ((X @ W.T - Xd @ W.T) ** 2).sum()


def test_a_larger_correction_damp_shrinks_the_dense_target_towards_w():
    W, X, H = correlated_problem(12, 20, 400, seed=9)
    Xd = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(10))
    C = 2.0 / X.shape[0] * X.T @ (Xd - X)
    moves = [float((dense_target_weights(W, H, C, damp) - W).norm()) for damp in (0.01, 1.0, 100.0)]
    assert moves[0] > moves[1] > moves[2] > 0
