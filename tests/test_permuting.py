"""channel_permutation=True in the pipeline: exact, valid N:M checkpoints, lower error, clear refusals."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from rose_hf import RoseConfig, RosePruner
from rose_hf.preflight import PruningError
from zoo import build, calibration


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _keep_dense(name, W, W_pruned, H):
    """A refiner that undoes the pruning: what is left is exactly what the transforms did."""
    return W


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral"])
def test_permutation_alone_keeps_the_model_function(arch):
    """Every module is a target but kept dense: the reordered v/o and MLP channels must be exact."""
    ids = calibration(2, seed=5)
    outputs, reports = {}, {}
    for permute in (False, True):
        model = build(arch)
        config = RoseConfig(pattern="2:4", blocksize=32, channel_permutation=permute)
        reports[permute] = RosePruner(model, config, refiners=[_keep_dense]).prune(calibration(), progress=False)
        outputs[permute] = _logits(model, ids)
        down = model.model.layers[0].mlp.down_proj.weight
    assert torch.allclose(outputs[True], outputs[False], atol=1e-4, rtol=1e-4)
    assert torch.allclose(outputs[True], _logits(build(arch), ids), atol=1e-4, rtol=1e-4)
    costs = reports[True].permutation_costs
    layers = len(model.model.layers)
    assert sorted(costs) == sorted(
        [f"{i}.self_attn.o_proj" for i in range(layers)] + [f"{i}.mlp.down_proj" for i in range(layers)]
    )
    assert all(after <= before for before, after in costs.values())
    assert sum(after for _, after in costs.values()) < 0.95 * sum(before for before, _ in costs.values())
    assert not torch.equal(down, build(arch).model.layers[0].mlp.down_proj.weight)  # reordered, not untouched
    assert reports[True].rotate_seconds > 0 and not reports[False].permutation_costs


def test_permutation_lowers_down_and_o_error_and_saves_a_valid_two_four_checkpoint(tmp_path):
    errors = {}
    for permute in (False, True):
        model = build("llama")
        config = RoseConfig(pattern="2:4", blocksize=32, channel_permutation=permute, refine="none")
        report = RosePruner(model, config).prune(calibration(), progress=False)
        errors[permute] = sum(m.relative_error for m in report.modules if m.name.endswith(("down_proj", "o_proj")))
    assert errors[True] < 0.97 * errors[False]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = calibration(2, seed=5)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    for name, module in loaded.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers"):
            groups = (module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
            assert int(groups.max()) <= 2, name


def test_permutation_composes_with_the_heads_rotation():
    model, dense = build("llama"), build("llama")
    config = RoseConfig(pattern="2:4", blocksize=32, rotation="heads", rotation_steps=20, channel_permutation=True)
    report = RosePruner(model, config, refiners=[_keep_dense]).prune(calibration(), progress=False)
    assert report.rotation_losses and report.permutation_costs
    ids = calibration(2, seed=5)
    assert torch.allclose(_logits(model, ids), _logits(dense, ids), atol=1e-4, rtol=1e-4)
    v, v_dense = model.model.layers[0].self_attn.v_proj.weight, dense.model.layers[0].self_attn.v_proj.weight
    assert not torch.allclose(v, v_dense, atol=1e-2)  # turned and reordered, same function


@pytest.mark.parametrize(
    ("fields", "rotated", "permuted"),
    [
        ({"targets": [r"q_proj$"]}, False, ()),  # nothing the transforms serve is pruned: nothing changes
        ({"targets": [r"v_proj$"]}, True, ()),  # the rotation serves v_proj; the order only o_proj / down_proj
        ({"targets": [r"down_proj$"]}, False, ("mlp.down_proj",)),
        ({"ignore": [r"v_proj$", r"o_proj$"]}, False, ("mlp.down_proj",)),
    ],
)
def test_transforms_leave_modules_they_serve_no_pruning_of_untouched(fields, rotated, permuted):
    """A module in ``ignore`` or outside ``targets`` keeps its weights unless a pruned one needs them turned."""
    model, dense = build("llama"), build("llama")
    config = RoseConfig(
        pattern="2:4", blocksize=32, rotation="heads", rotation_steps=20, channel_permutation=True, **fields
    )
    # an explicit rotation that turns nothing says so before the run
    said = contextlib.nullcontext() if rotated else pytest.warns(UserWarning, match="'heads' turns no attention heads")
    with said:
        report = RosePruner(model, config).prune(calibration(), progress=False)
    layers = len(model.model.layers)
    assert sorted(report.rotation_losses) == ([f"{i}.self_attn" for i in range(layers)] if rotated else [])
    assert sorted(report.permutation_costs) == sorted(f"{i}.{leaf}" for i in range(layers) for leaf in permuted)
    untouched = set() if rotated else {"self_attn.v_proj", "self_attn.o_proj"}  # a rotation turns both
    if not permuted:
        untouched |= {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    weights, dense_weights = model.state_dict(), dense.state_dict()
    for i in range(layers):
        for name in untouched:
            key = f"model.layers.{i}.{name}.weight"
            assert torch.equal(weights[key], dense_weights[key]), key


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox"])
def test_permutation_is_refused_before_any_weight_changes_without_reorderable_channels(arch):
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, PruningError), match="channel_permutation=True reorders gated MLPs"):
        RosePruner(model, RoseConfig(pattern="2:4", blocksize=32, channel_permutation=True)).prune(
            calibration(), progress=False
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_permutation_config_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"with sparsity=0.6 \(unstructured\) it changes nothing. Set pattern='2:4'"):
        RoseConfig(sparsity=0.6, channel_permutation=True)
    with pytest.raises(ValueError, match="method='wanda' does not prune by; use method='rose' or 'sparsegpt'"):
        RoseConfig(pattern="2:4", method="wanda", channel_permutation=True)


def test_an_unreadable_head_size_is_refused_with_the_option_that_needs_it():
    model = build("llama")
    for layer in model.model.layers:
        layer.self_attn.head_dim = 5  # 48 columns of o_proj are not whole heads of 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        (ValueError, PruningError),
        match=r"channel_permutation=True cannot read the head size of self_attn \(head_dim=5\); "
        "use channel_permutation=False",
    ):
        RosePruner(model, RoseConfig(pattern="2:4", blocksize=32, channel_permutation=True)).prune(
            calibration(), progress=False
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
