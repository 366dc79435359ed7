"""rotation="residual": exact on Llama-style models, untied heads, plain checkpoints, clear refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rose_hf import RoseConfig, RosePruner
from rose_hf.preflight import PruningError
from rose_hf.residual import RotationError, rotate_residual
from rose_hf.shards import CheckpointReader
from rose_hf.streaming import prune_checkpoint
from zoo import _LLAMA_LIKE, build, calibration


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _with_norm_weights(model, seed=1):
    """Norm weights away from 1, so that folding them is really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=generator))
    return model


def _tensors(folder):
    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader.names()}


def tied_llama(**extra):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_LLAMA_LIKE, tie_word_embeddings=True, **extra)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return _with_norm_weights(model)


def _batches(count=4):
    return [{"input_ids": row.unsqueeze(0)} for row in calibration(count)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: _with_norm_weights(build("llama")),
        lambda: _with_norm_weights(build("mistral")),
        lambda: _with_norm_weights(build("qwen2")),  # q/k/v biases: readers keep theirs
        lambda: tied_llama(attention_bias=True, mlp_bias=True),  # o_proj/down_proj biases rotate
    ],
)
def test_rotated_model_computes_the_same_function_and_the_loss_falls(make):
    model = make()
    dense = make()
    ids = calibration(2, seed=5)
    result = rotate_residual(model, _batches(), steps=30)
    assert torch.allclose(_logits(model, ids), _logits(dense, ids), atol=1e-4, rtol=1e-4)
    assert result.losses[-1] < 0.97 * result.losses[0]
    eye = torch.eye(result.R.shape[0])
    assert torch.allclose(result.R.T @ result.R, eye, atol=1e-5)
    assert not torch.allclose(result.R, eye, atol=1e-2)  # it did rotate
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q, dense.model.layers[0].self_attn.q_proj.weight, atol=1e-2)
    assert all(
        torch.equal(n.weight, torch.ones_like(n.weight))
        for n in model.model.layers[0].children()
        if hasattr(n, "variance_epsilon")
    )


def test_rotate_residual_merges_into_an_offloaded_model_as_into_a_loaded_one():
    from accelerate import cpu_offload

    loaded, offloaded = tied_llama(), tied_llama()
    cpu_offload(offloaded, execution_device="cpu")
    assert torch.equal(
        rotate_residual(loaded, _batches(), steps=10).R, rotate_residual(offloaded, _batches(), steps=10).R
    )
    assert offloaded.model.layers[0].self_attn.q_proj.weight.is_meta  # written back to its store
    ids = calibration(2, seed=5)
    assert torch.equal(_logits(offloaded, ids), _logits(loaded, ids))


def test_learning_is_deterministic():
    results = [rotate_residual(tied_llama(), _batches(), steps=15) for _ in range(2)]
    assert torch.equal(results[0].R, results[1].R) and results[0].losses == results[1].losses


def test_tied_embeddings_are_untied_and_the_pruned_checkpoint_round_trips(tmp_path):
    model = tied_llama()
    config = RoseConfig(sparsity=0.5, blocksize=32, rotation="residual", rotation_steps=20, refine="none")
    report = RosePruner(model, config).prune(calibration(), progress=False)
    vocab, hidden = model.model.embed_tokens.weight.shape
    assert report.untied_parameters == vocab * hidden
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    losses = report.rotation_losses["residual"]
    assert losses[1] < losses[0] and report.rotate_seconds > 0
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = calibration(2, seed=5)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


@pytest.mark.parametrize("rotation", ["residual", "layer"])
def test_the_dropped_objective_steers_the_input_rotations_too(rotation):
    model = tied_llama()
    config = RoseConfig(
        pattern="2:4", blocksize=32, rotation=rotation, rotation_objective="dropped", rotation_steps=20, refine="none"
    )
    report = RosePruner(model, config).prune(calibration(), progress=False)
    readers = 3 if rotation == "layer" else 5 * len(model.model.layers)  # per half at most q/k/v; or every reader
    for before, after in report.rotation_losses.values():
        assert after < before < readers  # a share per reader module, not an entropy, and it falls
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)


def test_residual_and_heads_together_keep_the_function():
    model, dense = tied_llama(), tied_llama()
    config = RoseConfig(sparsity=0.0, blocksize=32, rotation="residual+heads", rotation_steps=20, refine="none")
    report = RosePruner(model, config).prune(calibration(), progress=False)
    ids = calibration(2, seed=5)
    assert torch.allclose(_logits(model, ids), _logits(dense, ids), atol=1e-4, rtol=1e-4)
    assert sorted(report.rotation_losses) == ["0.self_attn", "1.self_attn", "residual"]


@pytest.mark.parametrize(
    ("arch", "why"),
    [
        ("gemma3", "block 0.pre_feedforward_layernorm scales the block's output"),
        ("gemma2", "block 0.pre_feedforward_layernorm scales the block's output"),
        ("gpt2", "block 0 is not input_layernorm -> self_attn"),
        ("opt", "block 0 is not input_layernorm -> self_attn"),
    ],
)
def test_models_it_cannot_merge_into_are_refused_before_any_weight_changes(arch, why):
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((RotationError, PruningError), match=why + r".*Use rotation='heads' or rotation='none'"):
        RosePruner(model, RoseConfig(blocksize=32, rotation="residual")).prune(calibration(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layernorm_is_refused_by_probing_it():
    model = build("llama")
    layer = model.model.layers[1]
    layer.post_attention_layernorm = torch.nn.LayerNorm(layer.post_attention_layernorm.weight.shape[0], bias=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RotationError, match="LayerNorm is not an RMS norm"):
        rotate_residual(model, _batches())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # block 0's look undone


def test_layer_rotation_is_refused_by_streaming_before_anything_is_written(tmp_path):
    source = tmp_path / "source"
    build("llama").save_pretrained(source)
    config = RoseConfig(sparsity=0.5, blocksize=32, rotation="layer")
    with pytest.raises(RotationError, match="rotation='layer' .* cannot be saved"):
        prune_checkpoint(source, tmp_path / "out", config, calibration(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


@pytest.mark.parametrize("tied", [True, False])
def test_a_streamed_residual_rotation_writes_the_in_memory_checkpoint_and_its_untied_head(tmp_path, tied):
    """Every block, the embeddings, the final norm and the (untied) head, bit for bit."""
    source = tmp_path / "source"
    (tied_llama() if tied else _with_norm_weights(build("llama"))).save_pretrained(source, max_shard_size="50KB")
    config = RoseConfig(sparsity=0.5, blocksize=32, rotation="residual", rotation_steps=10, refine="none")
    model = AutoModelForCausalLM.from_pretrained(source)
    memory_report = RosePruner(model, config).prune(calibration(), progress=False)
    model.save_pretrained(tmp_path / "memory")

    report = prune_checkpoint(source, tmp_path / "stream", config, calibration(), progress=False)
    memory, stream = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert memory.keys() == stream.keys() and ("lm_head.weight" in stream)
    for name in memory:
        assert torch.equal(memory[name], stream[name]), name
    assert report.rotation_losses == memory_report.rotation_losses
    assert report.untied_parameters == memory_report.untied_parameters == (model.lm_head.weight.numel() if tied else 0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    ids = calibration(2, seed=5)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_an_offloaded_model_takes_the_residual_rotation_as_in_memory(tmp_path, how):
    from accelerate import cpu_offload, disk_offload

    config = RoseConfig(sparsity=0.5, blocksize=32, rotation="residual", rotation_steps=10, refine="none")
    expected = _with_norm_weights(build("llama"))
    RosePruner(expected, config).prune(calibration(), progress=False)
    model = _with_norm_weights(build("llama"))
    if how == "cpu_offload":
        cpu_offload(model, execution_device="cpu")
    else:
        disk_offload(model, tmp_path / "offload", execution_device="cpu")
    assert model.lm_head.weight.device.type == "meta"  # really offloaded, the head too
    RosePruner(model, config).prune(calibration(), progress=False)
    assert model.model.embed_tokens.weight.device.type == "meta"  # offloaded again
    ids = calibration(2, seed=5)
    assert torch.equal(_logits(model, ids), _logits(expected, ids))  # the hooks load the rotated weights


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_layer_rotation_keeps_the_function_in_memory_and_refuses_to_be_saved(tmp_path, arch):
    model, dense = _with_norm_weights(build(arch)), _with_norm_weights(build(arch))
    config = RoseConfig(sparsity=0.0, blocksize=32, rotation="layer", rotation_steps=20, refine="none")
    report = RosePruner(model, config).prune(calibration(), progress=False)
    ids = calibration(2, seed=5)
    assert torch.allclose(_logits(model, ids), _logits(dense, ids), atol=1e-4, rtol=1e-4)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q, dense.model.layers[0].self_attn.q_proj.weight, atol=1e-2)  # rotated weights
    layers = len(model.model.layers)
    assert sorted(report.rotation_losses) == sorted(f"{i}.{h}" for i in range(layers) for h in ("attention", "mlp"))
    assert all(after < before for before, after in report.rotation_losses.values())
    with pytest.raises(
        RotationError, match="rotation='layer' .* cannot be saved as a checkpoint. Use rotation='residual'"
    ):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layer_rotation_refuses_an_offloaded_model_before_any_weight_changes():
    from accelerate import cpu_offload

    model = build("llama")
    cpu_offload(model, execution_device="cpu")
    ids = calibration(2, seed=5)
    before = _logits(model, ids)  # the offloaded weights live in the hooks' store: the logits read them
    config = RoseConfig(sparsity=0.5, blocksize=32, rotation="layer")
    with pytest.raises(
        RotationError, match="rotation='layer' .* needs the whole model in memory.* rotation='residual'"
    ):
        RosePruner(model, config).prune(calibration(), progress=False)
    assert torch.equal(_logits(model, ids), before)
    assert not model.model.layers[0].self_attn.q_proj._forward_pre_hooks  # no rotation hook left behind


def test_layer_rotation_refuses_to_save_through_rose_hf(tmp_path):
    from rose_hf.output import save_pruned

    config = RoseConfig(sparsity=0.5, blocksize=32, rotation="layer")
    with pytest.raises(RotationError, match="cannot be saved"):
        save_pruned(build("llama"), tmp_path / "out", {"config": config.to_dict()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tied", [True, False])
def test_a_device_map_with_disk_offload_takes_the_residual_rotation_and_saves_it(tmp_path, tied):
    """Embeddings, final norm and head on disk too: edited through their store, then saved."""
    source = tmp_path / "source"
    (tied_llama() if tied else _with_norm_weights(build("llama"))).save_pretrained(source)
    config = RoseConfig(sparsity=0.5, blocksize=32, rotation="residual", rotation_steps=10, refine="none")
    expected = AutoModelForCausalLM.from_pretrained(source)
    RosePruner(expected, config).prune(calibration(), progress=False)
    layers = len(expected.model.layers)
    device_map = {"model.embed_tokens": "disk", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "disk"}
    device_map |= {f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(layers)}
    model = AutoModelForCausalLM.from_pretrained(source, device_map=device_map, offload_folder=tmp_path / "offload")
    report = RosePruner(model, config).prune(calibration(), progress=False)
    assert report.untied_parameters == (model.lm_head.weight.numel() if tied else 0)
    ids = calibration(2, seed=5)
    assert torch.equal(_logits(model, ids), _logits(expected, ids))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.tie_word_embeddings is False
    assert torch.equal(_logits(loaded, ids), _logits(expected, ids))
