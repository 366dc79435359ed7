import pytest
import torch

from rose_hf.masks import count_for, nm_mask, smallest_k, smallest_mask


def test_count_rounds_half_up():
    assert count_for(0.5, 5) == 3
    assert count_for(0.6, 10) == 6
    assert count_for(1.0, 7) == 7


def test_smallest_mask_worked_example():
    mask = smallest_mask(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), 0.5)
    assert mask.tolist() == [[False, True], [True, False]]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.77])
def test_smallest_mask_exact_count(fraction):
    scores = torch.rand(13, 17, generator=torch.Generator().manual_seed(1))
    mask = smallest_mask(scores, fraction)
    assert int(mask.sum()) == count_for(fraction, 13 * 17)
    if mask.any() and (~mask).any():
        assert scores[mask].max() <= scores[~mask].min()
    rows = smallest_mask(scores, fraction, per_row=True)
    assert (rows.sum(dim=1) == count_for(fraction, 17)).all()


@pytest.mark.parametrize("k", [0, 1, 5, 11, 12])
def test_smallest_k_matches_a_stable_sort_with_ties_and_nan(k):
    # Few distinct values force ties at the threshold; a NaN must count as the largest.
    scores = torch.randint(0, 4, (5, 12), generator=torch.Generator().manual_seed(3)).float()
    scores[2, 0] = float("nan")
    expected = torch.zeros_like(scores, dtype=torch.bool)
    order = torch.argsort(torch.nan_to_num(scores, nan=torch.inf), dim=1, stable=True)[:, :k]
    expected.scatter_(1, order, True)
    assert torch.equal(smallest_k(scores, k), expected)


def test_nm_mask_keeps_n_largest_of_each_group():
    assert nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4).tolist() == [[False, True, False, True]]
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(2))
    mask = nm_mask(scores, 2, 4).reshape(6, 4, 4)
    assert (mask.sum(dim=2) == 2).all()


@pytest.mark.parametrize("seed", range(3))
def test_nm_mask_breaks_ties_to_the_lower_index_and_counts_nan_as_largest(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (7, 24), generator=g).float()  # many ties
    scores[torch.rand(7, 24, generator=g) < 0.1] = float("nan")
    want = torch.zeros_like(scores, dtype=torch.bool)
    for row in range(7):
        for start in range(0, 24, 4):
            group = torch.nan_to_num(scores[row, start : start + 4], nan=float("inf"))
            want[row, start + torch.sort(group, stable=True).indices[:2]] = True
    assert torch.equal(nm_mask(scores, 2, 4), want)
    assert nm_mask(torch.ones(1, 8), 1, 8).tolist() == [[True] * 7 + [False]]


def test_nm_mask_rejects_ragged_width():
    with pytest.raises(ValueError, match="groups of M=4"):
        nm_mask(torch.rand(2, 6), 2, 4)
