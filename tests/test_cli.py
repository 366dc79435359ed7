import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer

from hub_server import FakeHub
from rose_hf import RoseConfig, RosePruner
from rose_hf.cli import main
from rose_hf.data import calibration_batches

PRUNE = ["--calib", None, "--nsamples", "4", "--seqlen", "32", "--blocksize", "32", "--no-progress"]


def _prune_args(base, calib, out, *extra):
    args = ["prune", str(base), "-o", str(out), *PRUNE, *extra]
    args[args.index(None)] = str(calib)
    return args


def _fresh_logits(out, ids, where, check="True"):
    """Logits of the checkpoint at ``out`` for ``ids``, from a new process with plain transformers
    (rose_hf never imported), which also asserts ``check`` on its ``model``."""
    load = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        assert "rose_hf" not in sys.modules and ({check})
        with torch.no_grad():
            torch.save(model(torch.tensor({ids})).logits, {str(where)!r})
        """
    )
    subprocess.run([sys.executable, "-c", load], check=True, timeout=120)
    return torch.load(where)


def _inspect_json(out):
    """``rose-hf inspect OUT --json`` in a new process, parsed."""
    inspected = subprocess.run(
        [sys.executable, "-m", "rose_hf.cli", "inspect", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert inspected.returncode == 0, inspected.stderr
    return json.loads(inspected.stdout)


def _cli(args, env):
    return subprocess.run(
        [sys.executable, "-m", "rose_hf.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_prune_load_push_and_skip_end_to_end(tiny_checkpoint, tmp_path):
    base, calib = tiny_checkpoint
    out = tmp_path / "pruned"
    with FakeHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_ci", "HF_HUB_DISABLE_XET": "1"}
        args = _prune_args(
            base, calib, out, "--sparsity", "0.6", "--push-to-hub", "user/tiny-rose", "--eval", str(calib)
        )
        first = _cli(args, env)
        assert first.returncode == 0, first.stderr
        assert "pushed to" in first.stdout and len(hub.commits) == 1

        # A fresh process with plain transformers (rose_hf never imported) loads the result.
        load = textwrap.dedent(
            f"""
            import sys, torch
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained({str(out)!r})
            assert "rose_hf" not in sys.modules
            torch.save(model.state_dict(), {str(tmp_path / "state.pt")!r})
            """
        )
        subprocess.run([sys.executable, "-c", load], check=True, timeout=120, env=env)
        loaded = torch.load(tmp_path / "state.pt")

        # The same recipe through the Python API gives bitwise-identical weights.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base)
        tokenizer = AutoTokenizer.from_pretrained(base)
        batches = calibration_batches(tokenizer, str(calib), 4, 32, seed=0)
        RosePruner(model, RoseConfig(sparsity=0.6, blocksize=32)).prune(batches, progress=False)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded[key], value), key

        record = json.loads((out / "rose_config.json").read_text())
        assert record["config"]["sparsity"] == 0.6 and record["calibration"]["nsamples"] == 4
        assert record["result"]["perplexity"]["value"] > 1.0
        for name, entry in record["result"]["modules"].items():
            weight = loaded[f"{name}.weight"]
            assert float((weight == 0).float().mean()) == pytest.approx(entry["sparsity"])
            assert abs(entry["sparsity"] - 0.6) <= 0.005
        card = (out / "README.md").read_text()
        assert "library_name: transformers" in card and "rose" in card
        assert hub.repos["user/tiny-rose"]["rose_config.json"] == (out / "rose_config.json").read_bytes()

        # A CI re-run with the same recipe prunes nothing and uploads nothing.
        second = _cli(
            _prune_args(base, calib, tmp_path / "again", "--sparsity", "0.6", "--push-to-hub", "user/tiny-rose"), env
        )
        assert second.returncode == 0, second.stderr
        assert "nothing to do" in second.stdout and len(hub.commits) == 1
        assert not (tmp_path / "again").exists()

        inspected = _cli(["inspect", str(out), "--json"], env)
        assert inspected.returncode == 0, inspected.stderr
        assert abs(json.loads(inspected.stdout)["overall_sparsity"] - 0.6) < 0.005


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "1.5"], r"--sparsity: sparsity=1.5 is outside \[0, 1\)"),
        (["--pattern", "2-4"], "--pattern: pattern='2-4' is not understood"),
        (["--method", "obs"], "argument --method: invalid choice: 'obs'"),
        (["--percdamp", "0"], r"--percdamp: percdamp=0.0 must be in \(0, 1\]"),
        (["--reorder-threshold", "2"], r"--reorder-threshold: reorder_threshold=2.0 must be in \[0, 1\]"),
        (["--target", "("], "--target: targets entry '\\(' is not a valid regex"),
        (["--nsamples", "0"], "--nsamples 0 must be a positive integer"),
        (["--objective", "global"], "argument --objective: invalid choice: 'global'"),
        (
            ["--method", "magnitude", "--true-sequential"],
            "--true-sequential: true_sequential=True does not apply with method='magnitude'",
        ),
        (["--dtype", "float8"], "--dtype 'float8'"),
        (["--stream", "--mmap-threshold", "-1"], "--mmap-threshold -1 must be a number of bytes, or 0"),
        (["--activations", "ssd"], "argument --activations: invalid choice: 'ssd'"),
        (["--max-shard-size", "abc"], "--max-shard-size 'abc': Unit 'BC' not supported"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--rotation", "layer"], "rotation='layer' leaves one rotation per block .* cannot be saved"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tiny_checkpoint, tmp_path, capsys, extra, message):
    base, calib = tiny_checkpoint
    out = tmp_path / "out"
    assert main(_prune_args(base, calib, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rose-hf: error: ") and len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_a_missing_or_empty_model_folder_is_a_usage_error(tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("text " * 100)
    assert main(_prune_args(tmp_path / "no-such-model", calib, tmp_path / "out")) == 2
    assert "model folder" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    assert main(_prune_args(tmp_path / "empty", calib, tmp_path / "out")) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_a_model_that_cannot_be_loaded_exits_1_naming_it(tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("text " * 100)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert main(_prune_args(tmp_path / "broken", calib, tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot load model" in err and "broken" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unwritable_output_exits_2_before_any_work(tiny_checkpoint, tmp_path, capsys):
    base, calib = tiny_checkpoint
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(_prune_args(base, calib, blocker / "out")) == 2
    assert "is a file" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "weights.bin").write_text("keep")
    assert main(_prune_args(base, calib, existing)) == 2
    assert "--overwrite" in capsys.readouterr().err and (existing / "weights.bin").read_text() == "keep"


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [("no-token", 2, "needs a Hub token"), ("short-text", 1, "too few for windows of seqlen=32")],
)
def test_failures_before_writing_leave_no_output(tiny_checkpoint, tmp_path, capsys, monkeypatch, case, code, message):
    import huggingface_hub

    base, calib = tiny_checkpoint
    extra: tuple[str, ...] = ()
    if case == "no-token":
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
        extra = ("--push-to-hub", "user/x")
    else:
        calib = tmp_path / "short.txt"
        calib.write_text("tiny")
    assert main(_prune_args(base, calib, tmp_path / "out", *extra)) == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--push-to-hub REPO_ID" in text and "--sparsity" in text and "calibration" in text


def test_stream_flag_matches_in_memory_cli(tiny_checkpoint, tmp_path, monkeypatch):
    import rose_hf.streaming

    thresholds = []  # recorded, not applied: the setting would outlive this test in the test process
    monkeypatch.setattr(rose_hf.streaming, "fix_mmap_threshold", lambda n: thresholds.append(n) or True)
    base, calib = tiny_checkpoint
    assert main(_prune_args(base, calib, tmp_path / "mem", "--sparsity", "0.7", "--activations", "disk")) == 0
    assert main(_prune_args(base, calib, tmp_path / "stream", "--sparsity", "0.7", "--stream")) == 0
    assert thresholds == [1 << 20]
    from rose_hf.shards import CheckpointReader

    mem, stream = CheckpointReader(tmp_path / "mem"), CheckpointReader(tmp_path / "stream")
    assert sorted(mem.names()) == sorted(stream.names())
    assert all(torch.equal(mem.get(n), stream.get(n)) for n in mem.names())
    a = json.loads((tmp_path / "mem" / "rose_config.json").read_text())
    b = json.loads((tmp_path / "stream" / "rose_config.json").read_text())
    assert a["fingerprint"] == b["fingerprint"] and (tmp_path / "stream" / "tokenizer.json").is_file()
    assert a["config"]["rotation"] == b["config"]["rotation"] == "heads"  # the default's rule, resolved alike
    assert main(_prune_args(base, calib, tmp_path / "x", "--stream", "--eval", "wikitext2")) == 2


def test_true_sequential_flag_reaches_the_recipe(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from rose_hf.shards import CheckpointReader

    base, calib = tiny_checkpoint
    out = tmp_path / "seq"
    assert main(_prune_args(base, calib, out, "--sparsity", "0.6", "--true-sequential")) == 0
    assert json.loads((out / "rose_config.json").read_text())["config"]["true_sequential"] is True
    model = AutoModelForCausalLM.from_pretrained(base)
    batches = calibration_batches(AutoTokenizer.from_pretrained(base), str(calib), 4, 32, seed=0)
    RosePruner(model, RoseConfig(sparsity=0.6, blocksize=32, true_sequential=True)).prune(batches, progress=False)
    written = CheckpointReader(out)
    names = set(written.names())
    state = {key: value for key, value in model.state_dict().items() if key in names}
    assert any(key.endswith("down_proj.weight") for key in state)
    assert all(torch.equal(written.get(key), value) for key, value in state.items())


def test_seed_draws_the_calibration_windows_and_is_recorded(tiny_checkpoint, tmp_path):
    base, calib = tiny_checkpoint
    records = {}
    for seed in ("0", "0", "1"):
        out = tmp_path / f"seed{seed}-{len(records)}"
        assert main(_prune_args(base, calib, out, "--seed", seed)) == 0
        records[out.name] = json.loads((out / "rose_config.json").read_text())
    first, again, other = records.values()
    assert first["calibration"]["sha256"] == again["calibration"]["sha256"]
    assert first["calibration"]["sha256"] != other["calibration"]["sha256"]
    assert (first["config"]["seed"], other["config"]["seed"], other["calibration"]["seed"]) == (0, 1, 1)


def test_every_config_field_is_a_flag_with_the_configs_default():
    import dataclasses

    from rose_hf.cli_parser import build_parser, config_from, flag_of

    parser = build_parser()
    assert config_from(parser.parse_args(["prune", "m", "-o", "out"])) == RoseConfig()
    values = {
        "sparsity": ("0.7", 0.7),
        "pattern": ("4:8", "4:8"),
        "method": ("wanda", "wanda"),
        "blocksize": ("64", 64),
        "percdamp": ("0.05", 0.05),
        "reorder": ("never", "never"),
        "reorder_threshold": ("0.3", 0.3),
        "score": ("obs", "obs"),
        "objective": ("layer", "layer"),
        "refine": ("refit", "refit"),
        "admm_iters": ("60", 60),
        "allocation": ("owl", "owl"),
        "owl_lambda": ("0.1", 0.1),
        "owl_m": ("4", 4.0),
        "rotation": ("heads", "heads"),
        "rotation_steps": ("50", 50),
        "rotation_objective": ("dropped", "dropped"),
        "seed": ("7", 7),
        "device": ("cpu", "cpu"),
        "block_path": ("model.layers", "model.layers"),
        "targets": ("mlp", ["mlp"]),
        "ignore": ("down", ["down"]),
    }
    fields = {f.name: f for f in dataclasses.fields(RoseConfig)}
    # need objective=dense / no magnitude / an N:M pattern
    assert set(fields) - set(values) == {"correction_damp", "true_sequential", "channel_permutation"}
    for name, (text, want) in values.items():
        config = config_from(parser.parse_args(["prune", "m", "-o", "out", flag_of(fields[name]), text]))
        assert getattr(config, name) == want, name
    dense = config_from(
        parser.parse_args(["prune", "m", "-o", "o", "--objective", "dense", "--correction-damp", "0.2"])
    )
    assert dense.correction_damp == 0.2
    assert config_from(parser.parse_args(["prune", "m", "-o", "o", "--true-sequential"])).true_sequential is True
    permuted = config_from(parser.parse_args(["prune", "m", "-o", "o", "--pattern", "2:4", "--channel-permutation"]))
    assert permuted.channel_permutation is True


@pytest.mark.parametrize("kind", ["parquet", "jsonl-column", "saved-folder", "text-folder", "chat"])
def test_prune_calibrates_from_files_of_records_and_dataset_folders(tiny_checkpoint, tmp_path, kind):
    import datasets

    from conftest import TEXT

    base, _ = tiny_checkpoint
    paragraphs = [p for p in TEXT.split(". ") if p]
    extra: list[str] = []
    if kind == "parquet":
        source = tmp_path / "calib.parquet"
        datasets.Dataset.from_dict({"text": paragraphs}).to_parquet(str(source))
    elif kind == "jsonl-column":
        source = tmp_path / "calib.jsonl"
        source.write_text("".join(json.dumps({"content": p}) + "\n" for p in paragraphs))
        extra = ["--calib-column", "content"]
    elif kind == "text-folder":
        source = tmp_path / "texts"
        datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"body": paragraphs})}).save_to_disk(str(source))
        extra = ["--calib-column", "body", "--calib-split", "validation"]
    elif kind == "chat":
        template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        (base / "tokenizer_config.json").write_text(
            json.dumps({**json.loads((base / "tokenizer_config.json").read_text()), "chat_template": template})
        )
        source = tmp_path / "chats.jsonl"
        chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": p}] for p in paragraphs]
        source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
        extra = ["--calib-chat"]
    else:
        tokenizer = AutoTokenizer.from_pretrained(base)
        ids = tokenizer(TEXT, add_special_tokens=False).input_ids
        source = tmp_path / "tokenised"
        datasets.Dataset.from_dict({"input_ids": [ids[i : i + 32] for i in range(0, 128, 32)]}).save_to_disk(
            str(source)
        )
    out = tmp_path / "out"
    assert main(_prune_args(base, source, out, *extra)) == 0
    record = json.loads((out / "rose_config.json").read_text())
    assert record["calibration"]["source"] == str(source) and record["calibration"]["nsamples"] == 4
    assert record["calibration"]["chat"] == (kind == "chat")
    assert record["calibration"]["column"] == {
        "jsonl-column": "content",
        "text-folder": "body",
        "chat": "messages",
    }.get(kind, "text")


def test_the_cli_builds_its_parser_without_importing_torch():
    code = "import sys, rose_hf.cli; rose_hf.cli.build_parser(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.split() == ["False", "False"]  # so rose-hf --help answers at once
    import rose_hf

    assert rose_hf.RosePruner is RosePruner and sorted(rose_hf.__all__) == rose_hf.__all__


@pytest.mark.slow
def test_ci_on_the_hub_prunes_a_new_base_release_and_skips_an_unchanged_one(tiny_checkpoint, tmp_path):
    """The auto-prune job: the base model and the recipe both live on the (fake) Hub."""
    base, calib = tiny_checkpoint
    with FakeHub() as hub:
        hub.repos["org/base"] = {f.name: f.read_bytes() for f in base.iterdir() if f.is_file()}
        hub.heads["org/base"] = "a" * 40
        hub.repos["org/recipes"] = {
            "rose_config.json": RoseConfig(sparsity=0.5, blocksize=32).to_json_string().encode()
        }
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_ci", "HF_HUB_DISABLE_XET": "1"}
        env["HF_HOME"] = str(tmp_path / "hf-home")  # a fresh cache, as on a CI runner

        def job(run: int):
            out = tmp_path / f"run{run}"
            args = ["prune", "org/base", "-o", str(out), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"]
            done = _cli([*args, "--recipe", "org/recipes", "--no-progress", "--push-to-hub", "user/base-rose"], env)
            assert done.returncode == 0, done.stderr
            return done, out

        first, out = job(1)
        assert "pushed to" in first.stdout and len(hub.commits) == 1
        record = json.loads(hub.repos["user/base-rose"]["rose_config.json"])
        assert record["base_revision"] == "a" * 40 and record["config"]["sparsity"] == 0.5

        again, out = job(2)  # nothing changed: skipped before any pruning, nothing written
        assert "already holds this recipe" in again.stdout + again.stderr or "skipped" in again.stdout
        assert len(hub.commits) == 1 and not out.exists()

        hub.heads["org/base"] = "b" * 40  # the base repository gets a new release
        third, out = job(3)
        assert "pushed to" in third.stdout and len(hub.commits) == 2
        assert json.loads(hub.repos["user/base-rose"]["rose_config.json"])["base_revision"] == "b" * 40


@pytest.mark.slow
@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_a_residual_rotated_2_4_checkpoint_loads_in_a_fresh_process_with_the_same_logits(
    tiny_checkpoint, tmp_path, stream
):
    """Tied embeddings are untied by the rotation; plain transformers loads the result, in memory
    or streamed."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from zoo import _LLAMA_LIKE

    base, calib = tiny_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(**(_LLAMA_LIKE | {"vocab_size": len(tokenizer)}), tie_word_embeddings=True))
    with torch.no_grad():
        for name, param in tied.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    source = tmp_path / "tied"
    tied.save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "pruned"
    recipe = ["--pattern", "2:4", "--rotation", "residual", "--rotation-steps", "10", *stream]
    assert main(_prune_args(source, calib, out, *recipe)) == 0

    ids = [[5, 17, 42, 99, 3, 250, 7, 1]]
    fresh = _fresh_logits(out, ids, tmp_path / "logits.pt", check="not model.config.tie_word_embeddings")
    model = AutoModelForCausalLM.from_pretrained(source)
    batches = calibration_batches(tokenizer, str(calib), 4, 32, seed=0)
    config = RoseConfig(pattern="2:4", blocksize=32, rotation="residual", rotation_steps=10)
    report = RosePruner(model, config).prune(batches, progress=False)
    with torch.no_grad():
        assert torch.equal(fresh, model(torch.tensor(ids)).logits)
    record = json.loads((out / "rose_config.json").read_text())
    assert record["result"]["untied_parameters"] == report.untied_parameters == tied.lm_head.weight.numel()
    assert "untied from the input embeddings by the rotation" in (out / "README.md").read_text()
    summary = _inspect_json(out)
    assert summary["overall_sparsity"] == pytest.approx(0.5)
    assert summary["pattern"] == "2:4" and all(m["nm_valid"] for m in summary["modules"].values())


@pytest.mark.slow
def test_a_head_rotated_channel_permuted_2_4_checkpoint_loads_in_a_fresh_process_with_the_same_logits(
    tiny_checkpoint, tmp_path
):
    from transformers import AutoModelForCausalLM

    base, calib = tiny_checkpoint
    out = tmp_path / "pruned"
    recipe = ["--pattern", "2:4", "--rotation", "heads", "--rotation-steps", "10", "--channel-permutation"]
    assert main(_prune_args(base, calib, out, *recipe)) == 0
    ids = [[5, 17, 42, 99, 3, 250, 7, 1]]
    fresh = _fresh_logits(out, ids, tmp_path / "logits.pt")
    model = AutoModelForCausalLM.from_pretrained(base)
    batches = calibration_batches(AutoTokenizer.from_pretrained(base), str(calib), 4, 32, seed=0)
    config = RoseConfig(pattern="2:4", blocksize=32, rotation="heads", rotation_steps=10, channel_permutation=True)
    report = RosePruner(model, config).prune(batches, progress=False)
    with torch.no_grad():
        assert torch.equal(fresh, model(torch.tensor(ids)).logits)
    record = json.loads((out / "rose_config.json").read_text())
    assert record["result"]["permuted_modules"] == len(report.permutation_costs) > 0
    assert "| channel permutation | N:M groups of" in (out / "README.md").read_text()
    summary = _inspect_json(out)
    assert summary["pattern"] == "2:4" and all(m["nm_valid"] for m in summary["modules"].values())
