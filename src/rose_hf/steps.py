"""What happens to one decoder block on its turn: the pipeline's pluggable steps.

``TwoPass`` (the default): calibrate every module on the dense block's inputs, prune them, then
propagate the calibration inputs through the pruned block. ``NoCalibration`` (magnitude pruning):
prune every module from its weights alone. ``rose_hf.lockstep.Lockstep`` (``true_sequential``) is
the third. Each gets the run-wide state (``Run``) and the block's turn (``BlockTurn``) and prunes
through ``Run.prune``, so what is done to a module is the same whatever the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from rose_hf.activations import Activations
from rose_hf.collector import HessianCollector
from rose_hf.distributed import World
from rose_hf.modeling import BlockCall, run_block
from rose_hf.pruning import ModulePruner
from rose_hf.report import Stopwatch


@dataclass
class Run:
    """What every block's step shares: where to compute, how to prune a module, the activations.

    ``hidden[k]`` is batch ``k``'s input to the current block; ``dense_hidden`` the dense model's
    (``objective="dense"`` only); ``calls[b][k]`` block ``b``'s captured call for batch ``k``.
    """

    device: torch.device
    world: World
    prune: ModulePruner
    stopwatch: Stopwatch
    tidy: Callable[[], None]
    hidden: Activations | None = None
    dense_hidden: Activations | None = None
    calls: list[list[BlockCall]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)


@dataclass(frozen=True)
class BlockTurn:
    """One block's turn: its index, the module itself, its target modules, whether it is the last."""

    index: int
    block: nn.Module
    modules: dict[str, nn.Module]
    last: bool


class Step(Protocol):
    """What the pipeline does with a block between ``home.enter`` and ``home.leave``."""

    needs_calibration: bool

    def run(self, run: Run, turn: BlockTurn) -> None:
        """Prune every module of ``turn`` through ``run.prune`` (and propagate ``run.hidden``)."""


def propagate(run: Run, turn: BlockTurn) -> None:
    """Replace each batch's hidden states by the (pruned) block's output, in place: one set alive."""
    assert run.hidden is not None
    with run.stopwatch.phase("propagate"):
        for k, call in enumerate(run.calls[turn.index]):
            run.hidden[k] = run_block(turn.block, run.hidden[k], call, run.device)


def measure_hessians(run: Run, index: int, block: nn.Module, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The Hessians of ``modules``' inputs on block ``index``'s current inputs: one forward per batch,
    stopped after the last of them, all-reduced over the world (a transform's own measurement)."""
    assert run.hidden is not None  # a calibrating step captured the block inputs
    with HessianCollector(modules, stop_early=True) as collector:
        for k, (call, mask) in enumerate(zip(run.calls[index], run.masks)):
            collector.begin_forward(mask)
            collector.run(functools.partial(run_block, block, run.hidden[k], call, run.device))
    collector.all_reduce(run.world)
    return collector.hessians()


class NoCalibration:
    """Prune every module from its weights alone (``method="magnitude"``); no forward runs."""

    needs_calibration = False

    def run(self, run: Run, turn: BlockTurn) -> None:
        """Prune each module with no Hessian."""
        for name, module in turn.modules.items():
            run.prune(name, module, None)


class TwoPass:
    """Calibrate every module on the dense block's inputs (each forward stops after the last
    module's input), prune them, then propagate the inputs through the pruned block."""

    needs_calibration = True

    def run(self, run: Run, turn: BlockTurn) -> None:
        """Calibrate, prune, propagate (not after the last block: nothing reads its outputs)."""
        assert run.hidden is not None
        block, calls, device = turn.block, run.calls[turn.index], run.device
        with run.stopwatch.phase("calibrate"):
            with HessianCollector(turn.modules, stop_early=True) as collector:
                for k, (call, mask) in enumerate(zip(calls, run.masks)):
                    collector.begin_forward(mask)
                    if run.dense_hidden is not None:
                        with collector.reference_pass():  # the block is still dense here
                            run.dense_hidden[k] = run_block(block, run.dense_hidden[k], call, device)
                    collector.run(functools.partial(run_block, block, run.hidden[k], call, device))
            collector.all_reduce(run.world)
            hessians, crosses = collector.hessians(), collector.crosses()
            del collector  # its raw sums: the Hessians above are new tensors
            run.tidy()
        with run.stopwatch.phase("prune"):
            for name, module in turn.modules.items():
                # Popped: a Hessian is freed as soon as the last module sharing it is pruned.
                H, C = hessians.pop(name, None), crosses.pop(name, None)
                run.prune(name, module, H, C)
                del H, C
            del hessians, crosses
        if not turn.last:
            propagate(run, turn)
