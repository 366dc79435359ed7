"""Calibration data: normalise what users pass, and cut seeded token windows from text."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


def as_batches(calib: Any) -> list[Batch]:
    """Turn calibration input into a list of ``{"input_ids", ["attention_mask"]}`` batches.

    Accepted: a ``(samples, seq)`` or ``(seq,)`` tensor of token ids (one batch per row); an
    iterable (a ``DataLoader``, a list, a ``datasets.Dataset``) of token-id tensors or lists, or of
    mappings with ``input_ids`` and optional ``attention_mask`` (``BatchEncoding`` included).
    Every batch becomes 2-D ``(batch, seq)`` ``long`` tensors on the CPU device it came on.
    """
    if calib is None:
        raise ValueError("calibration data is None; pass token ids, e.g. rose_hf.data.sample_windows(...).")
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 1:
            calib = calib.unsqueeze(0)
        if calib.dim() != 2:
            raise ValueError(f"a calibration tensor must be (samples, seq); got shape {tuple(calib.shape)}.")
        items: Iterable[Any] = list(calib.unbind(0))
    elif isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable):
        raise ValueError(
            f"calibration data of type {type(calib).__name__} is not supported; pass token-id tensors "
            "or dicts with 'input_ids' (a DataLoader or list of them)."
        )
    else:
        items = calib
    batches = [_as_batch(item, index) for index, item in enumerate(items)]
    if not batches:
        raise ValueError("calibration data is empty; pass at least one sample (128 is typical).")
    return batches


def _as_batch(item: Any, index: int) -> Batch:
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"calibration item {index} has keys {sorted(item)} but no 'input_ids'.")
        ids = _as_ids(item["input_ids"], index)
        mask = item.get("attention_mask")
        batch: Batch = {"input_ids": ids}
        if mask is not None:
            mask_t = _as_ids(mask, index)
            if mask_t.shape != ids.shape:
                raise ValueError(
                    f"calibration item {index}: attention_mask {tuple(mask_t.shape)} does not match "
                    f"input_ids {tuple(ids.shape)}."
                )
            batch["attention_mask"] = mask_t
        return batch
    return {"input_ids": _as_ids(item, index)}


def _as_ids(value: Any, index: int) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.numel() == 0:
        raise ValueError(f"calibration item {index} has shape {tuple(tensor.shape)}; expected (batch, seq).")
    if tensor.is_floating_point():
        raise ValueError(f"calibration item {index} holds floats; pass integer token ids.")
    return tensor.to(torch.long)


def count_tokens(batches: Iterable[Batch]) -> int:
    """Real (non-padding) tokens across batches."""
    total = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        total += int(mask.sum().item()) if mask is not None else batch["input_ids"].numel()
    return total


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Cut ``nsamples`` random windows of ``seqlen`` tokens from a 1-D token stream, reproducibly.

    The window starts are drawn from a private ``torch.Generator`` seeded with ``seed``, so the
    global RNG is untouched and the same seed always gives the same windows.

    Returns:
        ``(nsamples, seqlen)`` long tensor.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples={nsamples} and seqlen={seqlen} must both be positive.")
    ids = token_ids.reshape(-1).to(torch.long)
    if ids.numel() <= seqlen:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens, too few for windows of seqlen={seqlen}; "
            "use a longer text or a smaller seqlen."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def fingerprint(batches: Iterable[Batch]) -> str:
    """sha256 over the calibration token ids (and masks), for provenance and idempotent pushes."""
    import hashlib

    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask"):
            if key in batch:
                digest.update(key.encode())
                digest.update(str(tuple(batch[key].shape)).encode())
                digest.update(batch[key].to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()
