"""rotation="heads" in the pipeline: exact, plain checkpoints, lower layer error, clear refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rose_hf import RoseConfig, RosePruner
from rose_hf.preflight import PruningError
from zoo import build, calibration


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral"])
def test_rotation_alone_keeps_the_dense_model_and_lowers_its_loss(arch):
    model, dense = build(arch), build(arch)
    ids = calibration(2, seed=5)
    v_before = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    config = RoseConfig(sparsity=0.0, blocksize=32, rotation="heads", rotation_steps=40, refine="none")
    report = RosePruner(model, config).prune(calibration(), progress=False)
    assert torch.allclose(_logits(model, ids), _logits(dense, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, v_before, atol=1e-2)
    assert sorted(report.rotation_losses) == [f"{i}.self_attn" for i in range(len(model.model.layers))]
    assert all(after < 0.97 * before for before, after in report.rotation_losses.values())
    assert report.rotate_seconds > 0


def test_rotation_lowers_the_layer_error_of_v_and_o_and_saves_a_plain_checkpoint(tmp_path):
    errors = {}
    for rotation in ("none", "heads"):
        model = build("llama")
        config = RoseConfig(sparsity=0.5, blocksize=32, rotation=rotation, rotation_steps=40, refine="none")
        report = RosePruner(model, config).prune(calibration(), progress=False)
        errors[rotation] = sum(m.relative_error for m in report.modules if m.name.endswith(("v_proj", "o_proj")))
    assert errors["heads"] < 0.8 * errors["none"]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = calibration(2, seed=5)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert float((loaded.model.layers[1].self_attn.v_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_the_dropped_objective_lowers_what_the_pattern_drops_and_is_recorded(tmp_path):
    errors, reports = {}, {}
    for objective in ("none", "entropy", "dropped"):
        model = build("llama")
        config = RoseConfig(
            pattern="2:4",
            blocksize=32,
            rotation="none" if objective == "none" else "heads",
            rotation_objective="entropy" if objective == "none" else objective,
            rotation_steps=40,
            refine="none",
        )
        pruner = RosePruner(model, config)
        reports[objective] = pruner.prune(calibration(), progress=False)
        errors[objective] = sum(
            m.relative_error for m in reports[objective].modules if m.name.endswith(("v_proj", "o_proj"))
        )
    assert errors["dropped"] < 0.8 * errors["none"]
    assert all(after < before for before, after in reports["dropped"].rotation_losses.values())
    assert all(before < 1 for before, _ in reports["dropped"].rotation_losses.values())  # a share, not an entropy
    pruner.save_pretrained(tmp_path)
    assert RoseConfig.from_pretrained(tmp_path).rotation_objective == "dropped"


def test_the_dropped_objective_reads_each_modules_planned_sparsity(monkeypatch):
    import rose_hf.rotating

    seen = []
    learn = rose_hf.rotating.learn_head_rotations

    def spy(*args, **kwargs):
        seen.append((kwargs["pattern"], kwargs["o_sparsity"]))
        return learn(*args, **kwargs)

    def plan(model, modules, config, batches):  # v_proj and o_proj pruned unlike the run's 0.5
        return {name: 0.3 if name.endswith("v_proj") else 0.7 if name.endswith("o_proj") else 0.5 for name in modules}

    monkeypatch.setattr(rose_hf.rotating, "learn_head_rotations", spy)
    model = build("llama")
    config = RoseConfig(blocksize=32, rotation="heads", rotation_objective="dropped", rotation_steps=5, refine="none")
    RosePruner(model, config, plan=plan).prune(calibration(), progress=False)
    assert seen == [((0.3, 0, 0), 0.7)] * len(model.model.layers)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox"])
def test_rotation_is_refused_before_any_weight_changes_without_v_and_o_proj(arch):
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        (ValueError, PruningError), match="rotation='heads' needs attention modules with v_proj and o_proj"
    ):
        RosePruner(model, RoseConfig(blocksize=32, rotation="heads")).prune(calibration(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rotation_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="method='magnitude' has none of; use rotation='none'"):
        RoseConfig(method="magnitude", rotation="heads")
    with pytest.raises(
        ValueError, match=r"rotation='spin' is not one of \['none', 'heads', 'residual', 'residual\+heads', 'layer'\]"
    ):
        RoseConfig(rotation="spin")
    with pytest.raises(ValueError, match="rotation_steps=0 must be positive"):
        RoseConfig(rotation="heads", rotation_steps=0)


def test_the_default_rotates_the_heads_where_it_can_and_records_what_ran(tmp_path, caplog):
    config = RoseConfig(sparsity=0.5, blocksize=32, rotation_steps=20)
    assert config.rotation is None  # the default recipe's rule, resolved against the model
    assert RoseConfig(method="sparsegpt").rotation == "none"  # the baselines stay themselves
    assert RoseConfig(objective="dense").rotation == "none"
    pruner = RosePruner(build("llama"), config)
    report = pruner.prune(calibration(), progress=False)
    assert config.rotation is None  # the caller's config is left as it was
    assert pruner.config.rotation == "heads" and report.config["rotation"] == "heads"
    assert sorted(report.rotation_losses) == ["0.self_attn", "1.self_attn"]
    pruner.save_pretrained(tmp_path / "out")
    assert RoseConfig.from_pretrained(tmp_path / "out").rotation == "heads"
    plain = RosePruner(build("llama"), RoseConfig(sparsity=0.5, blocksize=32, rotation="none"))
    assert not plain.prune(calibration(), progress=False).rotation_losses  # an explicit "none" is kept
    gpt2 = RosePruner(build("gpt2"), RoseConfig(sparsity=0.5, blocksize=32))
    with caplog.at_level("INFO", logger="rose_hf.rotating"):
        report = gpt2.prune(calibration(), progress=False)
    assert gpt2.config.rotation == "none" and not report.rotation_losses
    assert "default rotation: none for GPT2LMHeadModel" in caplog.text
    mlp_only = RosePruner(build("llama"), RoseConfig(sparsity=0.5, blocksize=32, targets=[r"mlp\."]))
    with caplog.at_level("INFO", logger="rose_hf.rotating"):
        report = mlp_only.prune(calibration(), progress=False)
    assert mlp_only.config.rotation == "none" and not report.rotation_losses  # nothing the heads serve is pruned
    assert "no attention's v_proj or o_proj is pruned" in caplog.text


def test_the_default_rotation_runs_under_streaming_and_is_recorded(tmp_path):
    from rose_hf.streaming import prune_checkpoint

    build("qwen2").save_pretrained(tmp_path / "source")
    config = RoseConfig(sparsity=0.5, blocksize=32, rotation_steps=20)
    report = prune_checkpoint(tmp_path / "source", tmp_path / "out", config, calibration(), progress=False)
    in_memory = RosePruner(build("qwen2"), config)
    in_memory.prune(calibration(), progress=False)
    assert report.config["rotation"] == "heads" and report.rotation_losses
    assert RoseConfig.from_pretrained(tmp_path / "out") == in_memory.config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(v, in_memory.model.state_dict()[k]) for k, v in loaded.state_dict().items())
