"""The examples run as written, on a tiny local checkpoint."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import FakeHub

pytestmark = pytest.mark.slow  # each example runs in its own Python process

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script, *args, env=None):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_prune_save_then_evaluate(tiny_checkpoint, tmp_path):
    base, calib = tiny_checkpoint
    out = tmp_path / "pruned"
    printed = _run(
        "prune_and_save.py", "--model", base, "--calib", calib, "--output", out, "--nsamples", 4, "--seqlen", 32
    )
    achieved = float(re.search(r"to (\d+\.\d+)% sparsity", printed).group(1))
    assert abs(achieved - 60.0) <= 0.5, printed
    assert (out / "rose_config.json").is_file() and (out / "README.md").is_file()
    printed = _run("evaluate.py", "--dense", base, "--pruned", out, "--text", calib, "--seqlen", 32, "--windows", 4)
    assert printed.count("perplexity") == 2 and "sparsity of" in printed


def test_prune_2_4_and_push(tiny_checkpoint):
    import os

    base, calib = tiny_checkpoint
    with FakeHub() as hub:
        env = {**os.environ, "HF_TOKEN": "hf_example"}
        args = (
            "--model",
            base,
            "--repo",
            "user/ex",
            "--calib",
            calib,
            "--nsamples",
            4,
            "--seqlen",
            32,
            "--endpoint",
            hub.url,
        )
        assert "pushed:" in _run("prune_2_4_and_push.py", *args, env=env)
        assert "already up to date:" in _run("prune_2_4_and_push.py", *args, env=env)
        assert len(hub.commits) == 1


def test_the_readme_snippet_runs_and_writes_what_the_readme_says(tiny_checkpoint, tmp_path, monkeypatch):
    base, calib = tiny_checkpoint
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    # The same code at the tiny model's size: its windows are 32 tokens, not 2048.
    small = snippet.replace("nsamples=128, seqlen=2048", "nsamples=4, seqlen=32").replace("calibration.txt", str(calib))
    assert small != snippet
    monkeypatch.chdir(tmp_path)
    exec(compile(small, "README.md", "exec"), {"path": str(base)})
    out = tmp_path / "model-rose-60"
    assert (out / "rose_config.json").is_file() and (out / "README.md").is_file()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
