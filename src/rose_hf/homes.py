"""Where a decoder block lives between turns, and where it goes back to: a pipeline *home*.

``Home`` is the interface, with do-nothing defaults; ``LoadedHome`` serves a model loaded with
``from_pretrained`` (blocks in memory, or dispatched and offloaded by accelerate);
``rose_hf.streaming.CheckpointHome`` serves a checkpoint on disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rose_hf.data import Batch
from rose_hf.modeling import module_device
from rose_hf.offload import Onloaded, align_hook, execution_device, offload, onload
from rose_hf.report import PruneReport


class Home:
    """Hooks the pipeline calls around the block loop; every one does nothing by default."""

    def before_capture(self, batches: list[Batch]) -> None:
        """Before the block inputs are captured (streaming reads the embedding rows here)."""

    def after_capture(self) -> None:
        """The block inputs are captured (streaming frees the embeddings here)."""

    def enter(self, index: int, block: nn.Module) -> None:
        """Make block ``index`` ready on the compute device."""

    def leave(self, index: int, block: nn.Module) -> None:
        """Done with block ``index``: send it back where it lives."""

    @contextlib.contextmanager
    def visit(self, index: int, block: nn.Module) -> Iterator[None]:
        """Block ``index``'s *dense* weights on the compute device for a look (a sparsity plan's
        dense pass), then put back unchanged. By default the block's turn without pruning."""
        self.enter(index, block)
        try:
            yield
        finally:
            self.leave(index, block)

    @contextlib.contextmanager
    def edit(self, model: nn.Module, module: nn.Module) -> Iterator[None]:
        """``module`` of ``model``, outside the blocks (embeddings, final norm, head), with its
        weights loaded for a change that lasts: what the body writes to them, or assigns as new
        parameters, is what the model (in memory, in accelerate's store) or the output (streaming)
        holds from then on. By default the weights are in memory already."""
        yield

    def tidy(self) -> None:
        """After a block's calibration and after each module (streaming trims the heap here)."""

    def holds_weights(self, module: nn.Module) -> bool:
        """Whether ``module``'s weights are loaded now, so pre-flight can check their values."""
        return True

    def done(self, index: int) -> bool:
        """Whether block ``index`` was pruned by an earlier, interrupted run (streaming resumes)."""
        return False

    def restore(self, report: PruneReport) -> None:
        """Put the report rows of the blocks ``done`` already into ``report``, before the loop."""

    def block_done(self, index: int, report: PruneReport) -> None:
        """Block ``index`` is pruned and has left (streaming records its progress here)."""


class LoadedHome(Home):
    """Blocks of a loaded model: moved to the compute device for their turn and back after it.

    A block dispatched by accelerate stays on its execution device; its offloaded weights are
    loaded there for the block's turn and written back to accelerate's store after it
    (``rose_hf.offload``), where the model's later forwards and ``save_pretrained`` read them.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._home = torch.device("cpu")
        self._onloaded: Onloaded | None = None

    def holds_weights(self, module: nn.Module) -> bool:
        """Not for a module whose weights accelerate keeps offloaded until its forward."""
        hook = align_hook(module)
        return hook is None or not hook.offload

    def enter(self, index: int, block: nn.Module) -> None:
        """Onload a dispatched block where accelerate runs it; move any other to the compute device."""
        dispatched = execution_device(block)
        if dispatched is not None:
            self._onloaded = onload(block, dispatched)
            return
        self._home = module_device(block)
        block.to(self.device)

    @contextlib.contextmanager
    def edit(self, model: nn.Module, module: nn.Module) -> Iterator[None]:
        """An offloaded module is loaded onto its execution device for the body and written back to
        its store after it; any other is changed in place."""
        device = execution_device(module)
        hook = align_hook(module)
        if device is None or hook is None or not hook.offload:
            yield
            return
        loaded = onload(module, device)
        try:
            yield
        finally:
            offload(loaded)

    def leave(self, index: int, block: nn.Module) -> None:
        """Write a dispatched block back to its store; move any other back to its device."""
        if self._onloaded is not None:
            offload(self._onloaded)
            self._onloaded = None
            return
        block.to(self._home)
