"""Check a whole pruning run before any weight changes, and report every problem found at once.

A run that can fail on a module's shape, dtype or weights, or on the calibration tokens, fails here,
with each problem named, instead of in block 7 after blocks 0 to 6 were overwritten. What only
shows while pruning (a Hessian that overflows) is named by ``PruningError`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from rose_hf.config import RoseConfig
from rose_hf.data import Batch, count_tokens
from rose_hf.errors import PreflightError, PruningError
from rose_hf.modeling import weight_matrix

_POSITION_KEYS = ("max_position_embeddings", "n_positions")
__all__ = ["PreflightError", "PruningError", "check_calibration", "check_modules"]


def check_modules(
    blocks: Mapping[int, Mapping[str, nn.Module]],
    block_path: str,
    config: RoseConfig,
    holds_weights: Callable[[nn.Module], bool],
) -> list[str]:
    """Problems with the target modules: none matched, empty blocks, N:M widths, dtypes, weights.

    ``blocks`` maps each block index to its target modules. ``holds_weights(module)`` is False where
    the weights are not loaded yet (streaming, accelerate offload): their values are not checked.
    """
    problems: list[str] = []
    if not any(blocks.values()):
        return [
            f"no module inside {block_path} matches targets={config.targets} and ignore={config.ignore}: there is "
            "nothing to prune; widen targets or narrow ignore (they are regexes on full module names)"
        ]
    if config.targets is None:
        empty = [index for index, modules in blocks.items() if not modules]
        if empty:
            problems.append(
                f"blocks {empty[:8]} of {block_path} have no nn.Linear or Conv1D left to prune (after ignore="
                f"{config.ignore}); pass RoseConfig(block_path=...) if these are not the decoder blocks"
            )
    n, m = config.nm
    for modules in blocks.values():
        for name, module in modules.items():
            problems += _module_problems(name, module, n, m, config.pattern, holds_weights(module))
    return problems


def _module_problems(name: str, module: nn.Module, n: int, m: int, pattern: str, weights_present: bool) -> list[str]:
    W = weight_matrix(module)
    found = []
    if m and W.shape[1] % m:
        found.append(
            f"{name} has {W.shape[1]} input columns, not a multiple of M={m} from pattern={pattern!r}; "
            f"leave it dense with ignore=[{name.rsplit('.', 1)[-1]!r}] or use pattern='unstructured'"
        )
    if not W.dtype.is_floating_point:
        found.append(
            f"{name} has {W.dtype} weights (quantized or integer), which cannot be pruned here; load the model "
            "in float32, bfloat16 or float16 without a quantization_config"
        )
    elif weights_present and W.is_meta:
        found.append(
            f"{name} is on the meta device (no weights loaded); load the model with weights, or prune the "
            "checkpoint folder with rose_hf.streaming.prune_checkpoint"
        )
    elif weights_present and not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        found.append(f"{name} holds {bad} NaN or inf weights of {W.numel()}; the checkpoint is damaged: re-download it")
    return found


def check_calibration(batches: list[Batch], model: nn.Module) -> list[str]:
    """Problems with the calibration tokens against the model's vocabulary and positions."""
    if not batches:
        return []
    problems: list[str] = []
    if count_tokens(batches) == 0:
        problems.append(
            "the calibration attention masks mark no token as real (all zeros), so there is nothing to "
            "calibrate on; pass attention_mask=1 for real tokens, or no mask at all"
        )
    ids = [batch["input_ids"] for batch in batches]
    low, high = min(int(t.min()) for t in ids), max(int(t.max()) for t in ids)
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if low < 0 or (vocab is not None and high >= vocab):
        problems.append(
            f"calibration token ids span [{low}, {high}] but the model's vocabulary has ids [0, {vocab}); "
            "tokenise the calibration text with this model's own tokenizer"
        )
    model_config = getattr(model, "config", None)
    positions = next((getattr(model_config, k) for k in _POSITION_KEYS if getattr(model_config, k, None)), None)
    longest = max(int(t.shape[1]) for t in ids)
    if positions is not None and longest > positions:
        problems.append(
            f"calibration windows are {longest} tokens but the model has {positions} positions; "
            f"use seqlen={positions} or less (CLI: --seqlen {positions})"
        )
    return problems
