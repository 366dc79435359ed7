"""The process around a pruning run: compute device, fp32 numerics, the C heap, caller warnings.

Nothing here runs on import; the glibc settings apply only when called.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from rose_hf.distributed import World, local_cuda_device

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def resolve_device(device: str | None, world: World | None = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means CUDA when available (the rank's own GPU
    under ``torchrun``), else CPU."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return local_cuda_device(world) if world is not None and world.size > 1 else torch.device("cuda")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:0'.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use device='cpu'.")
    return resolved


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Disable TF32 for the duration (pruning needs full fp32), restoring the caller's flags."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside rose_hf (and contextlib): the user's line.

    Counting frames by hand (``stacklevel=5``) breaks whenever the call path changes; this walks
    the stack instead.
    """
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is warn_caller's caller
    # contextlib's frames sit between rose_hf's own where a @contextmanager is entered.
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("rose_hf", "contextlib"):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    warnings.warn(message, category, stacklevel=level)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold after large frees, so the activations and Hessians of one block
    end up on the heap and, once freed, stay in the process's resident set. Between blocks nothing
    of them is alive; trimming then keeps the resident set at what is really in use instead of the
    high-water mark of all blocks so far (docs/performance.md has the measurement).
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def fix_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for the rest of the process; ``False`` off glibc.

    By default glibc raises the threshold to the size of the largest block freed so far (up to
    32 MiB), so a pruner's large temporaries (Hessian-sized matrices, activations) come from the
    heap, where freed space fragments and stays resident. With a fixed threshold every allocation
    above it is its own mapping and goes back to the OS when freed: the resident set follows what is
    live, at the price of fresh zeroed pages on every large allocation (docs/performance.md measures
    both). This is a process-wide setting; streaming mode applies it only when asked to
    (``prune_checkpoint(mmap_threshold=...)``, on by default in ``rose-hf prune --stream``).
    """
    if nbytes <= 0:
        raise ValueError(f"mmap_threshold={nbytes} must be a positive number of bytes, e.g. 1048576 (1 MiB).")
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes))


@functools.cache
def _libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
