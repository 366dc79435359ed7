"""Models dispatched or offloaded with accelerate prune to the same weights as models in memory."""

import warnings

import pytest
import torch
from accelerate import cpu_offload, disk_offload
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rose_hf import RoseConfig, RosePruner
from rose_hf.offload import execution_device
from zoo import build, calibration

CONFIG = RoseConfig(sparsity=0.6, blocksize=32)


def _pruned_in_memory(source, config=CONFIG):
    model = AutoModelForCausalLM.from_pretrained(source)
    RosePruner(model, config).prune(calibration(), progress=False)
    return model


def _same_weights_and_logits(expected, model, ids):
    for name, tensor in expected.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(expected(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("how", "config"),
    [
        ("cpu_offload", CONFIG),
        ("disk_offload", CONFIG),
        ("cpu_offload", RoseConfig(sparsity=0.6, blocksize=32, refine="admm")),
        ("disk_offload", RoseConfig(sparsity=0.6, blocksize=32, allocation="owl", owl_lambda=0.1)),
        ("disk_offload", RoseConfig(sparsity=0.6, blocksize=32, rotation="heads", rotation_steps=20)),
        ("cpu_offload", RoseConfig(pattern="2:4", blocksize=32, channel_permutation=True)),
    ],
)
def test_offloaded_model_prunes_like_in_memory(tmp_path, how, config):
    source = tmp_path / "source"
    build("llama").save_pretrained(source)
    expected = _pruned_in_memory(source, config)

    model = AutoModelForCausalLM.from_pretrained(source)
    if how == "cpu_offload":
        cpu_offload(model, execution_device="cpu")
    else:
        disk_offload(model, tmp_path / "offload", execution_device="cpu")
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    RosePruner(model, config).prune(calibration(), progress=False)

    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # offloaded again
    ids = calibration(2, seed=5)
    with torch.no_grad():
        assert torch.equal(expected(ids).logits, model(ids).logits)  # the hooks now load pruned weights


@pytest.mark.parametrize("offload_folder", [True, False])
def test_device_map_with_disk_offload_prunes_and_saves_the_pruned_weights(tmp_path, offload_folder):
    source = tmp_path / "source"
    build("llama").save_pretrained(source)
    expected = _pruned_in_memory(source)

    layers = len(expected.model.layers)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(layers)}
    model = AutoModelForCausalLM.from_pretrained(source, device_map=device_map, offload_folder=tmp_path / "offload")
    assert execution_device(model.model.layers[1]) == torch.device("cpu")
    loader = model.model.layers[1].self_attn.q_proj._hf_hook.weights_map.dataset
    key = "model.layers.1.self_attn.q_proj.weight"
    if offload_folder:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # nothing kept in memory: all written to the folder
            RosePruner(model, CONFIG).prune(calibration(), progress=False)
        assert (tmp_path / "offload" / f"{key}.dat").is_file() and key not in loader.state_dict
    else:
        loader.save_folder = None  # as when accelerate serves the weights straight from the checkpoint
        with pytest.warns(UserWarning, match="kept in CPU memory"):
            RosePruner(model, CONFIG).prune(calibration(), progress=False)
        assert key in loader.state_dict

    ids = calibration(2, seed=5)
    with torch.no_grad():
        assert torch.equal(expected(ids).logits, model(ids).logits)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert "model.layers.1.mlp.down_proj.weight" in saved  # a disk-offloaded layer, written pruned
    for name, tensor in expected.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
