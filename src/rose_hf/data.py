"""Calibration data: normalise what users pass, and cut seeded token windows from text."""

from __future__ import annotations

import hashlib
import json
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


NAMED_SOURCES = ("wikitext2", "c4")
# The Hub dataset behind each named source (the model card's ``datasets:``).
HUB_DATASETS = {"wikitext2": "Salesforce/wikitext", "c4": "allenai/c4"}
# Local files of records, read by the datasets builder of their format (never as raw text).
_RECORD_BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
# The first shard of each C4 split, as the SparseGPT and ROSE papers sample from.
_C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


def load_text(source: str, split: str | None = None, max_documents: int = 5000, column: str = "text") -> str:
    """Raw calibration or evaluation text.

    Args:
        source: ``"wikitext2"`` (``Salesforce/wikitext``, ``wikitext-2-raw-v1``) or ``"c4"``
            (``allenai/c4``, English, first training shard) through ``datasets`` (needs the Hub); a
            local ``.txt`` file (used as it is); a ``.jsonl`` file of one JSON object per line; or a
            ``.json`` (records, or JSON lines), ``.parquet`` or ``.csv`` file, read as records by
            ``datasets``' builder of that format. Records are joined with blank lines.
        split: Dataset split for named sources (``"train"`` by default; C4 offers ``train``/``validation``).
        max_documents: C4 documents to read (streamed), joined with blank lines.
        column: The field of each record that holds the text (files of records only).
    """
    path = Path(source)
    if path.suffix in _RECORD_BUILDERS and path.is_file():
        return _records_text(path, column)
    if path.suffix in (".txt", ".jsonl") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"calibration text {source!r} does not exist.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{source!r} is not UTF-8 text ({err.reason} at byte {err.start}); convert it, e.g. iconv -t UTF-8."
            ) from None
        if path.suffix == ".jsonl":
            lines = text.splitlines()
            try:
                return "\n\n".join(json.loads(line)[column] for line in lines if line.strip())
            except (KeyError, json.JSONDecodeError) as err:
                raise ValueError(
                    f"{source!r} must hold one JSON object with a {column!r} field per line ({err!r}); "
                    "name the field with --calib-column"
                ) from None
        return text
    if source not in NAMED_SOURCES:
        raise ValueError(
            f"calibration source {source!r} is neither a file nor one of {list(NAMED_SOURCES)}; "
            "pass a .txt/.jsonl path, a tokenised dataset folder, or a named source."
        )
    try:
        import datasets
    except ImportError:
        raise ImportError(f"source {source!r} needs the 'datasets' package: pip install 'rose_hf[data]'.") from None
    try:
        if source == "wikitext2":
            dataset = datasets.load_dataset(HUB_DATASETS[source], "wikitext-2-raw-v1", split=split or "train")
            return "\n\n".join(dataset["text"])
        split = split or "train"
        if split not in _C4_SHARDS:
            raise ValueError(f"split={split!r} is not a C4 split; use one of {sorted(_C4_SHARDS)}.")
        stream = datasets.load_dataset(
            HUB_DATASETS[source], data_files={split: _C4_SHARDS[split]}, split=split, streaming=True
        )
        return "\n\n".join(row["text"] for _, row in zip(range(max_documents), stream))
    except (ConnectionError, OSError) as err:
        raise ConnectionError(
            f"could not fetch {source!r} from the Hugging Face Hub ({err}); offline, pass a local .txt or "
            ".jsonl file or a tokenised dataset saved with save_to_disk."
        ) from None


def _records_text(path: Path, column: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{str(path)!r} needs the 'datasets' package: pip install 'rose_hf[data]'.") from None
    builder = _RECORD_BUILDERS[path.suffix]
    try:
        records = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # the builder's own parse errors
        raise ValueError(f"{str(path)!r} could not be read as {builder} records: {err}") from None
    if column not in records.column_names:
        raise ValueError(
            f"{str(path)!r} has columns {records.column_names}, none named {column!r}; name the text column "
            "with --calib-column (column= in rose_hf.data)."
        )
    values = records[column]
    if not all(isinstance(v, str) or v is None for v in values):
        raise ValueError(f"column {column!r} of {str(path)!r} does not hold text; name the text column.")
    return "\n\n".join(v for v in values if v)


def load_tokenised(folder: str | Path, nsamples: int | None = None) -> list[Batch]:
    """Batches from a tokenised ``datasets`` folder (``save_to_disk``) with an ``input_ids`` column."""
    try:
        import datasets
    except ImportError:
        raise ImportError("tokenised datasets need the 'datasets' package: pip install 'rose_hf[data]'.") from None
    dataset = datasets.load_from_disk(str(folder))
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"the dataset at {str(folder)!r} has columns {dataset.column_names}, no 'input_ids'.")
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
) -> list[Batch]:
    """Calibration batches from any supported source: a tokenised dataset folder is used as is,
    text (named, a local file, or the ``column`` of a local file of records) is tokenised and cut
    into ``nsamples`` seeded windows of ``seqlen``."""
    if Path(source).is_dir():
        return load_tokenised(source, nsamples)
    text = load_text(source, split, column=column)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    return as_batches(sample_windows(ids, nsamples, seqlen, seed))


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
