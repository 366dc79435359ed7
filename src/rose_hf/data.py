"""Calibration data: normalise what users pass, and cut seeded token windows from text."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
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
            mask_t = torch.as_tensor(mask).to(torch.long)
            if mask_t.dim() == 1:
                mask_t = mask_t.unsqueeze(0)
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
    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask"):
            if key in batch:
                digest.update(key.encode())
                digest.update(str(tuple(batch[key].shape)).encode())
                digest.update(batch[key].to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()


def tokenised_batches(dataset: Any, nsamples: int | None = None) -> list[Batch]:
    """Batches from the first ``nsamples`` rows of a ``datasets.Dataset`` with an ``input_ids`` column."""
    rows = dataset if nsamples is None else dataset.select(range(min(nsamples, len(dataset))))
    return as_batches([{k: row[k] for k in ("input_ids", "attention_mask") if k in row} for row in rows])


def calibration_batches(
    tokenizer: Any,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    split: str | None = None,
    column: str = "text",
    config: str | None = None,
    chat: bool = False,
) -> list[Batch]:
    """Calibration batches from any source ``rose_hf.sources`` reads.

    A ``save_to_disk`` folder of token ids is used as it is. Otherwise the text (the ``column`` of a
    file of records, a folder, a Hub dataset with ``config`` / ``split``, or a named preset) is
    tokenised and cut into ``nsamples`` seeded windows of ``seqlen``. With ``chat=True`` the column
    holds conversations (lists of ``{"role", "content"}``), each rendered with the tokenizer's chat
    template, so the calibration text looks like what a chat model is served.
    """
    from rose_hf import sources

    if Path(source).is_dir():
        dataset = sources.open_local(Path(source), split)
        if "input_ids" in dataset.column_names:
            return tokenised_batches(dataset, nsamples)
    if chat:
        text = chat_text(tokenizer, sources.load_records(source, split, config, column), source, column)
    else:
        text = sources.load_text(source, split, config, column)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    return as_batches(sample_windows(ids, nsamples, seqlen, seed))


def chat_text(tokenizer: Any, conversations: list[Any], source: str, column: str) -> str:
    """Conversations rendered with ``tokenizer``'s chat template, joined with blank lines."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"calibrating on chats from {source!r} needs a tokenizer with a chat template, and this one has none; "
            "drop --calib-chat, or use the instruct model's tokenizer."
        )
    rendered = []
    for index, messages in enumerate(conversations):
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
            raise ValueError(
                f"record {index} of {source!r}: column {column!r} must hold a list of {{'role', 'content'}} "
                f"messages for --calib-chat, not {type(messages).__name__}; name the column with --calib-column."
            )
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return "\n\n".join(rendered)


def unique_ids(batches: list[Batch]) -> torch.Tensor:
    """Sorted distinct token ids of all ``input_ids`` in ``batches``."""
    ids = [batch["input_ids"].reshape(-1) for batch in batches]
    return torch.unique(torch.cat(ids)) if ids else torch.empty(0, dtype=torch.long)


def describe_calibration(calib: Any, batches: list[Batch], seed: int) -> dict[str, Any]:
    """The calibration part of a provenance record: source, size, seed and token fingerprint."""
    return {
        "source": getattr(calib, "source", None) or type(calib).__name__,
        "nsamples": len(batches),
        "seqlen": int(batches[0]["input_ids"].shape[1]) if batches else None,
        "seed": seed,
        "sha256": fingerprint(batches),
    }
