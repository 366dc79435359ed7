"""Evaluation: WikiText-style perplexity and a sparsity census of a model's weights."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rose_hf.config import CONFIG_NAME, parse_pattern
from rose_hf.modeling import find_blocks, target_modules, weight_matrix
from rose_hf.report import overall_sparsity
from rose_hf.shards import CheckpointReader


def perplexity_windows(token_ids: torch.Tensor, seqlen: int, bos_token_id: int | None = None) -> torch.Tensor:
    """Split a 1-D token stream into non-overlapping windows of ``seqlen`` (the tail is dropped).

    With ``bos_token_id`` every window starts with BOS followed by ``seqlen - 1`` text tokens, for
    tokenizers whose models expect BOS first (Llama-style); loss is never taken on the BOS itself.
    """
    ids = token_ids.reshape(-1).to(torch.long)
    step = seqlen - 1 if bos_token_id is not None else seqlen
    count = ids.numel() // step
    if count == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}.")
    windows = ids[: count * step].reshape(count, step)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((count, 1), bos_token_id, dtype=torch.long), windows], dim=1)
    return windows


def bos_token_for(tokenizer: Any) -> int | None:
    """The BOS id to start every window with, if this tokenizer puts BOS first when it encodes.

    Llama-style tokenizers do, and their models expect it; GPT-2-style ones do not.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return int(bos) if ids and ids[0] == bos else None


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over ``(count, seqlen)`` windows; every predicted token counts once."""
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    try:
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nll += float(nll.item())
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def weight_stats(W: torch.Tensor, n: int = 0, m: int = 0) -> dict[str, Any]:
    """Shape, fraction of exact zeros and (for ``m > 0``) N:M validity of an ``(out, in)`` matrix."""
    is_zero = W == 0
    entry: dict[str, Any] = {"shape": list(W.shape), "sparsity": float(is_zero.float().mean().item())}
    if m:
        valid = W.shape[1] % m == 0 and bool((is_zero.reshape(W.shape[0], -1, m).sum(dim=2) >= m - n).all().item())
        entry["nm_valid"] = valid
    return entry


def _overall(modules: dict[str, dict[str, Any]]) -> float:
    return overall_sparsity((entry["shape"], entry["sparsity"]) for entry in modules.values())


def _prunable(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable module inside the decoder blocks, by full name, in block order."""
    block_path, blocks = find_blocks(model)
    modules: dict[str, nn.Module] = {}
    for index, block in enumerate(blocks):
        modules.update(target_modules(block, f"{block_path}.{index}", None, ()))
    return modules


def sparsity_census(model: nn.Module, n: int = 0, m: int = 0) -> dict[str, Any]:
    """``weight_stats`` of every prunable module inside the decoder blocks of a loaded model."""
    modules = {name: weight_stats(weight_matrix(module).detach(), n, m) for name, module in _prunable(model).items()}
    return {"overall_sparsity": _overall(modules), "modules": modules}


def inspect_checkpoint(path: str | Path, pattern: str | None = None) -> dict[str, Any]:
    """``weight_stats`` of every prunable block module of a saved checkpoint, read tensor by tensor.

    The architecture is instantiated on the ``meta`` device (no memory) only to learn which weights
    belong to decoder-block ``nn.Linear``/``Conv1D`` modules; the numbers come from the
    ``*.safetensors`` files. ``pattern`` defaults to the one recorded in ``rose_config.json``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    folder = Path(path)
    record_file = folder / CONFIG_NAME
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else None
    recipe = (record or {}).get("config", {})
    pattern = pattern or recipe.get("pattern")
    n, m = parse_pattern(pattern) if pattern else (0, 0)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors files in {str(folder)!r}.")
    reader = CheckpointReader(folder)
    stored = set(reader.names())
    modules: dict[str, dict[str, Any]] = {}
    missing = []
    for name, module in _prunable(skeleton).items():
        key = f"{name}.weight"
        if key not in stored:
            missing.append(key)
            continue
        tensor = reader.get(key)
        modules[name] = weight_stats(tensor.T if isinstance(module, Conv1D) else tensor, n, m)
    if missing:
        raise ValueError(f"{len(missing)} block weights are missing from the checkpoint, e.g. {missing[0]!r}.")
    return {
        "overall_sparsity": _overall(modules),
        "pattern": pattern if m else None,
        "modules": modules,
        "rose_config": recipe or None,
    }
