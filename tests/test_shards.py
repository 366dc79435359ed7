import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rose_hf.activations import Activations
from rose_hf.shards import copy_tensors, read_header, read_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_read_rows_matches_safetensors(tmp_path, dtype):
    table = torch.randn(50, 7).to(dtype)
    save_file({"other": torch.ones(3), "table": table}, str(tmp_path / "t.safetensors"))
    rows = torch.tensor([0, 1, 2, 9, 31, 32, 49])  # runs of consecutive rows and single rows
    got = read_rows(tmp_path / "t.safetensors", "table", rows)
    assert got.dtype == dtype and torch.equal(got, table[rows])
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        read_rows(tmp_path / "t.safetensors", "table", torch.tensor([50]))


def test_copy_tensors_is_a_valid_byte_exact_safetensors_file(tmp_path):
    a = {"a.weight": torch.randn(4, 3).to(torch.bfloat16), "scalar": torch.tensor(2.5)}
    b = {"b.ids": torch.arange(5), "b.mask": torch.tensor([True, False, True])}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    sources = {name: tmp_path / "a.safetensors" for name in a} | {name: tmp_path / "b.safetensors" for name in b}
    copy_tensors(sources, tmp_path / "out.safetensors", metadata={"format": "pt"})
    start, header = read_header(tmp_path / "out.safetensors")
    assert start % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(sources)
        for name, value in (a | b).items():
            got = handle.get_tensor(name)
            assert got.dtype == value.dtype and torch.equal(got, value), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_on_disk_round_trip_and_clean_up(tmp_path, dtype):
    values = [torch.randn(1, 5, 3).to(dtype), torch.randn(2, 4, 3).to(dtype)]
    with Activations("disk", torch.device("cpu"), tmp_path) as store:
        for value in values:
            store.append(value)
        assert len(store) == 2 and len(list(tmp_path.iterdir())) == 1
        assert all(torch.equal(store[k], values[k]) and store[k].dtype == dtype for k in range(2))
        store[0] = values[1] * 2  # replaced, with another shape
        assert torch.equal(store[0], values[1] * 2) and torch.equal(store[1], values[1])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="closed"):
        store[0]


def test_activations_place_is_checked():
    with pytest.raises(ValueError, match=r"activations='ssd'.*'memory'.*'disk'"):
        Activations("ssd", torch.device("cpu"))
