"""Reads and copies of safetensors files with plain file I/O: nothing is memory-mapped.

``safetensors.safe_open`` maps the whole file; every page a read touches (and the kernel's
fault-around neighbours) then counts in the process's resident set until the mapping is closed.
``CheckpointReader`` reads whole tensors one at a time (each read opens and closes its shard).
Streaming mode also needs two things that would touch far more than they use: a few thousand rows of
the embedding matrix, and a byte-for-byte copy of the tensors outside the decoder blocks. Both are
done here with ``pread``-style reads of the documented layout: an 8-byte little-endian header
length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors import SafetensorError, safe_open

WEIGHTS_INDEX = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_COPY_CHUNK = 1 << 20  # bytes per read when copying tensors between files


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code such as ``"BF16"``."""
    if code not in _DTYPES:
        raise ValueError(f"safetensors dtype {code!r} is not supported here; supported: {sorted(_DTYPES)}.")
    return _DTYPES[code]


def read_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """``(data_start, header)`` of a safetensors file; ``header`` keeps ``__metadata__`` if present."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (shorter than its 8-byte header length).")
        (size,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(path)!r} has a damaged safetensors header ({err}); re-download the file.") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} has a damaged safetensors header (not a JSON object); re-download the file.")
    data = os.path.getsize(path) - 8 - size
    end = max((int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"), default=0)
    if end > data:
        raise ValueError(
            f"{str(path)!r} is truncated: its header describes {end} bytes of tensors but {max(data, 0)} follow; "
            "re-download the file."
        )
    return 8 + size, header


def read_rows(path: str | Path, name: str, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (1-D indices along the first axis) of tensor ``name``, as a new tensor.

    Consecutive indices are read in one call; only the requested bytes are read.
    """
    start, header = read_header(path)
    entry = header[name]
    dtype = torch_dtype(entry["dtype"])
    shape = entry["shape"]
    row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
    wanted = rows.tolist()
    if any(r < 0 or r >= shape[0] for r in wanted):
        raise IndexError(f"row indices must lie in [0, {shape[0]}) for {name}; got {min(wanted)}..{max(wanted)}.")
    out = torch.empty((len(wanted), *shape[1:]), dtype=dtype)
    raw = out.view(torch.uint8).reshape(len(wanted), row_bytes).numpy()
    base = start + entry["data_offsets"][0]
    with open(path, "rb") as handle:
        fd = handle.fileno()
        i = 0
        while i < len(wanted):
            j = i + 1
            while j < len(wanted) and wanted[j] == wanted[j - 1] + 1:
                j += 1
            got = os.preadv(fd, [raw[i:j].data], base + wanted[i] * row_bytes)
            if got != (j - i) * row_bytes:
                raise OSError(f"short read of {name} rows {wanted[i]}..{wanted[j - 1]} in {str(path)!r}.")
            i = j
    return out


def copy_tensors(sources: dict[str, Path], target: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file holding the tensors ``sources`` (name -> file it is in), bytes as stored.

    Data is copied a megabyte at a time; neither file is mapped.
    """
    located: list[tuple[str, Path, int, dict[str, Any]]] = []
    headers: dict[Path, tuple[int, dict[str, Any]]] = {}
    for name in sorted(sources):
        path = Path(sources[name])
        if path not in headers:
            headers[path] = read_header(path)
        start, header = headers[path]
        located.append((name, path, start, header[name]))
    out_header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, _, _, entry in located:
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        out_header[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(out_header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors itself writes
    with open(target, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _, path, start, entry in located:
            _copy_range(
                path, start + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0], out
            )


def _copy_range(path: Path, begin: int, size: int, out: Any) -> None:
    with open(path, "rb") as source:
        source.seek(begin)
        left = size
        while left:
            chunk = source.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise OSError(f"{str(path)!r} ended {left} bytes early while copying a tensor.")
            out.write(chunk)
            left -= len(chunk)


def plan_shards(sizes: dict[str, int], max_shard_size: int | str) -> list[list[str]]:
    """Group tensor names into shards of at most ``max_shard_size`` bytes, in order.

    The grouping ``save_pretrained`` uses (``huggingface_hub``'s shard planner): a tensor larger
    than the limit gets a shard of its own. ``sizes`` maps names to byte sizes. Raises
    ``ValueError`` for a size it cannot read, such as ``"5XB"``.
    """
    split = split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda size: size,
        get_storage_id=lambda size: None,  # sizes share no storage
        filename_pattern="part{suffix}",
        max_shard_size=max_shard_size,
    )
    return [list(names) for names in split.filename_to_tensors.values()]


def entry_size(entry: dict[str, Any]) -> int:
    """Bytes of a tensor's data from its safetensors header entry."""
    begin, end = entry["data_offsets"]
    return int(end) - int(begin)


class CheckpointReader:
    """Tensor-by-tensor reads from a folder's ``*.safetensors`` (sharded or not).

    Each read opens and closes its shard, so no mapping of a whole shard stays resident.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / WEIGHTS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{str(index)!r} is not a shard index ({err!r}); re-download it.") from None
            self.files = {name: self.folder / file for name, file in weight_map.items()}
            for shard in sorted(set(self.files.values())):
                if not shard.is_file():
                    raise FileNotFoundError(f"{str(shard)!r}, listed in {str(index)!r}, is missing; re-download it.")
                read_header(shard)
        else:
            single = self.folder / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(
                    f"no model.safetensors or {WEIGHTS_INDEX} in {str(folder)!r}; streaming needs safetensors "
                    "(convert .bin checkpoints with save_pretrained first)."
                )
            read_header(single)  # a damaged file is named here, before any work
            with safe_open(str(single), framework="pt") as handle:
                self.files = {name: single for name in handle.keys()}

    def entry(self, name: str) -> dict[str, Any]:
        """The safetensors header entry of ``name``: ``dtype``, ``shape``, ``data_offsets``."""
        return dict(read_header(self.files[name])[1][name])

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as stored (dtype and layout); a damaged file raises ``ValueError`` naming it."""
        try:
            with safe_open(str(self.files[name]), framework="pt") as handle:
                return handle.get_tensor(name)
        except SafetensorError as err:
            raise ValueError(
                f"cannot read {name!r} from {str(self.files[name])!r}: {err}; re-download the file."
            ) from None
