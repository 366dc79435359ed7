"""A streamed prune killed part way resumes from its last finished block, bitwise as if never killed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rose_hf import RoseConfig
from rose_hf.shards import CheckpointReader
from rose_hf.streaming import prune_checkpoint
from zoo import build, calibration

TESTS = str(Path(__file__).resolve().parent)
# Runs a prune in a fresh process that kills itself right after block 0 is recorded as done.
KILLED_AFTER_BLOCK_0 = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import rose_hf.streaming as streaming
from zoo import calibration
original = streaming.CheckpointHome.block_done
def block_done(self, index, report):
    original(self, index, report)
    os.kill(os.getpid(), signal.{signal})
streaming.CheckpointHome.block_done = block_done
{call}
"""


def _kill_after_block_0(call: str, signal: str = "SIGKILL") -> subprocess.CompletedProcess:
    code = KILLED_AFTER_BLOCK_0.format(tests=TESTS, signal=signal, call=call)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _tensors(folder):
    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader.names()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("llama", {}),
        ("gemma3", {"true_sequential": True}),
        ("gpt2", {"method": "magnitude"}),
        ("gemma3", {}),
        ("llama", {"rotation": "residual", "rotation_steps": 10}),  # learned again, the same R
    ],
)
def test_a_killed_stream_resumes_bitwise(tmp_path, arch, config, monkeypatch):
    source = tmp_path / "source"
    build(arch).save_pretrained(source)
    recipe = RoseConfig(sparsity=0.6, blocksize=32, **config)
    calib = None if recipe.method == "magnitude" else calibration()
    prune_checkpoint(source, tmp_path / "whole", recipe, calib, progress=False)

    call = (
        f"from rose_hf import RoseConfig; streaming.prune_checkpoint({str(source)!r}, {str(tmp_path / 'out')!r}, "
        f"RoseConfig(sparsity=0.6, blocksize=32, **{config!r}), {'None' if calib is None else 'calibration()'}, "
        "progress=False)"
    )
    killed = _kill_after_block_0(call)
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / ".out.partial"
    assert json.loads((partial / "rose_progress.json").read_text())["blocks_done"] == 1
    assert not (tmp_path / "out").exists()

    import rose_hf.pruning

    pruned = []
    plain = rose_hf.pruning.ModulePruner.__call__
    monkeypatch.setattr(
        rose_hf.pruning.ModulePruner, "__call__", lambda self, name, *a: pruned.append(name) or plain(self, name, *a)
    )
    report = prune_checkpoint(source, tmp_path / "out", recipe, calib, progress=False)
    assert pruned and not any(".0." in name for name in pruned)  # block 0 was replayed, not pruned again
    assert len(pruned) < len(report.modules)
    whole, resumed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "out")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert not partial.exists() and not (tmp_path / "out" / "rose_progress.json").exists()
    record = json.loads((tmp_path / "out" / "rose_config.json").read_text())
    assert len(record["result"]["modules"]) == len(report.modules) == len(json.loads(
        (tmp_path / "whole" / "rose_config.json").read_text())["result"]["modules"])  # fmt: skip


@pytest.mark.slow
def test_a_partial_run_of_another_recipe_is_refused_then_replaced_on_overwrite(tmp_path):
    source = tmp_path / "source"
    build("llama").save_pretrained(source)
    call = (
        f"from rose_hf import RoseConfig; streaming.prune_checkpoint({str(source)!r}, {str(tmp_path / 'out')!r}, "
        "RoseConfig(sparsity=0.5, blocksize=32), calibration(), progress=False)"
    )
    assert _kill_after_block_0(call).returncode == -9
    other = RoseConfig(sparsity=0.7, blocksize=32)
    with pytest.raises(FileExistsError, match="holds a partial run of another recipe"):
        prune_checkpoint(source, tmp_path / "out", other, calibration(), progress=False)
    assert (tmp_path / ".out.partial").is_dir()  # reported, not silently reused or deleted
    prune_checkpoint(source, tmp_path / "out", other, calibration(), progress=False, overwrite=True)
    assert json.loads((tmp_path / "out" / "rose_config.json").read_text())["config"]["sparsity"] == 0.7
    assert not (tmp_path / ".out.partial").exists()


@pytest.mark.slow
def test_sigterm_stops_the_cli_cleanly_and_the_same_command_resumes(tiny_checkpoint, tmp_path):
    from rose_hf.cli import main

    base, calib = tiny_checkpoint
    argv = ["prune", str(base), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "--stream", "--no-progress"]
    assert main([*argv, "-o", str(tmp_path / "whole")]) == 0
    call = f"from rose_hf.cli import main; sys.exit(main({[*argv, '-o', str(tmp_path / 'out')]!r}))"
    stopped = _kill_after_block_0(call, signal="SIGTERM")
    assert stopped.returncode == 1, stopped.stderr
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("rose-hf: error: interrupted;") and "1 finished blocks are kept" in line
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
    assert main([*argv, "-o", str(tmp_path / "out")]) == 0
    whole, resumed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "out")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[n], resumed[n]) for n in whole)


def test_a_killed_in_memory_save_leaves_no_output_and_its_staging_is_reported(tmp_path):
    from rose_hf import RosePruner

    model = build("llama")
    pruner = RosePruner(model, RoseConfig(sparsity=0.5, blocksize=32))
    pruner.prune(calibration(), progress=False)
    (tmp_path / ".out.k1ll3d00").mkdir()  # what a save killed by SIGKILL leaves (mkdtemp's name)
    with pytest.warns(UserWarning, match=r"1 staging folders of interrupted saves .* \['.out.k1ll3d00'\]") as caught:
        pruner.save_pretrained(tmp_path / "out")
    assert caught[0].filename == __file__ and (tmp_path / "out" / "rose_config.json").is_file()
