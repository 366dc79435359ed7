"""What happens to one decoder block on its turn: the pipeline's pluggable steps.

``TwoPass`` (the default): calibrate every module on the dense block's inputs, prune them, then
propagate the calibration inputs through the pruned block. ``NoCalibration`` (magnitude pruning):
prune every module from its weights alone. ``rose_hf.lockstep.Lockstep`` (``true_sequential``) is
the third. Each gets the run-wide state (``Run``) and the block's turn (``BlockTurn``) and prunes
through ``Run.prune``, so what is done to a module is the same whatever the step.

Each step also runs the turn's ``BasisChange`` transforms (head rotations, channel permutations)
through ``change_bases`` while the block is still dense: ``TwoPass`` after its calibration, handing
them the Hessians it measured (no forward of their own) and pruning in the basis they leave.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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


class BlockHessians:
    """The input Hessians (and ``objective="dense"`` cross terms) of a dense block's modules, kept in
    step with the changes of basis that ``BasisChange`` transforms make.

    A module whose input becomes ``x Q`` (``Q`` orthogonal: a rotation, a permutation) has Hessian
    ``Qᵀ H Q`` and cross term ``Qᵀ C Q``; ``rebase`` applies such a map to both, so the step prunes
    in the new basis without measuring again. Entries are replaced, never changed in place.

    Args:
        modules: name -> module of the step's calibration (``hessians``/``crosses`` use the names).
        hessians, crosses: the step's own, updated here; modules outside them are measured into
            ``extra`` by ``change_bases``.
    """

    def __init__(
        self, modules: dict[str, nn.Module], hessians: dict[str, torch.Tensor], crosses: dict[str, torch.Tensor]
    ) -> None:
        self._names = {module: name for name, module in modules.items() if name in hessians}
        self.hessians, self.crosses = hessians, crosses
        self.extra: dict[nn.Module, torch.Tensor] = {}

    def has(self, module: nn.Module) -> bool:
        """Whether ``module``'s Hessian is known."""
        return module in self._names or module in self.extra

    def of(self, module: nn.Module) -> torch.Tensor:
        """``module``'s input Hessian in its current basis (do not change it in place)."""
        return self.hessians[self._names[module]] if module in self._names else self.extra[module]

    def rebase(self, module: nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``module``'s input became ``x Q``: ``change`` maps a matrix ``M`` to ``Qᵀ M Q``."""
        if module in self._names:
            name = self._names[module]
            self.hessians[name] = change(self.hessians[name])
            if name in self.crosses:
                self.crosses[name] = change(self.crosses[name])
        elif module in self.extra:
            self.extra[module] = change(self.extra[module])


@runtime_checkable
class BasisChange(Protocol):
    """A transform that changes a block only by exact changes of basis (a rotation or permutation of
    some modules' outputs, undone on the inputs of the modules that read them).

    It runs on the dense block after the step's calibration, reads Hessians from ``BlockHessians``
    and rebases every module whose input basis it changes (a forgotten ``rebase`` would prune that
    module in the old basis). ``targets`` are the block's modules the step prunes: a change only
    serves their pruning, so it leaves alone the parts of the block where it would help none of them
    (modules in ``ignore`` keep their weights). ``before_capture`` as for any transform.
    """

    def before_capture(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Check (or change) the model before the block inputs are captured."""

    def reads(self, block: nn.Module, targets: Collection[nn.Module]) -> Sequence[nn.Module]:
        """The modules of ``block`` whose input Hessians ``on_calibrated`` reads."""

    def on_calibrated(
        self, index: int, block: nn.Module, targets: Collection[nn.Module], hessians: BlockHessians
    ) -> None:
        """Change block ``index`` and rebase what changed in ``hessians``."""


@dataclass(frozen=True)
class BlockTurn:
    """One block's turn: its index, the module itself, its target modules, whether it is the last,
    and the basis changes to run on it while it is dense (``change_bases``)."""

    index: int
    block: nn.Module
    modules: dict[str, nn.Module]
    last: bool
    changes: tuple[BasisChange, ...] = ()


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
    assert run.hidden is not None  # prune_model refuses basis changes without calibration
    with HessianCollector(modules, stop_early=True) as collector:
        for k, (call, mask) in enumerate(zip(run.calls[index], run.masks)):
            collector.begin_forward(mask)
            collector.run(functools.partial(run_block, block, run.hidden[k], call, run.device))
    collector.all_reduce(run.world)
    return collector.hessians()


def change_bases(
    run: Run,
    turn: BlockTurn,
    hessians: dict[str, torch.Tensor] | None = None,
    crosses: dict[str, torch.Tensor] | None = None,
) -> None:
    """Run ``turn.changes`` on the dense block, in order.

    ``hessians``/``crosses``: the step's own calibration of the block, by module name, rebased in
    place of their entries. Modules the changes read that the step did not calibrate (every module,
    when it passes none) are measured together in one forward first. A block with nothing to prune
    is left as it is: a change of basis only serves its pruning.
    """
    if not turn.changes or not turn.modules:
        return
    view = BlockHessians(turn.modules, {} if hessians is None else hessians, {} if crosses is None else crosses)
    targets = set(turn.modules.values())
    reads = {m: None for change in turn.changes for m in change.reads(turn.block, targets)}
    missing = [m for m in reads if not view.has(m)]
    if missing:
        with run.stopwatch.phase("rotate"):
            measured = measure_hessians(run, turn.index, turn.block, {str(k): m for k, m in enumerate(missing)})
            view.extra.update({m: measured[str(k)] for k, m in enumerate(missing) if str(k) in measured})
    for change in turn.changes:
        change.on_calibrated(turn.index, turn.block, targets, view)


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
        change_bases(run, turn, hessians, crosses)  # the block is still dense
        with run.stopwatch.phase("prune"):
            for name, module in turn.modules.items():
                # Popped: a Hessian is freed as soon as the last module sharing it is pruned.
                H, C = hessians.pop(name, None), crosses.pop(name, None)
                run.prune(name, module, H, C)
                del H, C
            del hessians, crosses
        if not turn.last:
            propagate(run, turn)
