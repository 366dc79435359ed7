import pytest
import torch

from conftest import correlated_problem
from rose_hf.refit import refit_weights, row_errors
from rose_hf.sparsegpt import sparsegpt_prune


def _least_squares_per_row(W, H, keep, percdamp):
    """The definition, one row at a time: solve (H + λI)_SS v_S = ((H + λI) w)_S in float64."""
    Hd = H.double() + percdamp * float(torch.diagonal(H).mean()) * torch.eye(H.shape[0], dtype=torch.float64)
    out = torch.zeros_like(W, dtype=torch.float64)
    for i in range(W.shape[0]):
        S = keep[i].nonzero().flatten()
        if S.numel():
            out[i, S] = torch.linalg.solve(Hd[S][:, S], (Hd @ W[i].double())[S])
    return out


@pytest.mark.parametrize(("seed", "columnar", "sparsity"), [(0, False, 0.5), (1, True, 0.7), (2, False, 0.8)])
def test_refit_is_the_least_squares_solution_on_the_kept_support(seed, columnar, sparsity):
    W, _, H = correlated_problem(12, 40, 256, seed=seed, columnar=columnar)
    pruned = sparsegpt_prune(W, H, sparsity, blocksize=16).weight
    got = refit_weights(W, H, pruned, iters=120)
    want = _least_squares_per_row(W, H, pruned != 0, 0.01)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_refit_keeps_the_mask_and_never_raises_a_rows_layer_error(seed):
    W, _, H = correlated_problem(16, 48, 96, seed=seed, columnar=seed % 2 == 1)
    pruned = sparsegpt_prune(W, H, 0.7, blocksize=16).weight
    W0, H0, P0 = W.clone(), H.clone(), pruned.clone()
    refit = refit_weights(W, H, pruned, iters=10)  # few iterations: the guard still holds
    assert torch.equal((refit == 0), (pruned == 0))
    assert (row_errors(W, refit, H) <= row_errors(W, pruned, H)).all()
    assert row_errors(W, refit, H).sum() < 0.99 * row_errors(W, pruned, H).sum()  # and it helps
    assert torch.equal(W, W0) and torch.equal(H, H0) and torch.equal(pruned, P0)  # inputs untouched


def test_refit_with_identity_hessian_restores_the_dense_kept_weights():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 8, generator=g)
    pruned = W * (torch.rand(5, 8, generator=g) > 0.5)
    pruned[2] = 0.0  # a row with nothing kept stays empty
    torch.testing.assert_close(refit_weights(W, torch.eye(8), pruned), W * (pruned != 0))


def _block0(config):
    from rose_hf import RosePruner
    from zoo import build, calibration

    model = build("llama")
    report = RosePruner(model, config).prune(calibration(), progress=False)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("model.layers.0.")}
    return {m.name: m for m in report.modules if m.name.startswith("model.layers.0.")}, weights


def test_refine_refit_lowers_no_modules_error_and_keeps_every_mask():
    from rose_hf import RoseConfig

    plain, plain_weights = _block0(RoseConfig(sparsity=0.7, blocksize=32, refine="none"))
    refit, refit_weights_ = _block0(RoseConfig(sparsity=0.7, blocksize=32, refine="refit"))
    for name, row in plain.items():  # block 0: the same inputs, so the same Hessians
        assert refit[name].error <= row.error * (1 + 1e-6), name
        assert torch.equal(refit_weights_[name + ".weight"] == 0, plain_weights[name + ".weight"] == 0), name
    assert sum(r.error for r in refit.values()) < 0.95 * sum(r.error for r in plain.values())


def test_reorder_best_keeps_the_order_with_the_lower_layer_error():
    from rose_hf import RoseConfig

    runs = {
        mode: _block0(RoseConfig(sparsity=0.7, blocksize=16, reorder=mode, refine="none"))
        for mode in ("always", "never", "best")
    }
    chosen = set()
    for name, best in runs["best"][0].items():
        always, never = runs["always"][0][name], runs["never"][0][name]
        winner = "always" if always.error <= never.error else "never"
        assert best.reordered == (winner == "always") and best.error == runs[winner][0][name].error, name
        assert torch.equal(runs["best"][1][name + ".weight"], runs[winner][1][name + ".weight"]), name
        chosen.add(winner)
    assert chosen  # (which one wins per module is the data's business)


def test_refine_needs_calibration_and_the_layer_objective():
    from rose_hf import RoseConfig

    with pytest.raises(ValueError, match="refine='refit' needs calibration inputs"):
        RoseConfig(method="magnitude", refine="refit")
    with pytest.raises(ValueError, match="refine='refit' needs calibration inputs"):
        RoseConfig(objective="dense", refine="refit")
