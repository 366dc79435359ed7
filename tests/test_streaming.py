import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rose_hf import RoseConfig, RosePruner
from rose_hf.shards import CheckpointReader
from rose_hf.streaming import prune_checkpoint
from zoo import build, calibration


def _tensors(folder):
    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader.names()}


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("llama", {}),
        ("gpt2", {}),
        ("gemma3", {"pattern": "2:4"}),
        ("qwen2", {"method": "magnitude"}),
        ("mistral", {"objective": "dense"}),
        ("opt", {"activations": "memory"}),
        ("gpt_neox", {}),
        ("llama", {"true_sequential": True}),
        ("gpt2", {"true_sequential": True, "activations": "memory"}),
        ("llama", {"refine": "admm"}),
        ("gemma3", {"pattern": "2:4", "refine": "admm", "true_sequential": True}),
        ("qwen2", {"refine": "refit"}),
        ("llama", {"allocation": "owl", "owl_lambda": 0.1}),
        ("gpt2", {"allocation": "error", "owl_lambda": 0.1, "true_sequential": True}),
        ("llama", {"rotation": "heads", "rotation_steps": 20}),
        ("gemma3", {"rotation": "heads", "rotation_steps": 20, "true_sequential": True}),
        ("qwen2", {"pattern": "2:4", "channel_permutation": True, "true_sequential": True}),
        ("gemma3", {"pattern": "2:4", "channel_permutation": True, "rotation": "heads", "rotation_steps": 20}),
        ("llama", {"rotation": "residual+heads", "rotation_steps": 10, "true_sequential": True}),
    ],
)
def test_streaming_equals_in_memory_bitwise(tmp_path, arch, config):
    """Tied and untied heads, scaled embeddings, learned positions; activations on disk and in memory."""
    source = tmp_path / "source"
    build(arch).save_pretrained(source, max_shard_size="50KB")
    activations = config.pop("activations", "disk")
    config = RoseConfig(blocksize=32, **config)
    calib = None if config.method == "magnitude" else calibration()

    model = AutoModelForCausalLM.from_pretrained(source)
    RosePruner(model, config).prune(calib, progress=False)
    model.save_pretrained(tmp_path / "memory")

    report = prune_checkpoint(source, tmp_path / "stream", config, calib, progress=False, activations=activations)
    memory, stream = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert memory.keys() == stream.keys()
    for name in memory:
        assert memory[name].dtype == stream[name].dtype and torch.equal(memory[name], stream[name]), name
    assert report.modules and (tmp_path / "stream" / "rose_config.json").is_file()
    if config.allocation != "uniform":  # the plan ran on the streamed blocks and moved sparsity
        assert len({round(m.sparsity, 3) for m in report.modules}) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert torch.isfinite(loaded(calibration(1)).logits).all()


def test_streaming_writes_one_shard_per_block_and_an_index(tmp_path):
    source = tmp_path / "source"
    model = build("llama")
    model.config.quantization_config = {"quant_method": "gguf"}
    model.save_pretrained(source)
    prune_checkpoint(source, tmp_path / "out", RoseConfig(blocksize=32), calibration(), progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with safe_open(str(tmp_path / "out" / files[0]), framework="pt") as handle:
        assert all(k.startswith("model.layers.0.") for k in handle.keys())
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in written
    record = json.loads((tmp_path / "out" / "rose_config.json").read_text())
    assert written["rose_hf"]["fingerprint"] == record["fingerprint"]  # the recipe in config.json too


def test_streaming_failure_leaves_nothing(tmp_path):
    source = tmp_path / "source"
    build("llama").save_pretrained(source)
    with pytest.raises(ValueError, match="calibration data is empty"):
        prune_checkpoint(source, tmp_path / "out", RoseConfig(), [], progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        prune_checkpoint(tmp_path / "nowhere", tmp_path / "out", RoseConfig(), calibration())


def test_streaming_reads_only_calibration_rows_and_never_the_head(tmp_path):
    from rose_hf.data import as_batches
    from rose_hf.distributed import World
    from rose_hf.streaming import CheckpointHome, empty_model

    source = tmp_path / "source"
    model = build("llama")  # untied head
    model.save_pretrained(source)
    staging = tmp_path / "staging"
    staging.mkdir()
    home = CheckpointHome(source, empty_model(source), RoseConfig(), staging, torch.device("cpu"), World())
    assert home.model.get_output_embeddings().weight.is_meta
    assert home.model.get_input_embeddings().weight.is_meta  # not read until the capture
    batches = as_batches(calibration())
    home.before_capture(batches)
    rows = torch.unique(torch.cat([b["input_ids"].reshape(-1) for b in batches]))
    table = home.model.get_input_embeddings().weight
    assert torch.equal(table[rows], model.get_input_embeddings().weight[rows].detach())


def test_an_edit_outside_the_blocks_is_staged_once_it_succeeds_and_read_back_as_changed(tmp_path):
    from rose_hf.data import as_batches
    from rose_hf.distributed import World
    from rose_hf.streaming import CheckpointHome, empty_model

    source = tmp_path / "source"
    model = build("llama")
    model.save_pretrained(source)
    staging = tmp_path / "staging"
    staging.mkdir()
    home = CheckpointHome(source, empty_model(source), RoseConfig(), staging, torch.device("cpu"), World())
    embed = home.model.get_input_embeddings()
    with pytest.raises(RuntimeError, match="stop"), home.edit(home.model, embed), torch.no_grad():
        embed.weight.mul_(2.0)
        raise RuntimeError("stop")
    assert home.changed == {} and not list(staging.iterdir()) and embed.weight.is_meta  # nothing staged
    with home.edit(home.model, embed), torch.no_grad():
        assert torch.equal(embed.weight, model.get_input_embeddings().weight)  # read from the source
        embed.weight.mul_(2.0)
    assert embed.weight.is_meta and set(home.changed) == {"model.embed_tokens.weight"}
    batches = as_batches(calibration())
    home.before_capture(batches)  # the capture reads the changed rows
    rows = torch.unique(torch.cat([b["input_ids"].reshape(-1) for b in batches]))
    assert torch.equal(embed.weight[rows], 2.0 * model.get_input_embeddings().weight[rows].detach())


def test_streaming_honours_max_shard_size_and_counts_tensor_bytes(tmp_path):
    source = tmp_path / "source"
    model = build("llama")
    model.save_pretrained(source)
    out = tmp_path / "out"
    prune_checkpoint(source, out, RoseConfig(blocksize=32), calibration(), progress=False, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    reader = CheckpointReader(out)
    per_file: dict[str, int] = {}
    for name, file in index["weight_map"].items():
        tensor = reader.get(name)
        per_file[file] = per_file.get(file, 0) + tensor.numel() * tensor.element_size()
    biggest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    assert len(per_file) > 3  # the tiny blocks (about 58 KB each) are split
    assert all(size <= max(20_000, biggest) for size in per_file.values()), per_file
    assert index["metadata"]["total_size"] == sum(per_file.values())  # tensor bytes, not file sizes
    with pytest.raises(ValueError, match="Unit 'XB' not supported"):
        prune_checkpoint(source, tmp_path / "never", RoseConfig(), calibration(), progress=False, max_shard_size="5XB")
    assert not (tmp_path / "never").exists()


def test_outputs_get_the_permissions_of_an_ordinary_folder(tmp_path):
    source = tmp_path / "source"
    build("llama").save_pretrained(source)
    prune_checkpoint(source, tmp_path / "out", RoseConfig(blocksize=32), calibration(), progress=False)
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkdtemp's 0700


def test_a_one_shot_calibration_iterable_is_read_once(tmp_path):
    source = tmp_path / "source"
    build("llama").save_pretrained(source)
    config = RoseConfig(blocksize=32)
    prune_checkpoint(source, tmp_path / "list", config, list(calibration()), progress=False)
    prune_checkpoint(source, tmp_path / "gen", config, (row for row in calibration()), progress=False)
    listed, generated = _tensors(tmp_path / "list"), _tensors(tmp_path / "gen")
    assert listed.keys() == generated.keys() and all(torch.equal(listed[k], generated[k]) for k in listed)
