"""Where the calibration hidden states wait between blocks: in memory, or in a scratch file.

The pruner keeps one hidden-state tensor per calibration batch (``nsamples * seqlen * hidden``
values: 4 GiB for 128 x 2048 tokens of a 70B Llama in bfloat16) and needs one of them at a time.
``activations="disk"`` writes each to its own file in a scratch folder and reads it back when its
turn comes, so only the batch being run is in memory; the bytes are the same, so the result is too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

PLACES = ("memory", "disk")


def check_place(place: str) -> str:
    """``place`` if it is one of ``PLACES``; a ``ValueError`` naming it otherwise."""
    if place not in PLACES:
        raise ValueError(
            f"activations={place!r} is not supported; use 'memory' (fastest) or 'disk' (only one calibration "
            "batch in memory at a time)."
        )
    return place


class Activations:
    """A list of tensors on ``device`` that lives in memory or in files under ``scratch_dir``.

    Use as a context manager (or call ``close``) so the scratch files are removed.
    """

    def __init__(self, place: str, device: torch.device, scratch_dir: str | Path | None = None) -> None:
        self.place, self.device = check_place(place), device
        self._memory: list[torch.Tensor] = []
        self._meta: list[tuple[torch.Size, torch.dtype]] = []
        self._folder = (
            tempfile.TemporaryDirectory(prefix="rose_hf-activations-", dir=scratch_dir) if place == "disk" else None
        )

    def __enter__(self) -> Activations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop every tensor and remove the scratch files."""
        self._memory.clear()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __len__(self) -> int:
        return len(self._memory) if self.place == "memory" else len(self._meta)

    def append(self, value: torch.Tensor) -> None:
        """Add ``value`` as the next entry."""
        if self.place == "memory":
            self._memory.append(value.to(self.device))
        else:
            self._meta.append((value.shape, value.dtype))
            self[len(self._meta) - 1] = value

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.place == "memory":
            return self._memory[index]
        shape, dtype = self._meta[index]
        value = torch.empty(shape, dtype=dtype)
        with open(self._path(index), "rb") as handle:
            if handle.readinto(_bytes(value)) != value.numel() * value.element_size():  # type: ignore[arg-type]
                raise OSError(f"scratch file {self._path(index)} is shorter than the activations written to it.")
        return value.to(self.device)

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        if self.place == "memory":
            self._memory[index] = value.to(self.device)
            return
        value = value.detach().to("cpu").contiguous()
        self._meta[index] = (value.shape, value.dtype)
        with open(self._path(index), "wb") as handle:
            handle.write(_bytes(value))

    def _path(self, index: int) -> Path:
        if self._folder is None:
            raise RuntimeError("these activations were closed.")
        return Path(self._folder.name) / f"{index:06d}.bin"


def _bytes(value: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, as a writable view (no copy)."""
    return value.reshape(-1).view(torch.uint8).numpy().data
