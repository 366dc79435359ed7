"""What a pruning run did, per module and overall; plain dataclasses that serialise to JSON."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

PHASES = ("plan", "capture", "rotate", "calibrate", "prune", "propagate")


@dataclass
class ModuleReport:
    """Outcome for one pruned module.

    Attributes:
        name: Full module name, e.g. ``model.layers.3.mlp.down_proj``.
        method: The method that pruned it (``"magnitude"`` when it saw no calibration token).
        shape: ``(out_features, in_features)``.
        sparsity: Achieved fraction of exact zeros in the weight.
        error: Layer output error ``||(W - W_hat) X^T||^2 / N`` on the calibration tokens.
        relative_error: ``error`` divided by ``||W X^T||^2 / N``.
        reordered: Whether ROSE's gate reordered the columns.
        relative_range: ROSE's block-loss relative range (0 for other methods).
        damp_scale: Multiplier the dampening needed for a stable inverse (1.0 normally).
        seconds: Wall time spent pruning this module (excluding calibration).
    """

    name: str
    method: str
    shape: tuple[int, int]
    sparsity: float
    error: float
    relative_error: float
    reordered: bool = False
    relative_range: float = 0.0
    damp_scale: float = 1.0
    seconds: float = 0.0


def overall_sparsity(entries: Iterable[tuple[tuple[int, int] | list[int], float]]) -> float:
    """Zeros over weights of ``(shape, sparsity)`` pairs, weighted by size (0 for none)."""
    total = zeros = 0.0
    for shape, sparsity in entries:
        size = shape[0] * shape[1]
        total += size
        zeros += sparsity * size
    return zeros / total if total else 0.0


@dataclass
class PruneReport:
    """The whole run: per-module reports plus timings.

    Attributes:
        modules: One ``ModuleReport`` per pruned module, in pruning order.
        config: ``RoseConfig.to_dict()`` of the run.
        num_batches: Calibration batches used.
        num_tokens: Calibration tokens (padding excluded).
        seconds: Wall time of ``prune()``.
        plan_seconds / capture_seconds / rotate_seconds / calibrate_seconds / prune_seconds /
            propagate_seconds: where it went (``plan``: a sparsity plan's own measurements, such as
            OWL's dense forward; ``rotate``: a rotation's or the channel permutation's forwards and learning).
        rotation_losses: ``rotation="heads"``: per attention module (``"<block>.<path>"``) the
            rotation loss (entropy of SparseGPT's importance) before and after learning;
            ``"residual"``: the residual rotation's loss over every block.
        permutation_costs: ``channel_permutation=True``: per permuted module (``"<block>.<path>"``)
            the importance its N:M groups drop, in the original order and in the chosen one.
        untied_parameters: parameters ``lm_head`` gained when ``rotation="residual"`` untied it
            from the input embeddings (0: nothing untied).
    """

    modules: list[ModuleReport] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    num_batches: int = 0
    num_tokens: int = 0
    seconds: float = 0.0
    plan_seconds: float = 0.0
    capture_seconds: float = 0.0
    rotate_seconds: float = 0.0
    calibrate_seconds: float = 0.0
    prune_seconds: float = 0.0
    propagate_seconds: float = 0.0
    rotation_losses: dict[str, list[float]] = field(default_factory=dict)
    permutation_costs: dict[str, list[float]] = field(default_factory=dict)
    untied_parameters: int = 0

    @property
    def overall_sparsity(self) -> float:
        """Zeros over weights across all pruned modules (weighted by size)."""
        return overall_sparsity((r.shape, r.sparsity) for r in self.modules)

    @property
    def reordered_count(self) -> int:
        """How many modules ROSE reordered."""
        return sum(r.reordered for r in self.modules)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived totals included."""
        data = asdict(self)
        data["overall_sparsity"] = self.overall_sparsity
        data["reordered_count"] = self.reordered_count
        return data

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"pruned {len(self.modules)} modules to {self.overall_sparsity:.2%} sparsity "
            f"({self.reordered_count} reordered) on {self.num_tokens} tokens in {self.seconds:.1f}s"
        )


class Stopwatch:
    """Adds wall time to a ``PruneReport``'s phase fields, so timing stays out of the algorithm.

    Phases nest and count exclusively: time spent in an inner phase (``prune`` inside a lockstep
    ``calibrate``) goes to the inner one only::

        with stopwatch.phase("calibrate"):
            ...                                   # counted as calibrate
            with stopwatch.phase("prune"):
                ...                               # counted as prune, not calibrate
    """

    def __init__(self, report: PruneReport) -> None:
        self.report = report
        self._inner: list[float] = []  # per open phase: seconds its inner phases took

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as phase ``name`` (one of ``PHASES``)."""
        if name not in PHASES:
            raise ValueError(f"phase {name!r} is not one of {list(PHASES)}.")
        started = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            inner = self._inner.pop()
            attribute = f"{name}_seconds"
            setattr(self.report, attribute, getattr(self.report, attribute) + elapsed - inner)
            if self._inner:
                self._inner[-1] += elapsed

    @contextlib.contextmanager
    def total(self) -> Iterator[None]:
        """Time the whole run into ``report.seconds``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.report.seconds = time.perf_counter() - started
