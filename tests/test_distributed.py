"""Two processes on the gloo backend (CPU) give the same weights as one process."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rose_hf import RoseConfig, RosePruner
from rose_hf.distributed import World
from zoo import build, calibration


def _worker(rank: int, world_size: int, store: str, out: str, config: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = build("llama", seed=3)
        report = RosePruner(model, RoseConfig(**config)).prune(calibration(8), progress=False)
        torch.save({"state": model.state_dict(), "report": report.to_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [  # ROSE without ADMM: ADMM's top-k may tip between near-equal weights (the test below); the
        # head rotations' 100 Adam steps carry the all-reduce's rounding further, so they run 20 here
        # where they run at all (the default's own 100: the objective test below)
        {"sparsity": 0.6, "blocksize": 32, "refine": "none", "rotation": "none"},
        {"pattern": "2:4", "method": "sparsegpt"},
        {"sparsity": 0.6, "blocksize": 32, "objective": "dense"},
        {"sparsity": 0.6, "blocksize": 32, "true_sequential": True, "refine": "none", "rotation_steps": 20},
        {"pattern": "2:4", "refine": "refit"},
        {
            "sparsity": 0.6,
            "blocksize": 32,
            "refine": "none",
            "allocation": "error",
            "owl_lambda": 0.1,
            "rotation": "none",
        },
        {"sparsity": 0.6, "blocksize": 32, "refine": "none", "rotation": "heads", "rotation_steps": 20},
        {"sparsity": 0.6, "blocksize": 32, "refine": "none", "rotation": "residual", "rotation_steps": 20},
        {"pattern": "2:4", "blocksize": 32, "refine": "none", "channel_permutation": True, "rotation": "none"},
    ],
)
def test_two_gloo_processes_match_one(tmp_path, config):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out"), config), nprocs=2, join=True)
    single = build("llama", seed=3)
    report = RosePruner(single, RoseConfig(**config)).prune(calibration(8), progress=False)
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    for rank, result in enumerate(results):
        for key, value in single.state_dict().items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=f"rank {rank} {key}")
            assert torch.equal((result["state"][key] == 0), (value == 0)), key  # the same mask
        assert result["report"]["num_tokens"] == report.num_tokens
        assert [m["reordered"] for m in result["report"]["modules"]] == [m.reordered for m in report.modules]
    assert all(torch.equal(results[0]["state"][k], results[1]["state"][k]) for k in results[0]["state"])


@pytest.mark.slow
def test_two_gloo_processes_reach_the_same_admm_objective_as_one(tmp_path):
    """ADMM picks its mask by a global top-k that fp32 reduction order can tip for near-tied
    weights (the all-reduced H sums in another order), so two processes are held to the same
    layer error and sparsity per module, not the same bits; the two ranks agree bitwise. The
    config is the default recipe's (ADMM, and on this Llama the head rotations at 100 steps)."""
    config = {"sparsity": 0.6, "blocksize": 32}
    assert RoseConfig(**config).refine == "admm" and RoseConfig(**config).rotation is None
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out"), config), nprocs=2, join=True)
    report = RosePruner(build("llama", seed=3), RoseConfig(**config)).prune(calibration(8), progress=False)
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    for got, want in zip(results[0]["report"]["modules"], report.modules):
        assert got["name"] == want.name and got["sparsity"] == want.sparsity, want.name
        assert abs(got["relative_error"] - want.relative_error) <= 0.02 * want.relative_error, want.name
    assert all(torch.equal(results[0]["state"][k], results[1]["state"][k]) for k in results[0]["state"])


def test_world_shares_batches_and_owners():
    world = World(rank=1, size=3)
    assert world.share(list(range(7))) == [1, 4] and [world.owner(i) for i in range(4)] == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="cannot be shared by 3 processes"):
        world.share([1, 2])


# ADMM and 100 rotation steps across processes: the test above
STREAM_CONFIG = {"sparsity": 0.5, "blocksize": 32, "refine": "none", "rotation_steps": 20}


def _stream_worker(rank: int, world_size: int, store: str, source: str, out: str, config: dict) -> None:
    from rose_hf.streaming import prune_checkpoint

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        prune_checkpoint(source, out, RoseConfig(**config), calibration(8), progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("rotation", ["none", "residual"])
def test_streaming_under_two_processes_writes_once(tmp_path, rotation):
    from rose_hf.shards import CheckpointReader

    config = STREAM_CONFIG | {"rotation": rotation}
    build("llama", seed=3).save_pretrained(tmp_path / "source")
    mp.spawn(
        _stream_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path / "source"), str(tmp_path / "out"), config),
        nprocs=2,
        join=True,
    )
    single = build("llama", seed=3)
    RosePruner(single, RoseConfig(**config)).prune(calibration(8), progress=False)
    reader = CheckpointReader(tmp_path / "out")
    for key, value in single.state_dict().items():
        torch.testing.assert_close(reader.get(key), value, rtol=1e-4, atol=1e-5)
    assert {p.name for p in tmp_path.iterdir()} - {"store"} == {"out", "source"}  # no staging leftovers
