"""Sparsity plans that measure the dense model first (the ``SparsityPlan`` plug-in of the pipeline).

Both plans run one forward of the dense model over the calibration batches, with a pre-hook on
every target module summing the squares of each input column over the real tokens (``‖X_j‖``), and
score each block's modules by Wanda's ``|W| · ‖X_j‖`` (``rose_hf.allocation``). ``OutlierPlan`` is
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
from rose_hf.data import Batch
from rose_hf.modeling import weight_matrix


class _BlockPlan:
    """One dense forward, Wanda scores per block, a statistic per block, sparsities by
    ``allocate_sparsities``; ``statistics`` keeps each block's value for the report and the docs."""

    def __init__(self, lam: float | None = None) -> None:
        self.lam = lam
        self.statistics: dict[str, float] = {}  # block prefix -> its statistic

    def statistic(self, scores: list[torch.Tensor], config: RoseConfig) -> float:
        raise NotImplementedError

    def __call__(
        self, model: nn.Module, modules: Mapping[str, nn.Module], config: RoseConfig, batches: list[Batch]
    ) -> dict[str, float]:
        """Name -> sparsity for every target module (all modules of one block share one)."""
        lam = config.owl_lambda if self.lam is None else self.lam
        offloaded = [name for name, module in modules.items() if weight_matrix(module).is_meta]
        if offloaded:
            raise ValueError(
                f"allocation={config.allocation!r} reads every target weight before pruning, but {offloaded[0]!r} is "
                "not in memory (streaming or disk offload); load the model in memory, or use allocation='uniform'."
            )
        norms = column_norms(model, modules, batches)
        blocks = _by_block(modules)
        values, sizes = [], []
        for names in blocks.values():
            scores = [weight_matrix(modules[n]).detach().abs().float().cpu() * norms[n] for n in names]
            values.append(self.statistic(scores, config))
            sizes.append(sum(s.numel() for s in scores))
        self.statistics = dict(zip(blocks, values))
        sparsity = allocate_sparsities(torch.tensor(values), torch.tensor(sizes), float(config.sparsity or 0.0), lam)
        return {n: float(s) for names, s in zip(blocks.values(), sparsity.tolist()) for n in names}


class OutlierPlan(_BlockPlan):
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


class ErrorPlan(_BlockPlan):
    """The error rule: blocks whose modules would lose more of their Wanda score mass at the target
    sparsity are pruned less, within ``target ± lam`` (``owl_lambda``); the mean over all target
    weights is the configured sparsity."""

    def statistic(self, scores: list[torch.Tensor], config: RoseConfig) -> float:
        return pruned_share(scores, float(config.sparsity or 0.0))


PLANS: dict[str, type[_BlockPlan]] = {"owl": OutlierPlan, "error": ErrorPlan}


def _by_block(modules: Mapping[str, nn.Module]) -> dict[str, list[str]]:
    """Module names grouped by their decoder block (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``)."""
    groups: dict[str, list[str]] = {}
    for name in modules:
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
        groups.setdefault(".".join(parts[: index + 1]), []).append(name)
    return groups


def column_norms(model: nn.Module, modules: Mapping[str, nn.Module], batches: list[Batch]) -> dict[str, torch.Tensor]:
    """``‖X_j‖`` of every module's input columns over the real tokens of ``batches``, from one
    forward of the model (its decoder only, where it has one: the head's logits are not needed)."""
    sums: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor | None] = [None]

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            X = x.reshape(-1, x.shape[-1]).float()
            mask = mask_now[0]
            if mask is not None and mask.numel() == X.shape[0]:
                X = X[mask.reshape(-1).to(X.device)]
            square = (X * X).sum(0).cpu()
            sums[name] = square if name not in sums else sums[name] + square

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
    decoder = getattr(model, "get_decoder", None)
    runner = decoder() if callable(decoder) else model
    try:
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
        for batch in batches:
            mask = batch.get("attention_mask")
            mask_now[0] = None if mask is None else mask.to(torch.bool)
            runner(
                input_ids=batch["input_ids"].to(device),
                attention_mask=None if mask is None else mask.to(device),
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(modules) - set(sums))
    if missing:
        raise RuntimeError(
            f"the dense forward never reached {missing[:3]}; a sparsity plan needs every target module's input."
        )
    return {name: value.sqrt() for name, value in sums.items()}
