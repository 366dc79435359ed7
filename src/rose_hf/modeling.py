"""Model plumbing: find decoder blocks and their prunable modules, capture and replay block calls;
build a model with empty (meta) weights."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.pytorch_utils import Conv1D

from rose_hf.offload import execution_device

# Used only when a model declares no ``_no_split_modules``.
KNOWN_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers")
# Keyword arguments that carry a KV cache (or ask for one) under their various historical names.
_CACHE_KEYS = ("past_key_value", "past_key_values", "layer_past")


class StopForward(Exception):
    """Raised inside the last decoder block to end a capture forward early."""


def find_blocks(model: nn.Module, block_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Locate the ``nn.ModuleList`` of decoder blocks.

    Order of preference: the explicit ``block_path``; the largest ``ModuleList`` whose children are
    all of a class named in the model's ``_no_split_modules`` (how transformers itself marks its
    blocks); the ``KNOWN_BLOCK_PATHS``.

    Returns:
        ``(dotted path, module list)``.
    """
    if block_path is not None:
        try:
            found = model.get_submodule(block_path)
        except AttributeError:
            raise ValueError(f"block_path={block_path!r} does not exist in {type(model).__name__}.") from None
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(f"block_path={block_path!r} is a {type(found).__name__}, not a non-empty ModuleList.")
        return block_path, found
    names = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if names and all(type(child).__name__ in names for child in module):
                if best is None or len(module) > len(best[1]):
                    best = (path, module)
    if best is not None:
        return best
    for path in KNOWN_BLOCK_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}; pass "
        "RoseConfig(block_path='model.layers') (the dotted path of its ModuleList of blocks)."
    )


def is_prunable(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's transposed linear)."""
    return isinstance(module, (nn.Linear, Conv1D))


def target_modules(
    block: nn.Module, prefix: str, targets: Sequence[str] | None, ignore: Sequence[str]
) -> dict[str, nn.Module]:
    """Prunable modules of ``block`` keyed by full name (``prefix.sub.name``), filtered by regex."""
    found: dict[str, nn.Module] = {}
    for sub, module in block.named_modules():
        if not sub or not is_prunable(module):
            continue
        name = f"{prefix}.{sub}"
        if targets is not None and not any(re.search(p, name) for p in targets):
            continue
        if any(re.search(p, name) for p in ignore):
            continue
        found[name] = module
    return found


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out_features, in_features)``: a view, transposed for ``Conv1D``."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.T if isinstance(module, Conv1D) else weight


def write_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Copy ``W`` ``(out, in)`` into the module's weight in its own layout, dtype and device.

    Copied into the existing storage rather than replacing it: weights that ``from_pretrained``
    memory-maps share one mapping, which stays resident as long as any of them is alive, so new
    storage would add the block's size to the resident set instead of taking the old pages' place
    (docs/performance.md, step 7).
    """
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    source = W.T if isinstance(module, Conv1D) else W
    with torch.no_grad():
        weight.copy_(source.to(dtype=weight.dtype, device=weight.device))


def reuse_equal(value: Any, previous: Any) -> Any:
    """``value`` with every tensor that equals the one at the same place in ``previous`` replaced by it.

    Captured calls hold a rotary table (and sometimes a mask) per batch; they are usually the same
    for every batch, and sharing one tensor keeps ``nsamples`` copies out of memory. Only the
    tensor at the same position of the previous call is compared, so the cost stays linear.
    """
    if isinstance(value, torch.Tensor):
        same = (
            isinstance(previous, torch.Tensor)
            and previous.shape == value.shape
            and previous.dtype == value.dtype
            and previous.device == value.device
            and torch.equal(previous, value)
        )
        return previous if same else value
    if isinstance(value, Mapping) and isinstance(previous, Mapping):
        return {key: reuse_equal(item, previous.get(key)) for key, item in value.items()}
    if type(value) in (tuple, list) and type(previous) is type(value) and len(previous) == len(value):
        return type(value)(reuse_equal(a, b) for a, b in zip(value, previous))
    return value


def strip_cache(value: Any) -> Any:
    """Return ``value`` with every KV cache removed: caches become ``None``, ``use_cache`` False.

    A cache replayed into a block grows on every call and silently changes attention.
    """
    if isinstance(value, Cache):
        return None
    if isinstance(value, Mapping):
        cleaned: dict[str, Any] = {}
        for key, item in value.items():
            if key in _CACHE_KEYS:
                cleaned[key] = None
            elif key == "use_cache":
                cleaned[key] = False
            else:
                cleaned[key] = strip_cache(item)
        return cleaned
    if isinstance(value, tuple):
        return tuple(strip_cache(item) for item in value)
    if isinstance(value, list):
        return [strip_cache(item) for item in value]
    return value


def move_to(value: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples, lists and dicts to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: move_to(item, device) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(move_to(item, device) for item in value)
    if isinstance(value, list):
        return [move_to(item, device) for item in value]
    return value


@dataclass
class BlockCall:
    """Everything a block received in one forward, except its hidden states."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_as_kwarg: bool = False


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, device: torch.device) -> torch.Tensor:
    """Run ``block`` on ``hidden`` with the captured call (moved to ``device``); return hidden states."""
    args = move_to(call.args, device)
    kwargs = move_to(call.kwargs, device)
    if call.hidden_as_kwarg:
        out = block(*args, hidden_states=hidden, **kwargs)
    else:
        out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_calls(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: Iterable[Mapping[str, torch.Tensor]],
    sink: Callable[[torch.Tensor], None] | None = None,
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Run the model on each batch with every block replaced by a recorder.

    The recorders keep block 0's hidden-state input and, for *every* block, the positional and
    keyword arguments it received (they differ between blocks in models such as Gemma 3, whose
    sliding-window and global layers get different masks and rotary embeddings). The last block
    raises ``StopForward``, so the model's head never runs. No block computes anything.

    Returns:
        ``(first_inputs, calls)``: ``first_inputs[s]`` is block 0's input for batch ``s`` (empty
        when ``sink`` is given: each input is passed to ``sink`` instead, as soon as it exists);
        ``calls[b][s]`` is block ``b``'s call for batch ``s``, with KV caches stripped.
    """
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    first_inputs: list[torch.Tensor] = []
    saved = [block.__dict__.get("forward") for block in blocks]
    sink = sink or first_inputs.append
    embed_device = _input_device(model)
    try:
        for index, block in enumerate(blocks):
            block.forward = _Recorder(index, index == len(blocks) - 1, calls[index], sink)  # type: ignore[method-assign]
        for count, batch in enumerate(batches, start=1):
            try:
                model(**{k: v.to(embed_device) for k, v in batch.items()}, use_cache=False)
            except StopForward:
                pass
            missing = [i for i, got in enumerate(calls) if len(got) != count]
            if missing:
                raise RuntimeError(
                    f"decoder blocks {missing[:5]} were not called once in the forward of batch {count}; "
                    "the block list found is not the one the model iterates. Pass RoseConfig(block_path=...)."
                )
    finally:
        for block, original in zip(blocks, saved):
            if original is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = original  # type: ignore[method-assign]
    return first_inputs, calls


@dataclass
class _Recorder:
    """Stands in for a block's ``forward`` during capture: records the call, computes nothing."""

    index: int
    last: bool
    calls: list[BlockCall]
    sink: Callable[[torch.Tensor], None]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest, as_kwarg = args[0], args[1:], False
        else:
            hidden, rest, as_kwarg = kwargs.pop("hidden_states"), (), True
        if self.index == 0:
            self.sink(hidden.detach())
        call = BlockCall(strip_cache(rest), strip_cache(kwargs), as_kwarg)
        if self.calls:  # rotary tables and masks usually repeat from batch to batch: keep one copy
            previous = self.calls[-1]
            call = BlockCall(reuse_equal(call.args, previous.args), reuse_equal(call.kwargs, previous.kwargs), as_kwarg)
        self.calls.append(call)
        if self.last:
            raise StopForward
        return hidden


def _input_device(model: nn.Module) -> torch.device:
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if isinstance(embeddings, nn.Module):
        dispatched = execution_device(embeddings)  # accelerate-dispatched, maybe offloaded to meta
        if dispatched is not None:
            return dispatched
        for param in embeddings.parameters():
            return param.device
    return next(model.parameters()).device


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU for a module without parameters)."""
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def empty_model(source: str | Path) -> nn.Module:
    """The model of checkpoint folder ``source`` with every weight on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(source)
    dtype = getattr(model_config, "dtype", None) or torch.float32
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype)


def own_weights(model: nn.Module, module: nn.Module | None) -> set[str]:
    """Full names of ``module``'s own parameters in ``model`` (empty for ``None``)."""
    if module is None:
        return set()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return {names[id(p)] for p in module.parameters(recurse=False) if id(p) in names}
