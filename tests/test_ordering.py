import pytest
import torch

from conftest import correlated_problem
from rose_hf.masks import smallest_mask
from rose_hf.ordering import prepruned_losses, prepruning_scores, relative_range, rose_decision, rose_order
from rose_hf.sparsegpt import apply_order, invert_permutation, reconstruction_error, sparsegpt_prune, undo_order


def test_prepruned_losses_worked_example():
    column, block = prepruned_losses(torch.tensor([[1.0, 5.0, 2.0, 8.0]]), 0.5, 2)
    assert column.tolist() == [1.0, 0.0, 2.0, 0.0]
    assert block.tolist() == [1.0, 2.0]


def test_prepruned_losses_ragged_last_block():
    S = torch.arange(1.0, 11.0).reshape(1, 10)
    column, block = prepruned_losses(S, 0.5, 4)
    assert block.numel() == 3  # blocks of 4, 4, 2
    assert column.tolist() == [1, 2, 0, 0, 5, 6, 0, 0, 9, 0]
    assert block.tolist() == [3.0, 11.0, 9.0]


def _nm_reference(scores, n, m):
    """Prune the m - n smallest of each group of m by a stable sort: ties to the lower index."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for row in range(scores.shape[0]):
        for start in range(0, scores.shape[1], m):
            order = torch.sort(scores[row, start : start + m], stable=True).indices
            mask[row, start + order[: m - n]] = True
    return mask


@pytest.mark.parametrize(("cols", "n", "m"), [(44, 0, 0), (48, 0, 0), (48, 2, 4)])
def test_prepruned_losses_equal_block_by_block_selection_with_ties(cols, n, m):
    # Integer scores: many ties, which must go to the lower row-major index inside each block.
    S = torch.randint(0, 4, (6, cols), generator=torch.Generator().manual_seed(cols + m)).float()
    column, block = prepruned_losses(S, 0.6, 8, n=n, m=m)
    want = []
    for part in S.split(8, dim=1):
        mask = _nm_reference(part, n, m) if m else smallest_mask(part, 0.6)
        want.append((part * mask).sum(dim=0))
    assert torch.equal(column, torch.cat(want))
    assert torch.equal(block, torch.stack([w.sum() for w in want]))


def test_rose_order_worked_example():
    order = rose_order(torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([1.0, 2.0]), 2)
    assert order.perm.tolist() == [2, 3, 0, 1]
    assert order.blocks == (2, 2)


def test_rose_order_keeps_short_block_whole():
    column = torch.tensor([0.0, 1, 0, 0, 0, 0, 0, 0, 5, 4])
    order = rose_order(column, torch.tensor([1.0, 0.0, 9.0]), 4)
    assert order.perm.tolist()[:2] == [8, 9]
    assert order.blocks == (2, 4, 4)
    assert sorted(order.perm.tolist()) == list(range(10))


def test_rose_order_nm_moves_whole_aligned_groups():
    g = torch.Generator().manual_seed(0)
    column = torch.rand(16, generator=g)
    order = rose_order(column, torch.tensor([1.0, 3.0]), 8, m=4)
    groups = order.perm.reshape(-1, 4)
    for group in groups:
        assert len({int(c) // 4 for c in group}) == 1  # one original group per processing group
    assert groups[0].min() >= 8  # the heavier block goes first


def test_apply_and_undo_order_round_trip():
    g = torch.Generator().manual_seed(1)
    W, H = torch.randn(5, 7, generator=g), torch.randn(7, 7, generator=g)
    perm = torch.randperm(7, generator=g)
    Wp, Hp = apply_order(W, H, perm)
    assert torch.equal(Wp[:, 0], W[:, perm[0]]) and Hp[1, 2] == H[perm[1], perm[2]]
    assert torch.equal(undo_order(Wp, perm), W)
    assert torch.equal(perm[invert_permutation(perm)], torch.arange(7))


def test_relative_range():
    assert relative_range(torch.tensor([4.0, 1.0, 2.0])) == pytest.approx(0.75)
    assert relative_range(torch.tensor([0.0, 0.0])) == 0.0
    assert relative_range(torch.tensor([3.0])) == 0.0


def test_paper_score_is_weight_times_input_norm():
    W, X, H = correlated_problem(4, 6, 50, seed=2)
    want = W.abs() * X.norm(dim=0)
    got = prepruning_scores(W, H)
    torch.testing.assert_close(got / got.max(), want / want.max())


def test_gate_modes():
    W, _, H = correlated_problem(16, 32, 128, seed=3, columnar=True)
    auto = rose_decision(W, H, 0.5, 8, threshold=0.5)
    assert auto.relative_range > 0.5 and auto.order is not None
    assert rose_decision(W, H, 0.5, 8, threshold=0.99).order is None
    assert rose_decision(W, H, 0.5, 8, mode="never").order is None
    flat = correlated_problem(16, 32, 128, seed=3)
    assert rose_decision(*flat[::2], 0.5, 8, mode="always").order is not None


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("score", ["paper", "obs"])
def test_rose_beats_left_to_right_on_columnar_layer(seed, score):
    W, _, H = correlated_problem(64, 64, 512, seed=seed, columnar=True)
    decision = rose_decision(W, H, 0.7, 16, score=score)
    assert decision.order is not None
    rose = sparsegpt_prune(W, H, 0.7, blocksize=16, perm=decision.order.perm, blocks=decision.order.blocks)
    base = sparsegpt_prune(W, H, 0.7, blocksize=16)
    rose_err = reconstruction_error(W, rose.weight, H)[1]
    base_err = reconstruction_error(W, base.weight, H)[1]
    assert rose_err < 0.85 * base_err
    assert int(rose.mask.sum()) == int(base.mask.sum())


def test_rose_nm_end_to_end_keeps_pattern_in_original_order():
    W, _, H = correlated_problem(32, 64, 256, seed=4, columnar=True)
    decision = rose_decision(W, H, 0.5, 16, n=2, m=4, mode="always")
    assert decision.order is not None
    result = sparsegpt_prune(W, H, 0.5, n=2, m=4, blocksize=16, perm=decision.order.perm, blocks=decision.order.blocks)
    zeros = (result.weight == 0).reshape(32, -1, 4).sum(dim=2)
    assert (zeros == 2).all()


def test_short_last_block_alone_does_not_open_the_gate():
    # Uniform scores: every column is equally important, so nothing is columnar.
    W, H = torch.ones(8, 36), torch.eye(36)
    decision = rose_decision(W, H, 0.5, 16)  # blocks of 16, 16, 4
    _, sums = prepruned_losses(prepruning_scores(W, H), 0.5, 16)
    assert relative_range(sums) == pytest.approx(0.75)  # the paper's sums would open the gate
    assert decision.relative_range == pytest.approx(0.0) and decision.order is None
