import pytest
import torch

from rose_hf.data import as_batches, calibration_batches, count_tokens, fingerprint, sample_windows


def test_as_batches_accepts_what_users_pass():
    ids = torch.arange(12).reshape(3, 4)
    assert [b["input_ids"].shape for b in as_batches(ids)] == [(1, 4)] * 3
    assert as_batches(torch.arange(5))[0]["input_ids"].shape == (1, 5)
    assert as_batches([[1, 2, 3]])[0]["input_ids"].tolist() == [[1, 2, 3]]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    assert [b["input_ids"].shape for b in as_batches(x for (x,) in loader)] == [(2, 4), (1, 4)]
    dicts = [{"input_ids": ids[:2], "attention_mask": torch.ones(2, 4, dtype=torch.long), "labels": ids[:2]}]
    batch = as_batches(dicts)[0]
    assert set(batch) == {"input_ids", "attention_mask"} and count_tokens([batch]) == 8


@pytest.mark.parametrize(
    ("calib", "message"),
    [
        ("some text", "type str is not supported"),
        (torch.zeros(2, 2, 2, dtype=torch.long), r"must be \(samples, seq\)"),
        ([torch.rand(1, 4)], "holds floats"),
        ([{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 3)}], "does not match"),
        ([], "empty"),
    ],
)
def test_as_batches_rejects_bad_input(calib, message):
    with pytest.raises(ValueError, match=message):
        as_batches(calib)


def test_sample_windows_are_seeded_and_leave_the_global_rng_alone():
    ids = torch.arange(1000)
    state = torch.get_rng_state()
    a, b = sample_windows(ids, 8, 16, seed=3), sample_windows(ids, 8, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (8, 16)
    assert not torch.equal(a, sample_windows(ids, 8, 16, seed=4))
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 16)) for row in a)


def test_sample_windows_errors_name_the_fix():
    with pytest.raises(ValueError, match="too few for windows of seqlen=64"):
        sample_windows(torch.arange(10), 2, 64)
    with pytest.raises(ValueError, match="must both be positive"):
        sample_windows(torch.arange(10), 0, 4)


def test_fingerprint_tracks_tokens():
    a = as_batches(torch.arange(8).reshape(2, 4))
    assert fingerprint(a) == fingerprint(as_batches(torch.arange(8).reshape(2, 4)))
    assert fingerprint(a) != fingerprint(as_batches(torch.arange(1, 9).reshape(2, 4)))


def test_tokenised_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 5, "attention_mask": [[1, 1, 1, 0]] * 5}).save_to_disk(
        str(tmp_path / "tok")
    )
    batches = calibration_batches(None, str(tmp_path / "tok"), nsamples=3, seqlen=4)
    assert len(batches) == 3 and count_tokens(batches) == 9


def test_unique_ids_of_batches():
    from rose_hf.data import unique_ids

    batches = [{"input_ids": torch.tensor([[5, 1, 5]])}, {"input_ids": torch.tensor([[2, 1]])}]
    assert unique_ids(batches).tolist() == [1, 2, 5]
