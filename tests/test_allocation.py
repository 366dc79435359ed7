"""Per-block sparsity (OWL's and the error rule): the pure math, and the plans that measure the dense model."""

import pytest
import torch

from rose_hf import RoseConfig, RosePruner
from rose_hf.allocation import allocate_sparsities, outlier_ratio, pruned_share
from rose_hf.plans import ColumnSums, ErrorPlan, OutlierPlan
from zoo import build, calibration


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    assert outlier_ratio([torch.tensor([1.0, 1, 1, 1]), torch.tensor([16.0])], M=3) == pytest.approx(0.2)
    assert outlier_ratio([torch.ones(10)], M=1) == 0.0  # none is above the mean itself


def test_pruned_share_is_the_smallest_squares_of_each_row_over_the_total():
    assert pruned_share([torch.tensor([[1.0, 2.0], [3.0, 4.0]])], 0.5) == pytest.approx(10 / 30)
    # parameter-weighted over modules: 1/3 for the 4-entry module, 1/2 for the 2-entry one
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0]])
    assert pruned_share([a, b], 0.5) == pytest.approx((4 * 10 / 30 + 2 * 0.5) / 6)
    assert pruned_share([a], 0.0) == 0.0 and pruned_share([a], 1.0) == pytest.approx(1.0)


def test_allocated_sparsities_keep_the_parameter_weighted_mean_and_order():
    ratios = torch.tensor([0.01, 0.05, 0.02, 0.09])
    sizes = torch.tensor([100, 300, 100, 500])
    s = allocate_sparsities(ratios, sizes, target=0.7, lam=0.08)
    assert float((s * sizes).sum() / sizes.sum()) == pytest.approx(0.7, abs=1e-12)
    assert torch.equal(torch.argsort(s), torch.argsort(-ratios))  # more outliers, less sparsity
    assert float(s.max() - s.min()) == pytest.approx(0.16)  # the spread is 2 * lambda
    # Near the top the shift moves, rather than clipping, so the mean stays exact.
    high = allocate_sparsities(ratios, sizes, target=0.95, lam=0.08, max_sparsity=0.99)
    assert float(high.max()) <= 0.99 and float((high * sizes).sum() / sizes.sum()) == pytest.approx(0.95, abs=1e-12)
    flat = allocate_sparsities(torch.full((3,), 0.02), torch.tensor([1, 2, 3]), target=0.6, lam=0.08)
    assert torch.allclose(flat, torch.full((3,), 0.6, dtype=torch.float64))


def test_column_sums_match_the_module_inputs_by_hand_over_real_tokens():
    model = build("llama").eval()
    ids = calibration(count=2)
    masks = [torch.ones(1, ids.shape[1], dtype=torch.long), torch.ones(1, ids.shape[1], dtype=torch.long)]
    masks[1][0, :5] = 0  # left padding: those tokens are not calibration
    up = model.model.layers[1].mlp.up_proj
    seen = []
    handle = up.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad(), ColumnSums({"up": up}) as sums:
        for row, mask in zip(ids, masks):
            sums.mask = mask
            model(row[None], attention_mask=mask)
    handle.remove()
    want = torch.cat([x[m.reshape(-1).bool()] for x, m in zip(seen, masks)]).float().pow(2).sum(0).sqrt()
    assert torch.allclose(sums.norms()["up"], want, rtol=1e-5)
    assert not up._forward_pre_hooks  # the hooks are gone
    with pytest.raises(RuntimeError, match="never reached"):
        ColumnSums({"down": model.model.layers[0].mlp.down_proj}).norms()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_owl_prunes_blocks_unevenly_with_the_target_overall(arch):
    model = build(arch)
    plan = OutlierPlan(lam=0.1)
    report = RosePruner(model, RoseConfig(sparsity=0.6, blocksize=32), plan=plan).prune(calibration(), progress=False)
    assert report.overall_sparsity == pytest.approx(0.6, abs=0.005)  # parameter-weighted, as planned
    per_block = {}
    for m in report.modules:
        per_block.setdefault(m.name.split(".")[-3], []).append(m.sparsity)
    means = [sum(v) / len(v) for v in per_block.values()]
    assert max(means) - min(means) > 0.1  # the plan did move sparsity between blocks
    assert len(plan.ratios) == len(per_block)
    assert report.plan_seconds > 0


def test_allocation_owl_is_a_config_field_and_is_refused_where_it_cannot_apply():
    uniform = RosePruner(build("llama"), RoseConfig(sparsity=0.6, blocksize=32)).prune(calibration(), progress=False)
    owl = RosePruner(build("llama"), RoseConfig(sparsity=0.6, blocksize=32, allocation="owl", owl_lambda=0.1)).prune(
        calibration(), progress=False
    )
    assert {round(m.sparsity, 2) for m in uniform.modules} == {0.6}
    assert len({round(m.sparsity, 2) for m in owl.modules}) > 1
    with pytest.raises(ValueError, match="allocation='owl' shares an unstructured sparsity"):
        RoseConfig(pattern="2:4", allocation="owl")
    with pytest.raises(ValueError, match="method='magnitude' has none"):
        RoseConfig(method="magnitude", allocation="owl")
    with pytest.raises(ValueError, match="owl_lambda=0.6 must be in"):
        RoseConfig(allocation="owl", owl_lambda=0.6)


def test_error_plan_prunes_less_where_more_score_mass_would_go():
    model = build("llama")
    plan = ErrorPlan(lam=0.1)
    report = RosePruner(model, RoseConfig(sparsity=0.6, blocksize=32), plan=plan).prune(calibration(), progress=False)
    assert report.overall_sparsity == pytest.approx(0.6, abs=0.005)  # parameter-weighted, as planned
    per_block = {}
    for m in report.modules:
        per_block.setdefault(".".join(m.name.split(".")[:3]), []).append(m.sparsity)
    means = {block: sum(v) / len(v) for block, v in per_block.items()}
    assert set(means) == set(plan.statistics)
    most, least = max(plan.statistics, key=plan.statistics.get), min(plan.statistics, key=plan.statistics.get)
    assert means[most] < means[least] - 0.1  # the block that would lose most is pruned least
    config = RoseConfig(sparsity=0.6, blocksize=32, allocation="error", owl_lambda=0.1)
    again = RosePruner(build("llama"), config).prune(calibration(), progress=False)  # the config field
    assert [m.sparsity for m in again.modules] == [m.sparsity for m in report.modules]
