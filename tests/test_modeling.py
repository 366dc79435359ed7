import pytest
import torch
from torch import nn
from transformers import DynamicCache
from transformers.pytorch_utils import Conv1D

from rose_hf.modeling import (
    capture_calls,
    find_blocks,
    reuse_equal,
    run_block,
    strip_cache,
    target_modules,
    weight_matrix,
    write_weight,
)
from zoo import ZOO, build, calibration

EXPECTED_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma2": "model.layers",
    "gemma3": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_blocks_found_from_model_metadata(name):
    path, blocks = find_blocks(build(name))
    assert path == EXPECTED_PATHS[name] and len(blocks) >= 2


def test_block_path_override_and_errors():
    model = build("llama")
    assert find_blocks(model, "model.layers")[0] == "model.layers"
    with pytest.raises(ValueError, match="block_path='model.nope' does not exist"):
        find_blocks(model, "model.nope")
    with pytest.raises(ValueError, match="not a non-empty ModuleList"):
        find_blocks(model, "model.norm")
    with pytest.raises(ValueError, match=r"RoseConfig\(block_path="):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_target_and_ignore_regexes():
    _, blocks = find_blocks(build("llama"))
    names = set(target_modules(blocks[0], "model.layers.0", None, []))
    assert len(names) == 7 and "model.layers.0.mlp.down_proj" in names
    only_mlp = target_modules(blocks[0], "model.layers.0", [r"\.mlp\."], [r"down_proj"])
    assert set(only_mlp) == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}


def test_conv1d_weight_is_read_and_written_as_out_by_in():
    conv = Conv1D(5, 3)
    W = weight_matrix(conv)
    assert W.shape == (5, 3)
    new = torch.arange(15.0).reshape(5, 3)
    write_weight(conv, new)
    assert torch.equal(conv.weight, new.T)
    x = torch.randn(2, 3)
    torch.testing.assert_close(conv(x), x @ new.T + conv.bias)


def test_write_weight_keeps_the_parameter_its_dtype_and_its_sharers():
    linear = nn.Linear(3, 4).to(torch.bfloat16)
    other = nn.Linear(3, 4)
    other.weight = linear.weight  # tied: one Parameter object in two modules
    param = linear.weight
    new = torch.randn(4, 3)
    write_weight(linear, new)
    assert linear.weight is param and other.weight is param and param.requires_grad
    assert param.dtype == torch.bfloat16 and torch.equal(param, new.to(torch.bfloat16))


def test_captured_calls_share_tensors_that_repeat_between_batches():
    model = build("llama")
    _, blocks = find_blocks(model)
    batches = [{"input_ids": ids.unsqueeze(0)} for ids in calibration(3)]
    _, calls = capture_calls(model, blocks, batches)
    cos = [call.kwargs["position_embeddings"][0] for call in calls[1]]
    assert cos[1] is cos[0] and cos[2] is cos[0]  # the same positions: one rotary table kept
    a, b = torch.zeros(2), torch.ones(2)
    assert reuse_equal({"x": (a.clone(), b)}, {"x": (a, a)}) == {"x": (a, b)}
    assert reuse_equal({"x": (a.clone(), b)}, {"x": (a, a)})["x"][0] is a
    assert reuse_equal([torch.zeros(3)], [a])[0] is not a  # another shape is never merged


def test_strip_cache_removes_caches_everywhere():
    cache = DynamicCache()
    cleaned = strip_cache({"past_key_values": cache, "use_cache": True, "x": (cache, 1), "layer_past": (1,)})
    assert cleaned == {"past_key_values": None, "use_cache": False, "x": (None, 1), "layer_past": None}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_replayed_calls_reproduce_the_models_hidden_states(name):
    model = build(name)
    ids = calibration(2, seqlen=16)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states
        first, calls = capture_calls(model, blocks, [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}])
        for sample in range(2):
            hidden = first[sample]
            for index, block in enumerate(blocks):
                torch.testing.assert_close(hidden, want[index][sample : sample + 1])
                again = run_block(block, hidden, calls[index][sample], torch.device("cpu"))
                # Replaying the same call twice gives the same output: no cache grows in between.
                assert torch.equal(again, run_block(block, hidden, calls[index][sample], torch.device("cpu")))
                hidden = again


def _contains_cache(value) -> bool:
    if isinstance(value, DynamicCache):
        return True
    if isinstance(value, dict):
        return any(_contains_cache(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_contains_cache(v) for v in value)
    return False


def test_capture_keeps_per_block_kwargs_and_no_cache():
    model = build("gemma3")  # sliding, full, sliding
    _, blocks = find_blocks(model)
    with torch.no_grad():
        _, calls = capture_calls(model, blocks, [{"input_ids": calibration(1, seqlen=20)}])
    sliding, full, sliding2 = (calls[i][0].kwargs for i in range(3))
    assert sliding["attention_mask"] is not None  # the window needs an explicit mask
    assert full["attention_mask"] is None or not torch.equal(sliding["attention_mask"], full["attention_mask"])
    assert torch.equal(sliding["attention_mask"], sliding2["attention_mask"])
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    assert not any(_contains_cache((c.args, c.kwargs)) for block in calls for c in block)
    assert all("forward" not in block.__dict__ for block in blocks)


def test_capture_restores_forward_when_the_model_fails():
    model = build("llama")
    _, blocks = find_blocks(model)
    with pytest.raises(IndexError):
        capture_calls(model, blocks, [{"input_ids": torch.tensor([[1, 10_000]])}])
    assert all("forward" not in block.__dict__ for block in blocks)


class _SwallowsValueErrors(nn.Module):
    """A model whose block loop swallows ValueError (as some modeling code does around optional paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head_runs = 0

    def forward(self, input_ids, use_cache=False):
        x = input_ids.float().unsqueeze(-1).expand(*input_ids.shape, 4)
        for layer in self.layers:
            try:
                x = layer(x)
            except ValueError:
                pass
        self.head_runs += 1
        return x


def test_the_capture_stop_gets_through_code_that_catches_value_errors():
    model = _SwallowsValueErrors()
    _, calls = capture_calls(model, model.layers, [{"input_ids": torch.tensor([[1, 2, 3]])}] * 2)
    assert [len(c) for c in calls] == [2, 2]
    assert model.head_runs == 0  # the stop was not swallowed: nothing after the last block ran
