"""ADMM over mask and weights (rose_hf.admm): the projection, the guarantees, brute force, the pipeline."""

import itertools

import pytest
import torch

from conftest import correlated_problem
from rose_hf.admm import admm_prune, project
from rose_hf.refit import refit_weights, row_errors
from rose_hf.sparsegpt import sparsegpt_prune


def _error(W, B, H):
    """Undamped layer error ``sum_i (b_i - w_i) H (b_i - w_i)^T`` in float64."""
    D = B.double() - W.double()
    return float(((D @ H.double()) * D).sum())


def _best_over_every_mask(W, H, keep, percdamp=0.01):
    """Brute force: least squares on each of the C(rows * cols, keep) supports, the lowest error."""
    rows, cols = W.shape
    Hd = H.double() + percdamp * float(torch.diagonal(H).mean()) * torch.eye(cols, dtype=torch.float64)
    best = float("inf")
    for support in itertools.combinations(range(rows * cols), keep):
        mask = torch.zeros(rows * cols, dtype=torch.bool)
        mask[list(support)] = True
        B = torch.zeros(rows, cols, dtype=torch.float64)
        for i, row in enumerate(mask.reshape(rows, cols)):
            S = row.nonzero().flatten()
            if S.numel():
                B[i, S] = torch.linalg.solve(Hd[S][:, S], (Hd @ W[i].double())[S])
        best = min(best, _error(W, B, H))
    return best


def test_project_keeps_the_k_largest_magnitudes_of_the_whole_matrix():
    B = torch.tensor([[0.1, -5.0, 0.3], [4.0, -0.2, 2.0]])
    assert project(B, 3).tolist() == [[False, True, False], [True, False, True]]
    assert project(B, 0).sum() == 0 and project(B, 6).all()


def test_project_nm_keeps_n_of_every_m_in_each_row():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(8, 16, generator=g)
    mask = project(B, 0, n=2, m=4)
    groups = mask.reshape(8, 4, 4)
    assert (groups.sum(dim=2) == 2).all()
    magnitude = B.abs().reshape(8, 4, 4)
    kept_min = torch.where(groups, magnitude, torch.inf).amin(dim=2)
    dropped_max = torch.where(groups, -torch.inf, magnitude).amax(dim=2)
    assert (kept_min >= dropped_max).all()  # the two largest of each group


@pytest.mark.parametrize("seed", range(6))
def test_with_identity_hessian_admm_moves_a_random_mask_to_near_the_best_k_sparse_matrix(seed):
    """With ``H = I`` the best k-sparse matrix keeps the k largest ``|W|``; ADMM from a random
    mask ends within 3 % of its error (measured: exact on 2 of these 6 seeds, at most 1.8 % off)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 10, generator=g)
    start = W * (torch.rand(6, 10, generator=g) < 0.4)
    keep = int((start != 0).sum())
    got = admm_prune(W, torch.eye(10), start).weight
    best = _error(W, W * project(W, keep), torch.eye(10))
    assert best <= _error(W, got, torch.eye(10)) <= 1.03 * best
    assert _error(W, start, torch.eye(10)) > 4 * best


@pytest.mark.parametrize(("seed", "columnar", "pattern"), [(0, False, None), (1, True, None), (2, False, "2:4")])
def test_admm_keeps_the_budget_lowers_the_error_below_the_refit_and_leaves_inputs_alone(seed, columnar, pattern):
    W, _, H = correlated_problem(32, 64, 256, seed=seed, columnar=columnar)
    n, m = (2, 4) if pattern else (0, 0)
    start = sparsegpt_prune(W, H, 0.5 if pattern else 0.7, n=n, m=m, blocksize=16).weight
    W0, H0, S0 = W.clone(), H.clone(), start.clone()
    result = admm_prune(W, H, start, n=n, m=m)
    assert not result.kept_start and result.support_moved > 0.01  # the mask really moved
    assert int((result.weight != 0).sum()) == int((start != 0).sum())
    if pattern:
        assert ((result.weight != 0).reshape(32, 16, 4).sum(dim=2) <= 2).all()
    refit = refit_weights(W, H, start)  # the best weights on the method's own mask
    assert _error(W, result.weight, H) < 0.95 * _error(W, refit, H)
    assert torch.equal(W, W0) and torch.equal(H, H0) and torch.equal(start, S0)


def test_admm_returns_the_start_when_it_cannot_do_better():
    W, _, H = correlated_problem(8, 16, 64, seed=3)
    start = sparsegpt_prune(W, H, 0.5, blocksize=16).weight
    best = admm_prune(W, H, start).weight
    again = admm_prune(W, H, best, iters=1)  # one step from an already refined point
    assert _error(W, again.weight, H) <= _error(W, best, H) * (1 + 1e-6)
    assert (row_errors(W, again.weight, H).sum() <= row_errors(W, best, H).sum() * (1 + 1e-6)).item()


def test_admm_reaches_the_brute_force_optimum_on_many_small_problems():
    """2 x 6 weights, 6 kept: every one of the 924 supports solved exactly (by the damped least
    squares that ADMM and the re-fit solve, so ADMM's undamped error may sit just under it).
    Measured with this schedule: the start is 1.1-8.9 times the optimum; ADMM with the re-fit
    reaches it on 6 of 10 and is at most 1.38 times it, without the re-fit (the default) at most
    1.50 times and within 1.1 times on 8 of 10."""
    reached, close = 0, 0
    for seed in range(10):
        W, _, H = correlated_problem(2, 6, 32, seed=seed, columnar=seed % 2 == 1)
        start = sparsegpt_prune(W, H, 0.5, blocksize=2).weight
        best = _best_over_every_mask(W, H, int((start != 0).sum()))
        refitted = _error(W, admm_prune(W, H, start, refit_iters=50).weight, H)
        plain = _error(W, admm_prune(W, H, start).weight, H)
        assert 0.99 * best <= refitted <= min(1.4 * best, _error(W, start, H)), seed
        assert 0.99 * best <= plain <= min(1.55 * best, _error(W, start, H)), seed
        reached += refitted <= 1.001 * best
        close += plain <= 1.1 * best
    assert reached >= 5 and close >= 7


def test_refine_admm_in_the_pipeline_lowers_every_modules_error_and_keeps_each_budget():
    from rose_hf import RoseConfig, RosePruner
    from zoo import build, calibration

    def block0(config):
        report = RosePruner(build("llama"), config).prune(calibration(), progress=False)
        return {m.name: m for m in report.modules if m.name.startswith("model.layers.0.")}

    for extra in ({"sparsity": 0.7}, {"pattern": "2:4"}):
        plain = block0(RoseConfig(blocksize=32, refine="none", **extra))
        admm = block0(RoseConfig(blocksize=32, refine="admm", **extra))
        for name, row in plain.items():  # block 0: the same inputs, so the same Hessians
            assert admm[name].error <= row.error * (1 + 1e-6), name
            assert abs(admm[name].sparsity - row.sparsity) <= 1e-9, name
        assert sum(r.error for r in admm.values()) < 0.9 * sum(r.error for r in plain.values())
