"""Blocks of models dispatched with accelerate (``device_map``, ``cpu_offload``, ``disk_offload``).

accelerate keeps an offloaded module's weights in a side store (its hook's ``weights_map``: a dict
in CPU RAM or memory-mapped files on disk) and leaves meta tensors in the module; the hook loads
them for each forward and drops them after. Pruning needs a block's weights in place for the whole
block (calibrate, prune, then propagate with the *pruned* weights), so the pruner *onloads* a block
before its turn (weights from the store, offloading paused) and *offloads* it after, writing the
pruned weights back into the store, where the model's later forwards and ``save_pretrained`` read
them. Modules that are dispatched but not offloaded run on their hook's execution device.
"""

from __future__ import annotations

import warnings
from collections.abc import MutableMapping
from dataclasses import dataclass, field

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight, set_module_tensor_to_device
from torch import nn


def align_hook(module: nn.Module) -> AlignDevicesHook | None:
    """The accelerate ``AlignDevicesHook`` attached to ``module`` itself, if any."""
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return next((h for h in hooks if isinstance(h, AlignDevicesHook)), None)


def execution_device(block: nn.Module) -> torch.device | None:
    """Where accelerate runs ``block`` (the first hooked submodule's execution device), or ``None``."""
    for module in block.modules():
        hook = align_hook(module)
        if hook is not None and hook.execution_device is not None:
            device = hook.execution_device
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


@dataclass
class Onloaded:
    """The modules of one block whose offloading ``onload`` paused."""

    modules: list[tuple[nn.Module, AlignDevicesHook]] = field(default_factory=list)


def onload(block: nn.Module, device: torch.device) -> Onloaded:
    """Load every offloaded weight of ``block`` onto ``device`` and pause its offloading."""
    done = Onloaded()
    for module in block.modules():
        hook = align_hook(module)
        if hook is None or not hook.offload:
            continue
        for name in _stored_names(module, hook):
            set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
        hook.offload = False
        done.modules.append((module, hook))
    return done


def offload(done: Onloaded) -> None:
    """Write the (pruned) weights of ``onload``'s modules back to their stores; resume offloading."""
    for module, hook in done.modules:
        for name in _stored_names(module, hook):
            _store(hook.weights_map, name, getattr(module, name).detach().to("cpu"))
            set_module_tensor_to_device(module, name, "meta")
        hook.offload = True


def _stored_names(module: nn.Module, hook: AlignDevicesHook) -> list[str]:
    names = [name for name, _ in module.named_parameters(recurse=False)]
    if hook.offload_buffers:
        names += [name for name, _ in module.named_buffers(recurse=False)]
    return names


def _store(weights_map: object, name: str, value: torch.Tensor) -> None:
    prefix = ""
    if isinstance(weights_map, PrefixedDataset):
        prefix, weights_map = weights_map.prefix, weights_map.dataset
    key = prefix + name
    if isinstance(weights_map, OffloadedWeightsLoader):
        if key in weights_map.state_dict or weights_map.save_folder is None:
            if key not in weights_map.state_dict:
                warnings.warn(
                    f"{key} was offloaded straight from the checkpoint's files; its pruned value is kept in CPU "
                    "memory. Pass offload_folder= to from_pretrained to keep pruned weights on disk.",
                    stacklevel=3,
                )
            weights_map.state_dict[key] = value
        else:
            offload_weight(value, key, weights_map.save_folder, index=weights_map.index)
    elif isinstance(weights_map, MutableMapping):
        weights_map[key] = value
    else:
        raise TypeError(
            f"cannot write the pruned {key} back into accelerate's offload store ({type(weights_map).__name__}); "
            "load the model without offloading, or use rose_hf.streaming for models larger than memory."
        )
