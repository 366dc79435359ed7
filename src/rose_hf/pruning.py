"""Prune one module: the method dispatch (``prune_matrix``) and the one place every pipeline mode
goes through to prune, share, write back and report a module (``ModulePruner``).

A per-module refinement (a re-fit of the kept weights, ADMM, ...) is one more call in
``ModulePruner.__call__`` (``refiners``), and a per-layer sparsity plan one lookup (``sparsities``),
whatever the step or home of the block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rose_hf.admm import admm_prune
from rose_hf.baselines import magnitude_prune, wanda_prune
from rose_hf.config import RoseConfig
from rose_hf.distributed import World
from rose_hf.modeling import weight_matrix, write_weight
from rose_hf.ordering import rose_decision
from rose_hf.refit import refit_weights
from rose_hf.report import ModuleReport, PruneReport
from rose_hf.runtime import warn_caller
from rose_hf.sparsegpt import all_finite, dense_target_weights, reconstruction_error, sparsegpt_prune

# ``observer(name, W, H)``: sees each module's dense weight and Hessian before it is pruned.
Observer = Callable[[str, torch.Tensor, "torch.Tensor | None"], None]
# ``refiner(name, W, W_pruned, H) -> W_refined``: runs on the owner rank after the method.
Refiner = Callable[[str, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def prune_matrix(
    W: torch.Tensor,
    H: torch.Tensor | None,
    config: RoseConfig,
    C: torch.Tensor | None = None,
    sparsity: float | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Prune one ``(out, in)`` matrix with ``config.method``; return new weights and report fields.

    ``C`` is the cross term of ``objective="dense"`` (``HessianCollector.crosses``); with it the
    reconstructing methods start from ``dense_target_weights`` instead of ``W``. ``sparsity``
    overrides ``config.sparsity`` for this matrix (a per-layer plan).
    """
    n, m = config.nm
    sparsity = float(config.sparsity or 0.0) if sparsity is None else sparsity
    if config.method == "magnitude" or H is None:
        weight, _ = magnitude_prune(W, sparsity, n=n, m=m)
        return weight, {"method": "magnitude"}
    if config.method == "wanda":
        weight, _ = wanda_prune(W, H, sparsity, n=n, m=m)
        return weight, {"method": "wanda"}
    if C is not None:
        W = dense_target_weights(W, H, C, config.correction_damp or config.percdamp)
    info: dict[str, Any] = {"method": config.method}
    perm, blocks = None, None
    if config.method == "rose":
        decision = rose_decision(
            W,
            H,
            sparsity,
            config.blocksize,
            n=n,
            m=m,
            threshold=config.reorder_threshold,
            mode="always" if config.reorder == "best" else config.reorder,
            score=config.score,
            percdamp=config.percdamp,
        )
        info["relative_range"] = decision.relative_range
        if decision.order is not None:
            perm, blocks = decision.order.perm, decision.order.blocks
    result = sparsegpt_prune(
        W, H, sparsity, n=n, m=m, blocksize=config.blocksize, percdamp=config.percdamp, perm=perm, blocks=blocks
    )
    if config.method == "rose" and config.reorder == "best" and perm is not None:
        # The measured choice: SparseGPT's own order wins when it leaves the lower layer error.
        plain = sparsegpt_prune(W, H, sparsity, n=n, m=m, blocksize=config.blocksize, percdamp=config.percdamp)
        if reconstruction_error(W, plain.weight, H)[0] < reconstruction_error(W, result.weight, H)[0]:
            result, perm = plain, None
    if config.method == "rose":
        info["reordered"] = perm is not None
    info["damp_scale"] = result.damp_scale
    return result.weight, info


def refiners_for(config: RoseConfig) -> tuple[Refiner, ...]:
    """The refiners a config asks for: ``refine="refit"`` the least-squares re-fit of the kept
    weights, ``refine="admm"`` ADMM over mask and weights (ending in that re-fit)."""
    if config.refine == "refit":

        def refit(name: str, W: torch.Tensor, W_pruned: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
            return W_pruned if H is None else refit_weights(W, H, W_pruned, percdamp=config.percdamp)

        return (refit,)
    if config.refine == "admm":
        n, m = config.nm

        def admm(name: str, W: torch.Tensor, W_pruned: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
            if H is None:
                return W_pruned
            return admm_prune(W, H, W_pruned, n=n, m=m, percdamp=config.percdamp, iters=config.admm_iters).weight

        return (admm,)
    return ()


class ModulePruner:
    """Prune a module in place and append its ``ModuleReport``; called once per target module.

    On the module's owner rank: ``prune_matrix``, then each refiner in turn; the result is then
    broadcast (a no-op for one process), written into the module in its own layout and dtype, and
    reported with its layer error against the dense weight.

    Args:
        config: The run's ``RoseConfig``.
        world: The ``torch.distributed`` world (``World()`` for one process).
        report: Receives one row per module.
        observer: Optional ``observer(name, W, H)`` before each module is pruned.
        refiners: ``refiner(name, W, W_pruned, H) -> W`` applied in order after the method.
        sparsities: Per-module sparsity (a plan); modules it leaves out use ``config.sparsity``.
        tidy: Called after each module (streaming trims the heap there).
    """

    def __init__(
        self,
        config: RoseConfig,
        world: World,
        report: PruneReport,
        *,
        observer: Observer | None = None,
        refiners: Sequence[Refiner] = (),
        sparsities: Mapping[str, float] | None = None,
        tidy: Callable[[], None] | None = None,
    ) -> None:
        self.config, self.world, self.report = config, world, report
        self.observer, self.refiners = observer, tuple(refiners)
        self.sparsities = dict(sparsities or {})
        self.tidy = tidy
        self.current: str | None = None  # the module being pruned, for the error if it fails

    def __call__(self, name: str, module: nn.Module, H: torch.Tensor | None, C: torch.Tensor | None = None) -> None:
        """Prune ``module`` (named ``name``) given its Hessian ``H`` (``None``: no token reached it)."""
        started = time.perf_counter()
        self.current = name
        W = weight_matrix(module).detach()
        if H is None and self.config.method != "magnitude" and self.world.lead:
            warn_caller(f"{name} saw no calibration token (an unused expert?); pruned by magnitude instead.")
        if self.observer is not None:
            self.observer(name, W, H)
        owner = self.world.owner(len(self.report.modules))
        if self.world.rank == owner:
            new_weight, info = prune_matrix(W, H, self.config, C, self.sparsities.get(name))
            for refine in self.refiners:
                new_weight = refine(name, W, new_weight, H)
            if not all_finite(new_weight):  # finite in (pre-flight checked), so never NaN out
                raise FloatingPointError(
                    f"{name}: pruning turned finite weights into NaN or inf (Hessian of {W.shape[1]} columns); "
                    "nothing of this module was written. Try a larger percdamp such as 0.1."
                )
        else:
            new_weight, info = torch.empty(W.shape, dtype=torch.float32, device=W.device), {}
        new_weight = self.world.broadcast_tensor(new_weight.contiguous(), owner)
        info = self.world.broadcast_object(info, owner)
        error, relative = reconstruction_error(W, new_weight, H) if H is not None else (float("nan"), float("nan"))
        write_weight(module, new_weight)
        stored = weight_matrix(module)
        self.report.modules.append(
            ModuleReport(
                name=name,
                method=info["method"],
                shape=(int(W.shape[0]), int(W.shape[1])),
                sparsity=float((stored == 0).float().mean().item()),
                error=error,
                relative_error=relative,
                reordered=bool(info.get("reordered", False)),
                relative_range=float(info.get("relative_range", 0.0)),
                damp_scale=float(info.get("damp_scale", 1.0)),
                seconds=time.perf_counter() - started,
            )
        )
        del W, new_weight, stored
        self.current = None
        if self.tidy is not None:
            self.tidy()
