"""The one block loop every pruning run goes through, whatever the model's home or the step.

    plan (a dense pass, block by block) -> capture block inputs
        -> for each block: home.enter -> transforms -> step.run (basis changes inside) -> home.leave

What varies plugs in as small objects: a ``Home`` (``rose_hf.homes``: where a block lives), a
``Step`` (``rose_hf.steps``: what is done to it) and ``Extensions``: model transforms before
pruning (``rotation="residual"`` is one, ``rose_hf.residual``; ``rotation="heads"`` and
``channel_permutation`` are ``BasisChange`` transforms, which the step runs once it has calibrated
the dense block), refiners after each module's method, and a per-module sparsity plan made before
the loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from huggingface_hub.utils import are_progress_bars_disabled
from torch import nn
from tqdm.auto import tqdm

from rose_hf.activations import Activations
from rose_hf.config import RoseConfig
from rose_hf.data import Batch, as_batches, count_tokens
from rose_hf.distributed import World
from rose_hf.homes import Home
from rose_hf.lockstep import Lockstep
from rose_hf.modeling import capture_calls, find_blocks, target_modules
from rose_hf.plans import PLANS, BlockPlan, ColumnSums
from rose_hf.preflight import PreflightError, PruningError, check_calibration, check_modules
from rose_hf.pruning import ModulePruner, Observer, Refiner, refiners_for
from rose_hf.report import PruneReport, Stopwatch
from rose_hf.rotating import resolve_rotation
from rose_hf.runtime import exact_float32, release_free_memory
from rose_hf.steps import BasisChange, BlockTurn, NoCalibration, Run, Step, TwoPass, change_bases, propagate
from rose_hf.walk import Walk, dense_walk

logger = logging.getLogger(__name__)


class Transform(Protocol):
    """A change to the model before its modules are pruned (a rotation, say).

    ``before_capture`` sees the whole model once, before the block inputs are captured (where
    embeddings and head change); ``on_block`` sees each block once it is on the compute device,
    before its step runs (so it also works when blocks are streamed from disk one at a time).
    A transform that only changes bases exactly can be a ``rose_hf.steps.BasisChange`` instead
    (``reads`` and ``on_calibrated`` for ``on_block``): it then runs after the step's calibration,
    on the Hessians the step measured; plain transforms run first.
    """

    def before_capture(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Change what lives outside the blocks (or all of a model that is in memory)."""

    def on_block(self, index: int, block: nn.Module) -> None:
        """Change block ``index`` before it is calibrated and pruned."""


class SparsityPlan(Protocol):
    """Per-module sparsity decided before the loop from the model and every target module."""

    def __call__(
        self, model: nn.Module, modules: Mapping[str, nn.Module], config: RoseConfig, batches: list[Batch]
    ) -> Mapping[str, float]:
        """Name -> sparsity; modules left out use ``config.sparsity``. ``batches`` is the calibration."""


@dataclass(frozen=True)
class Extensions:
    """Optional plug-ins of a run (none by default)."""

    transforms: Sequence[Transform | BasisChange] = ()
    refiners: Sequence[Refiner] = ()
    plan: SparsityPlan | BlockPlan | None = None
    observer: Observer | None = None


def transforms_for(
    config: RoseConfig, run: Run, home: Home, walk: Callable[[], Walk]
) -> tuple[Transform | BasisChange, ...]:
    """The transforms a config asks for (``rotation``, ``channel_permutation``), before any passed in ``Extensions``;
    ``walk``: a ``dense_walk`` of the model over this process's share of the calibration."""
    transforms: list[Transform | BasisChange] = []
    if config.rotation in ("residual", "residual+heads"):
        from rose_hf.residual import ResidualRotation

        transforms.append(ResidualRotation(config, run, home, walk))
    if config.rotation == "layer":
        from rose_hf.residual import LayerRotation

        transforms.append(LayerRotation(config, run))
    if config.rotation in ("heads", "residual+heads"):
        from rose_hf.rotating import HeadRotation

        transforms.append(HeadRotation(config, run))
    if config.channel_permutation:  # after the heads rotation: it balances the rotated basis
        from rose_hf.permuting import ChannelPermutation

        transforms.append(ChannelPermutation(config, run))
    return tuple(transforms)


def step_for(config: RoseConfig) -> Step:
    """The step a config asks for: no calibration for magnitude, lockstep for ``true_sequential``."""
    if config.method == "magnitude":
        return NoCalibration()
    return Lockstep() if config.true_sequential else TwoPass()


def prune_model(
    model: nn.Module,
    config: RoseConfig,
    calib: Any,
    home: Home,
    *,
    device: torch.device,
    world: World,
    activations: str = "memory",
    scratch_dir: str | Path | None = None,
    progress: bool = True,
    extensions: Extensions = Extensions(),
) -> tuple[PruneReport, list[Batch]]:
    """Prune every target module of every decoder block of ``model`` in place.

    Returns the report and the calibration batches (all ranks' batches under ``torch.distributed``,
    of which this rank ran its share).
    """
    if calib is None and config.method != "magnitude":
        raise ValueError(
            f"method={config.method!r} needs calibration data; pass token ids to prune(), "
            "e.g. rose_hf.data.sample_windows(tokenizer, text, nsamples=128, seqlen=2048)."
        )
    batches = as_batches(calib) if calib is not None else []
    config = resolve_rotation(config, model)  # callers that record the recipe resolve it first
    block_path, blocks = find_blocks(model, config.block_path)
    step = step_for(config)
    targets = {i: target_modules(b, f"{block_path}.{i}", config.targets, config.ignore) for i, b in enumerate(blocks)}
    problems = check_modules(targets, block_path, config, home.holds_weights)
    if step.needs_calibration:
        problems += check_calibration(batches, model)
    if problems:
        raise PreflightError(problems)
    report = PruneReport(config=config.to_dict(), num_batches=len(batches), num_tokens=count_tokens(batches))
    home.restore(report)
    stopwatch = Stopwatch(report)
    was_training = model.training
    model.eval()
    try:
        with stopwatch.total(), torch.no_grad(), exact_float32():
            loop = _BlockLoop(model, config, block_path, blocks, home, step, extensions.transforms)
            with stopwatch.phase("plan"):
                sparsities = loop.plan(targets, extensions.plan, batches, device, activations, scratch_dir)
            prune = ModulePruner(
                config,
                world,
                report,
                observer=extensions.observer,
                refiners=(*refiners_for(config), *extensions.refiners),
                sparsities=sparsities,
                tidy=home.tidy,
            )
            run = Run(device, world, prune, stopwatch, home.tidy)
            mine = world.share(batches) if step.needs_calibration else []  # magnitude reads no batch
            walk = partial(dense_walk, model, blocks, mine, home, device, activations, scratch_dir)
            loop.transforms = (*transforms_for(config, run, home, walk), *extensions.transforms)
            if not step.needs_calibration and any(isinstance(t, BasisChange) for t in loop.transforms):
                raise ValueError(
                    f"a BasisChange transform reads calibration Hessians, which method={config.method!r} does not "
                    "measure; use a calibrating method (rose, sparsegpt, wanda) or drop the transform."
                )
            loop.run(run, mine, activations, scratch_dir, progress)
    finally:
        model.train(was_training)
    logger.info(report.summary())
    return report, batches


@dataclass
class _BlockLoop:
    model: nn.Module
    config: RoseConfig
    block_path: str
    blocks: nn.ModuleList
    home: Home
    step: Step
    transforms: Sequence[Transform | BasisChange]

    def run(
        self, run: Run, batches: list[Batch], activations: str, scratch_dir: str | Path | None, progress: bool
    ) -> None:
        for transform in self.transforms:
            transform.before_capture(self.model, self.blocks)
        with contextlib.ExitStack() as stack:
            if self.step.needs_calibration:
                with run.stopwatch.phase("capture"):
                    self._capture(run, batches, stack, activations, scratch_dir)
            quiet = not progress or not run.world.lead or are_progress_bars_disabled()  # HF_HUB_DISABLE_PROGRESS_BARS
            bar = tqdm(total=len(self.blocks), desc=f"rose_hf {self.config.method}", disable=quiet)
            try:
                for index, block in enumerate(self.blocks):
                    self._turn(run, index, block)
                    bar.update(1)
            finally:
                bar.close()

    def plan(
        self,
        targets: dict[int, dict[str, nn.Module]],
        plan: SparsityPlan | BlockPlan | None,
        batches: list[Batch],
        device: torch.device,
        activations: str,
        scratch_dir: str | Path | None,
    ) -> dict[str, float]:
        """Per-module sparsities of the config's ``allocation`` or of ``plan``; ``{}``: uniform."""
        if plan is None and self.config.allocation != "uniform":
            plan = PLANS[self.config.allocation]()
        if plan is None:
            return {}
        modules = {name: module for block in targets.values() for name, module in block.items()}
        if isinstance(plan, BlockPlan):
            sparsities = plan.allocate(
                self._dense_pass(plan, targets, batches, device, activations, scratch_dir), self.config
            )
        else:
            sparsities = dict(plan(self.model, modules, self.config, batches))
        if sparsities and self.config.nm != (0, 0):
            raise ValueError(
                f"a per-module sparsity plan does not apply to pattern={self.config.pattern!r}: N:M sparsity is the "
                "same in every module; drop the plan or use pattern='unstructured'."
            )
        unknown = sorted(set(sparsities) - set(modules))
        if unknown:
            raise ValueError(f"the sparsity plan names {unknown[:3]}, which are not target modules of this model.")
        bad = {name: value for name, value in sparsities.items() if not 0.0 <= value < 1.0}
        if bad:
            raise ValueError(f"the sparsity plan gives {bad} outside [0, 1); fix the plan.")
        return sparsities

    def _dense_pass(
        self,
        plan: BlockPlan,
        targets: dict[int, dict[str, nn.Module]],
        batches: list[Batch],
        device: torch.device,
        activations: str,
        scratch_dir: str | Path | None,
    ) -> dict[str, tuple[list[str], float, int]]:
        """Each block's plan value from one forward of the dense model, block by block through the
        home, so the weights need not all be in memory at once (streaming, disk offload)."""
        values: dict[str, tuple[list[str], float, int]] = {}
        walk = dense_walk(self.model, self.blocks, batches, self.home, device, activations, scratch_dir)
        with contextlib.closing(walk) as blocks:  # on an error too: the block put back, the scratch freed
            for index, _, forward in blocks:
                modules = targets[index]
                with ColumnSums(modules) as sums:
                    forward(lambda batch: setattr(sums, "mask", batch.get("attention_mask")))
                    if modules:
                        value, size = plan.block_value(modules, sums.norms(), self.config)
                        values[f"{self.block_path}.{index}"] = (list(modules), value, size)
        return values

    def _capture(
        self,
        run: Run,
        batches: list[Batch],
        stack: contextlib.ExitStack,
        activations: str,
        scratch_dir: str | Path | None,
    ) -> None:
        self.home.before_capture(batches)
        run.hidden = stack.enter_context(Activations(activations, run.device, scratch_dir))
        _, run.calls = capture_calls(self.model, self.blocks, batches, sink=run.hidden.append)
        if self.config.objective == "dense":  # the dense model's activations travel alongside
            run.dense_hidden = stack.enter_context(Activations(activations, run.device, scratch_dir))
            for k in range(len(run.hidden)):
                run.dense_hidden.append(run.hidden[k].clone())
        run.masks = [batch.get("attention_mask") for batch in batches]
        self.home.after_capture()

    def _turn(self, run: Run, index: int, block: nn.Module) -> None:
        self.home.enter(index, block)
        if self.home.done(index):  # pruned by an interrupted run: only its outputs are needed
            if self.step.needs_calibration and index + 1 < len(self.blocks):
                propagate(run, BlockTurn(index, block, {}, last=False))
            self.home.leave(index, block)
            return
        try:
            changes = tuple(t for t in self.transforms if isinstance(t, BasisChange))
            for transform in self.transforms:
                if not isinstance(transform, BasisChange):
                    transform.on_block(index, block)
            modules = target_modules(block, f"{self.block_path}.{index}", self.config.targets, self.config.ignore)
            turn = BlockTurn(index, block, modules, last=index + 1 == len(self.blocks), changes=changes)
            if modules:
                self.step.run(run, turn)
            elif self.step.needs_calibration:  # nothing to prune: the changes, and the block's outputs
                change_bases(run, turn)
                if not turn.last:
                    propagate(run, turn)
        except Exception as err:
            raise _stopped(err, run, f"{self.block_path}.{index}", index) from err
        self.home.leave(index, block)
        self.home.block_done(index, run.prune.report)
        release_free_memory()


def _stopped(err: Exception, run: Run, block: str, index: int) -> PruningError:
    """The error that says where pruning stopped and what state the model is in."""
    where = f"while pruning {run.prune.current}" if run.prune.current else "while calibrating it"
    before = f"blocks 0-{index - 1} are pruned and this one may be in part" if index else "this block may be in part"
    return PruningError(
        f"pruning stopped in {block} {where}: {type(err).__name__}: {err} The model is partially pruned ({before}, "
        f"{len(run.prune.report.modules)} modules in all; error.report lists them): reload it before trying again.",
        run.prune.report,
    )
