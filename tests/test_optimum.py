"""``optimum-cli rose ...``: rose_hf's commands registered in optimum's CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rose_hf.cli import main

OPTIMUM_CLI = Path(sys.executable).with_name("optimum-cli")
pytestmark = [
    pytest.mark.skipif(not OPTIMUM_CLI.is_file(), reason="optimum is not installed (pip install -e '.[dev]')"),
    pytest.mark.slow,  # starts optimum-cli processes
]
FLAGS = [
    "--calib",
    None,
    "--nsamples",
    "4",
    "--seqlen",
    "32",
    "--blocksize",
    "32",
    "--sparsity",
    "0.5",
    "--no-progress",
]


def _optimum(*args):
    return subprocess.run([str(OPTIMUM_CLI), *args], capture_output=True, text=True, timeout=300, env=os.environ)


def test_optimum_cli_lists_the_rose_commands_with_rose_hf_flags():
    top = _optimum("--help")
    assert top.returncode == 0 and "rose" in top.stdout
    rose = _optimum("rose", "--help")
    assert rose.returncode == 0, rose.stderr
    assert "{prune,eval,inspect}" in rose.stdout
    prune = _optimum("rose", "prune", "--help")
    assert "--reorder-threshold" in prune.stdout and "--calib-chat" in prune.stdout  # the same generated flags
    bad = _optimum("rose", "prune", "model", "-o", "out", "--sparsity", "2")
    assert bad.returncode == 2 and "--sparsity" in bad.stderr and "Traceback" not in bad.stderr


def test_optimum_cli_prunes_like_rose_hf(tiny_checkpoint, tmp_path):
    base, calib = tiny_checkpoint
    flags = [str(calib) if f is None else f for f in FLAGS]
    done = _optimum("rose", "prune", str(base), "-o", str(tmp_path / "via-optimum"), *flags)
    assert done.returncode == 0, done.stderr
    assert main(["prune", str(base), "-o", str(tmp_path / "via-rose-hf"), *flags]) == 0
    ours, theirs = (load_file(tmp_path / name / "model.safetensors") for name in ("via-rose-hf", "via-optimum"))
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    inspect = _optimum("rose", "inspect", str(tmp_path / "via-optimum"))
    assert inspect.returncode == 0 and "overall sparsity" in inspect.stdout
