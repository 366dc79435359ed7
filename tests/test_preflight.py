"""Bad inputs are caught before any weight changes, every problem at once; failures while pruning
name the module and say the model is partially pruned."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import rose_hf.pruning as pruning_module
from rose_hf import RoseConfig, RosePruner
from rose_hf.cli import main
from rose_hf.preflight import PreflightError, PruningError
from rose_hf.streaming import prune_checkpoint
from zoo import VOCAB, build, calibration


def _narrow_mlp():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=42, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _nan_in_block_0(model):
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    return model


def _int8_weights(model):
    q = model.model.layers[1].self_attn.q_proj
    q.weight = nn.Parameter(q.weight.detach().to(torch.int8), requires_grad=False)
    return model


def _meta(model):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return LlamaForCausalLM(model.config)


def _padding_only():
    ids = calibration(2)
    return [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}]


CASES = {
    "N:M width": (_narrow_mlp, {"pattern": "2:4"}, None, ["down_proj has 42 input columns, not a multiple of M=4"]),
    "NaN weight": (lambda: _nan_in_block_0(build("llama")), {}, None, ["layers.0.mlp.up_proj holds 1 NaN or inf"]),
    "int8 weight": (lambda: _int8_weights(build("llama")), {}, None, ["q_proj has torch.int8 weights"]),
    "meta model": (lambda: _meta(build("llama")), {}, None, ["is on the meta device"]),
    "no target": (lambda: build("llama"), {"targets": ["nothing_here"]}, None, ["matches targets=['nothing_here']"]),
    "all ignored": (lambda: build("llama"), {"ignore": ["."]}, None, ["there is nothing to prune"]),
    "id too large": (lambda: build("llama"), {}, lambda: calibration(2) + VOCAB, ["vocabulary has ids [0, 96)"]),
    "negative id": (lambda: build("llama"), {}, lambda: calibration(2) - VOCAB, ["span [-"]),
    "too long": (lambda: build("llama"), {}, lambda: calibration(2, seqlen=80), ["model has 64 positions"]),
    "gpt2 too long": (lambda: build("gpt2"), {}, lambda: calibration(1, seqlen=65), ["use seqlen=64 or less"]),
    "only padding": (lambda: build("llama"), {}, _padding_only, ["mark no token as real"]),
    "two at once": (
        lambda: _nan_in_block_0(_narrow_mlp()),
        {"pattern": "2:4"},
        None,
        ["layers.0.mlp.up_proj holds 1 NaN", "layers.1.mlp.down_proj has 42 input columns"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_preflight_finds_every_problem_before_any_weight_changes(case):
    make, config, calib, messages = CASES[case]
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    with pytest.raises(PreflightError) as info:
        RosePruner(model, RoseConfig(blocksize=32, **config)).prune(calib() if calib else calibration(), progress=False)
    for message in messages:
        assert message in str(info.value), str(info.value)
    assert len(info.value.problems) >= len(messages)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) or (v.isnan() == after[k].isnan()).all() for k, v in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_streaming_runs_preflight_and_leaves_no_output(tmp_path):
    _narrow_mlp().save_pretrained(tmp_path / "source")
    with pytest.raises(PreflightError, match="down_proj has 42 input columns"):
        prune_checkpoint(
            tmp_path / "source", tmp_path / "out", RoseConfig(pattern="2:4"), calibration(), progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_a_failure_while_pruning_names_the_module_and_the_state(monkeypatch):
    calls = []
    plain = pruning_module.prune_matrix

    def fails_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return plain(*args, **kwargs)

    monkeypatch.setattr(pruning_module, "prune_matrix", fails_on_the_third)
    model = build("llama")
    with pytest.raises(PruningError) as info:
        RosePruner(model, RoseConfig(blocksize=32)).prune(calibration(), progress=False)
    text = str(info.value)
    assert "stopped in model.layers.0 while pruning model.layers.0.self_attn.v_proj" in text
    assert "simulated failure" in text and "partially pruned" in text
    assert [m.name for m in info.value.report.modules] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]
    assert isinstance(info.value.__cause__, RuntimeError)


def test_pruning_never_writes_non_finite_weights(monkeypatch):
    monkeypatch.setattr(
        pruning_module, "prune_matrix", lambda W, *a, **k: (torch.full_like(W, float("nan")), {"method": "rose"})
    )
    model = build("llama")
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(PruningError, match="turned finite weights into NaN or inf"):
        RosePruner(model, RoseConfig(blocksize=32)).prune(calibration(), progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)  # nothing of it was written


def test_cli_reports_preflight_problems_as_usage_errors_before_writing(tiny_checkpoint, tmp_path, capsys):
    base, calib = tiny_checkpoint
    args = ["prune", str(base), "-o", str(tmp_path / "out"), "--calib", str(calib), "--nsamples", "2", "--no-progress"]
    assert main([*args, "--seqlen", "100"]) == 2  # the tiny model has 64 positions
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rose-hf: error: ")]
    assert len(lines) == 1 and "nothing was changed: calibration windows are 100 tokens" in lines[0]
    assert "model has 64 positions; use seqlen=64 or less (CLI: --seqlen 64)" in lines[0]
    assert not (tmp_path / "out").exists()
