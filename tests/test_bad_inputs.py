"""Hostile inputs through the CLI and the file readers: each gets one clear line naming the value,
flag, module or file and the fix, the right exit code (2 for usage), and leaves nothing behind.
(The model-level cases, caught by pre-flight before any weight changes, are in test_preflight.py.)"""

import json
import re
import socket

import pytest

from rose_hf import RoseConfig
from rose_hf.cli import main
from rose_hf.shards import CheckpointReader
from rose_hf.sources import load_text
from rose_hf.streaming import prune_checkpoint
from zoo import build, calibration

PRUNE = ["--nsamples", "2", "--seqlen", "32", "--blocksize", "32", "--no-progress"]


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


def _latin1(tmp):
    (tmp / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 400)
    return ["--calib", str(tmp / "latin1.txt")]


# case -> (extra argv or a function of tmp_path returning it, exit code, message regex)
CLI_CASES = {
    "sparsity out of range": (["--sparsity", "1.5"], 2, r"--sparsity: sparsity=1.5 is outside"),
    "pattern syntax": (["--pattern", "2-4"], 2, r"--pattern: pattern='2-4' is not understood"),
    "unknown method": (["--method", "obs"], 2, r"--method: invalid choice: 'obs'"),
    "percdamp zero": (["--percdamp", "0"], 2, r"--percdamp: percdamp=0.0 must be in \(0, 1\]"),
    "percdamp text": (["--percdamp", "abc"], 2, r"--percdamp: invalid float value: 'abc'"),
    "seed text": (["--seed", "abc"], 2, r"--seed: invalid int value: 'abc'"),
    "blocksize zero": (["--blocksize", "0"], 2, r"--blocksize: blocksize=0 must be positive"),
    "blocksize vs N:M": (["--pattern", "2:4", "--blocksize", "30"], 2, r"blocksize=30 is not a multiple of M=4"),
    "threshold range": (["--reorder-threshold", "2"], 2, r"reorder_threshold=2.0 must be in \[0, 1\]"),
    "bad regex": (["--target", "("], 2, r"--target: targets entry '\(' is not a valid regex"),
    "refit with magnitude": (["--refine", "refit", "--method", "magnitude"], 2, r"refine='refit' needs calibration"),
    "dense and sequential": (
        ["--objective", "dense", "--true-sequential"],
        2,
        r"does not apply with objective='dense'",
    ),
    "correction without dense": (["--correction-damp", "0.1"], 2, r"only applies to objective='dense'"),
    "nsamples zero": (["--nsamples", "0"], 2, r"--nsamples 0 must be a positive integer"),
    "seqlen negative": (["--seqlen", "-1"], 2, r"--seqlen -1 must be a positive integer"),
    "seqlen past positions": (["--seqlen", "100"], 2, r"windows are 100 tokens but the model has 64 positions"),
    "dtype": (["--dtype", "float8"], 2, r"--dtype 'float8' is not one of"),
    "shard size": (["--max-shard-size", "abc"], 2, r"--max-shard-size 'abc'"),
    "mmap threshold": (["--stream", "--mmap-threshold", "-1"], 2, r"--mmap-threshold -1 must be a number of bytes"),
    "stream and eval": (["--stream", "--eval", "wikitext2"], 2, r"--eval cannot be combined with --stream"),
    "eval file missing": (["--eval", "nowhere.txt"], 2, r"--eval 'nowhere.txt' is neither an existing file or folder"),
    "calib file missing": (
        ["--calib", "nowhere.txt"],
        2,
        r"--calib 'nowhere.txt' is neither an existing file or folder",
    ),
    "report folder missing": (lambda tmp: ["--report", str(tmp / "no" / "r.json")], 2, r"--report .* is not a folder"),
    "no token for push": (["--push-to-hub", "user/x", "--token", ""], 2, r"--push-to-hub needs a Hub token"),
    "calib not UTF-8": (_latin1, 1, r"latin1.txt' is not UTF-8 text .* convert it"),
    "hub unreachable": (
        ["--push-to-hub", "user/x", "--token", "hf_x"],
        1,
        r"cannot reach the Hub to read user/x's rose_config.json .* nothing was pruned",
    ),
    "unknown flag": (["--bogus"], 2, r"unrecognized arguments: --bogus"),
}


@pytest.mark.slow  # 27 CLI runs, each loading the tiny model
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input(case, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    base, calib = tiny_checkpoint
    extra, code, message = CLI_CASES[case]
    extra = extra(tmp_path) if callable(extra) else extra
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", _closed_port())
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    out = tmp_path / "out"
    argv = ["prune", str(base), "-o", str(out), "--calib", str(calib), *PRUNE, *extra]
    assert main(argv) == code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rose-hf: error: ")]
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # no output, no staging


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "{tmp}"], "has no config.json; pass a checkpoint folder"),
        (
            ["eval", "{base}", "--dataset", "nowhere.txt"],
            "--dataset 'nowhere.txt' is neither an existing file or folder",
        ),
        (["eval", "{tmp}/no-such-model"], "model folder '.*no-such-model' does not exist"),
    ],
)
def test_other_commands_refuse_bad_paths(argv, message, tiny_checkpoint, tmp_path, capsys):
    base, _ = tiny_checkpoint
    assert main([a.format(tmp=tmp_path, base=base) for a in argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def _checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    build("llama").save_pretrained(folder)
    return folder, folder / "model.safetensors"


def test_a_truncated_shard_is_named_before_any_work(tmp_path):
    folder, shard = _checkpoint(tmp_path)
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors' is truncated: its header describes"):
        CheckpointReader(folder)
    with pytest.raises(ValueError, match="is truncated"):
        prune_checkpoint(folder, tmp_path / "out", RoseConfig(), calibration(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_damaged_header_and_a_missing_shard_are_named(tmp_path):
    folder, shard = _checkpoint(tmp_path)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors' has a damaged safetensors header"):
        CheckpointReader(folder)
    build("llama").save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    first = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{first.name}', listed in .* is missing"):
        CheckpointReader(tmp_path / "sharded")


def test_a_corrupt_rose_config_and_non_utf8_text_are_named(tmp_path):
    (tmp_path / "rose_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"rose_config.json' is not valid JSON"):
        RoseConfig.from_pretrained(tmp_path)
    (tmp_path / "rose_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="holds list, not a JSON object"):
        RoseConfig.from_pretrained(tmp_path)
    (tmp_path / "text.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(ValueError, match=r"text.txt' is not UTF-8 text"):
        load_text(str(tmp_path / "text.txt"))


def test_an_unreachable_hub_is_not_taken_for_an_empty_repository():
    from rose_hf.hub import remote_fingerprint

    with pytest.raises(ConnectionError, match="cannot reach the Hub to read user/x's rose_config.json"):
        remote_fingerprint("user/x", token="t", endpoint=_closed_port())
