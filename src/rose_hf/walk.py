"""One forward of the *dense* model, block by block through its home (plumbing).

A sparsity plan (``allocation``) and the residual rotation read the dense model before anything is
pruned. ``dense_walk`` captures the blocks' inputs once, then visits each block in turn
(``Home.visit``: from the source shards when streaming, onloaded under accelerate offload, in place
in memory), so the weights need not all be in memory at once; between blocks the hidden states wait
in ``Activations`` (memory or a scratch folder, as the run's).

    for index, block, forward in dense_walk(model, blocks, batches, home, device, "memory", None):
        with collector:
            forward(lambda batch: collector.begin_forward(batch.get("attention_mask")))
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path

import torch
from torch import nn

from rose_hf.activations import Activations
from rose_hf.data import Batch
from rose_hf.homes import Home
from rose_hf.modeling import capture_calls, run_block

Forward = Callable[[Callable[[Batch], object] | None], None]
Walk = Generator[tuple[int, nn.Module, Forward], None, None]


def dense_walk(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[Batch],
    home: Home,
    device: torch.device,
    activations: str,
    scratch_dir: str | Path | None,
) -> Walk:
    """Yield ``(index, block, forward)`` for every block, its dense weights loaded by its home.

    ``forward(before)`` runs the block on every batch's hidden states and keeps its outputs as the
    next block's inputs, calling ``before(batch)`` ahead of each batch (to set a collector's mask).
    Call it once per block, inside the loop body: the block is put back when the body ends.
    """
    with Activations(activations, device, scratch_dir) as hidden:
        home.before_capture(batches)
        _, calls = capture_calls(model, blocks, batches, sink=hidden.append)
        home.after_capture()
        for index, block in enumerate(blocks):
            with home.visit(index, block):

                def forward(before: Callable[[Batch], object] | None = None, index: int = index) -> None:
                    for k, (call, batch) in enumerate(zip(calls[index], batches)):
                        if before is not None:
                            before(batch)
                        hidden[k] = run_block(blocks[index], hidden[k], call, device)

                yield index, block, forward
