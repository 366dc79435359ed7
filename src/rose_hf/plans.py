"""Sparsity plans that measure the dense model first (``allocation="owl"`` / ``"error"``).

Both plans read one forward of the dense model over the calibration batches, which the pipeline
runs block by block (``rose_hf.pipeline``), with pre-hooks on every target module summing the
squares of each input column over the real tokens (``ColumnSums``: ``‖X_j‖``), and score each
block's modules by Wanda's ``|W| · ‖X_j‖`` (``rose_hf.allocation``). ``OutlierPlan`` is
OWL's allocation (a block's outlier ratio); ``ErrorPlan`` the error rule (the share of a block's
score mass that pruning at the target would remove). The statistic gives the block sparsities.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rose_hf.allocation import allocate_sparsities, outlier_ratio, pruned_share
from rose_hf.config import RoseConfig
from rose_hf.modeling import weight_matrix


class BlockPlan:
    """Sparsities from one statistic per decoder block of the *dense* model, by ``allocate_sparsities``.

    The pipeline runs the dense pass block by block (``rose_hf.pipeline``, the same pass in memory,
    under accelerate's disk offload and when streaming a checkpoint): while each block's weights are
    loaded, ``block_value`` scores its modules from their weights and input column norms; after the
    last block, ``allocate`` turns the values into sparsities. ``statistics`` keeps each block's
    value for the report and the docs.
    """

    def __init__(self, lam: float | None = None) -> None:
        self.lam = lam
        self.statistics: dict[str, float] = {}  # block prefix -> its statistic

    def statistic(self, scores: list[torch.Tensor], config: RoseConfig) -> float:
        """The block's value from the Wanda scores ``|W| · ‖X_j‖`` of its modules."""
        raise NotImplementedError

    def block_value(
        self, modules: Mapping[str, nn.Module], norms: Mapping[str, torch.Tensor], config: RoseConfig
    ) -> tuple[float, int]:
        """``(statistic, number of weights)`` of one block's target modules, their weights loaded."""
        scores = [weight_matrix(module).detach().abs().float().cpu() * norms[name] for name, module in modules.items()]
        return self.statistic(scores, config), sum(s.numel() for s in scores)

    def allocate(self, blocks: Mapping[str, tuple[list[str], float, int]], config: RoseConfig) -> dict[str, float]:
        """Name -> sparsity for every module, from ``block prefix -> (module names, value, size)``;
        the parameter-weighted mean is exactly ``config.sparsity``."""
        lam = config.owl_lambda if self.lam is None else self.lam
        self.statistics = {prefix: value for prefix, (_, value, _) in blocks.items()}
        values = torch.tensor([value for _, value, _ in blocks.values()])
        sizes = torch.tensor([size for _, _, size in blocks.values()])
        sparsity = allocate_sparsities(values, sizes, float(config.sparsity or 0.0), lam)
        return {n: float(s) for (names, _, _), s in zip(blocks.values(), sparsity.tolist()) for n in names}


class OutlierPlan(BlockPlan):
    """OWL: blocks with more outlier weights are pruned less; the mean over all target weights is
    the configured sparsity. ``lam`` and ``M`` default to the config's ``owl_lambda`` / ``owl_m``."""

    def __init__(self, lam: float | None = None, M: float | None = None) -> None:
        super().__init__(lam)
        self.M = M

    @property
    def ratios(self) -> dict[str, float]:
        """Block prefix -> outlier ratio."""
        return self.statistics

    def statistic(self, scores: list[torch.Tensor], config: RoseConfig) -> float:
        return outlier_ratio(scores, config.owl_m if self.M is None else self.M)


class ErrorPlan(BlockPlan):
    """The error rule: blocks whose modules would lose more of their Wanda score mass at the target
    sparsity are pruned less, within ``target ± lam`` (``owl_lambda``); the mean over all target
    weights is the configured sparsity."""

    def statistic(self, scores: list[torch.Tensor], config: RoseConfig) -> float:
        return pruned_share(scores, float(config.sparsity or 0.0))


PLANS: dict[str, type[BlockPlan]] = {"owl": OutlierPlan, "error": ErrorPlan}


class ColumnSums:
    """``‖X_j‖`` of every module's input columns over the real tokens, from forward pre-hooks.

    Use as a context manager around the forwards; set ``mask`` to each batch's attention mask
    (``None``: every token is real) before its forward; ``norms()`` after the last.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.mask: torch.Tensor | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ColumnSums:
        self._handles = [m.register_forward_pre_hook(self._hook_for(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook_for(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            X = x.reshape(-1, x.shape[-1]).float()
            if self.mask is not None and self.mask.numel() == X.shape[0]:
                X = X[self.mask.reshape(-1).to(device=X.device, dtype=torch.bool)]
            square = (X * X).sum(0).cpu()
            self._sums[name] = square if name not in self._sums else self._sums[name] + square

        return hook

    def norms(self) -> dict[str, torch.Tensor]:
        """Name -> ``(cols,)`` column norms; every module must have run."""
        missing = sorted(set(self.modules) - set(self._sums))
        if missing:
            raise RuntimeError(
                f"the dense forward never reached {missing[:3]}; a sparsity plan needs every target module's input."
            )
        return {name: value.sqrt() for name, value in self._sums.items()}
