"""Evaluation: WikiText-style perplexity and a sparsity census of a model's weights."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rose_hf.modeling import find_blocks, is_prunable, weight_matrix


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


def sparsity_census(model: nn.Module, n: int = 0, m: int = 0) -> dict[str, Any]:
    """Per prunable module inside the decoder blocks: shape, zero fraction, and N:M validity."""
    block_path, blocks = find_blocks(model)
    modules: dict[str, dict[str, Any]] = {}
    zeros = total = 0
    for index, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if not sub or not is_prunable(module):
                continue
            W = weight_matrix(module).detach()
            is_zero = W == 0
            entry: dict[str, Any] = {"shape": list(W.shape), "sparsity": float(is_zero.float().mean().item())}
            if m and W.shape[1] % m == 0:
                per_group = is_zero.reshape(W.shape[0], -1, m).sum(dim=2)
                entry[f"{n}:{m}"] = bool((per_group >= m - n).all().item())
            modules[f"{block_path}.{index}.{sub}"] = entry
            zeros += int(is_zero.sum().item())
            total += W.numel()
    return {"overall_sparsity": zeros / total if total else 0.0, "modules": modules}
