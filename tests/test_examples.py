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


def test_the_github_actions_example_runs_as_written():
    """Every step of examples/github-actions/auto-prune.yml: pip lines install what setup.cfg
    supports (CPU torch first), and each rose-hf line parses with rose-hf's own parser."""
    import configparser
    import shlex

    import yaml
    from packaging.requirements import Requirement

    from rose_hf.cli_parser import build_parser

    root = Path(__file__).resolve().parent.parent
    workflow = yaml.safe_load((root / "examples" / "github-actions" / "auto-prune.yml").read_text())
    env = {**workflow["env"], "HF_TOKEN": "x"}
    steps = [step for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    commands = []
    for step in steps:
        script = step["run"].replace("${{ inputs.sparsity || '0.5' }}", "0.5")
        assert "${{" not in script, f"unhandled expression in {step['name']!r}"
        for line in script.replace("\\\n", " ").splitlines():
            if line.strip():
                words = shlex.split(line)  # then the shell's $VAR / ${VAR} from the workflow's env
                commands.append([re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], w) for w in words])
    pips = [c for c in commands if c[:2] == ["pip", "install"]]
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    wanted = next(Requirement(r) for r in setup["options"]["install_requires"].split("\n") if r.startswith("torch"))
    torch_line = Requirement(pips[0][2])
    assert torch_line.name == "torch" and torch_line.specifier == wanted.specifier
    assert pips[0][3:] == ["--index-url", "https://download.pytorch.org/whl/cpu"]  # never the CUDA build on CPU
    ours = Requirement(pips[1][2])
    assert ours.name == "rose_hf" and ours.extras == {"data"} and ours.url.startswith("git+https://")
    runs = [c for c in commands if c[0] == "rose-hf"]
    assert [c[1] for c in runs] == ["prune", "inspect"]
    for command in runs:
        build_parser().parse_args(command[1:])  # raises on a flag rose-hf does not have
    prune = build_parser().parse_args(runs[0][1:])
    assert prune.model == workflow["env"]["BASE_MODEL"] and prune.push_to_hub == workflow["env"]["TARGET_REPO"]
