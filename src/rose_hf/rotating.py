"""``rotation="heads"``: DenoiseRotator's head rotations as a pipeline transform (plumbing).

Once the step has calibrated the dense block (``rose_hf.steps.change_bases``), ``HeadRotation``
reads the Hessians of its attention's ``v_proj`` and ``o_proj`` inputs from that calibration
(all-reduced under ``torch.distributed``; measured in one forward of its own only where the step
prunes as it goes, ``true_sequential``), learns one rotation per key/value head
(``rose_hf.rotation``), merges it into ``v_proj`` and ``o_proj`` and turns ``o_proj``'s Hessian
with it (``Bᵀ H B``). The block computes the same function and is pruned in the rotated basis.
Nothing is added to the model: the pruned checkpoint is a plain one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rose_hf.config import RoseConfig
from rose_hf.modeling import find_blocks, target_modules, weight_matrix, write_weight
from rose_hf.rotation import fuse_head_rotations, learn_head_rotations, rotate_hessian
from rose_hf.sparsegpt import inverse_hessian
from rose_hf.steps import BlockHessians, Run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attention:
    """An attention module with separate ``v_proj`` and ``o_proj`` and its head geometry, read from
    its ``head_dim`` and its weights' shapes (not ``hidden / heads``, wrong for Gemma and Qwen3)."""

    name: str
    module: nn.Module
    v_proj: nn.Linear
    o_proj: nn.Linear
    heads: int
    kv_heads: int


def attentions(block: nn.Module, option: str = "rotation='heads'", off: str = "rotation='none'") -> list[Attention]:
    """Every attention module in ``block`` with ``nn.Linear`` ``v_proj`` and ``o_proj``; ``option``
    and ``off`` name the setting that needs the head geometry, and how to turn it off, in the error."""
    found = []
    for name, module in block.named_modules():
        v_proj, o_proj = getattr(module, "v_proj", None), getattr(module, "o_proj", None)
        if isinstance(v_proj, nn.Linear) and isinstance(o_proj, nn.Linear):
            head_dim = int(getattr(module, "head_dim", 0))
            if head_dim <= 0 or o_proj.in_features % head_dim or v_proj.out_features % head_dim:
                raise ValueError(
                    f"{option} cannot read the head size of {name or 'the block'} (head_dim="
                    f"{getattr(module, 'head_dim', None)!r}); use {off}."
                )
            heads, kv_heads = o_proj.in_features // head_dim, v_proj.out_features // head_dim
            found.append(Attention(name, module, v_proj, o_proj, heads, kv_heads))
    return found


def heads_refusal(model: nn.Module, blocks: nn.ModuleList) -> str | None:
    """Why ``rotation='heads'`` cannot rotate ``model`` (whose decoder blocks are ``blocks``), or
    ``None`` when every block has an attention with ``v_proj``, ``o_proj`` and a readable head size."""
    for index, block in enumerate(blocks):
        try:
            found = attentions(block)
        except ValueError as err:
            return str(err)
        if not found:
            return (
                f"rotation='heads' needs attention modules with v_proj and o_proj; block {index} of "
                f"{type(model).__name__} has none (fused or differently named projections). Use rotation='none'."
            )
        for attention in found:
            if getattr(attention.module, "v_norm", None) is not None:
                return (
                    f"rotation='heads' does not commute with {attention.name}.v_norm in block {index}; "
                    "use rotation='none'."
                )
    return None


def _served(block: nn.Module, targets: Collection[nn.Module]) -> list[Attention]:
    """The attention modules of ``block`` whose rotation serves a pruned module: the rotation
    changes what ``v_proj`` and ``o_proj`` lose, so one with neither pruned keeps its weights."""
    return [a for a in attentions(block) if a.v_proj in targets or a.o_proj in targets]


def _serves_nothing(config: RoseConfig, block_path: str, blocks: nn.ModuleList) -> bool:
    """True when no block prunes an attention's ``v_proj`` or ``o_proj`` (``targets`` / ``ignore``):
    then the head rotation has nothing to serve."""
    for index, block in enumerate(blocks):
        pruned = target_modules(block, f"{block_path}.{index}", config.targets, config.ignore).values()
        if _served(block, set(pruned)):
            return False
    return True


def resolve_rotation(config: RoseConfig, model: nn.Module) -> RoseConfig:
    """``config`` with an unset ``rotation`` resolved for ``model`` (the default recipe's rule):
    ``"heads"`` where every decoder block can take the head rotations and some attention's ``v_proj``
    or ``o_proj`` is pruned, else ``"none"`` (logged with the reason). A copy when it changes
    anything: the caller's config is left as it was. An explicit head rotation that would turn
    nothing (no ``v_proj`` / ``o_proj`` pruned) warns."""
    if config.rotation not in (None, "heads", "residual+heads"):
        return config  # nothing to resolve or to check
    block_path, blocks = find_blocks(model, config.block_path)
    if config.rotation is None:
        refusal = heads_refusal(model, blocks)
        if refusal is None and _serves_nothing(config, block_path, blocks):
            refusal = "no attention's v_proj or o_proj is pruned (targets / ignore), so no head rotation would serve"
        if refusal is not None:
            logger.info("default rotation: none for %s: %s", type(model).__name__, refusal)
        return dataclasses.replace(config, rotation="none" if refusal else "heads")
    if (
        config.rotation in ("heads", "residual+heads")
        and heads_refusal(model, blocks) is None
        and _serves_nothing(config, block_path, blocks)
    ):
        warnings.warn(
            f"rotation={config.rotation!r} turns no attention heads: no v_proj or o_proj is among the pruned modules "
            f"(targets={config.targets!r}, ignore={config.ignore!r}), and the head rotation only serves their "
            f"pruning. Set rotation={'residual' if config.rotation == 'residual+heads' else 'none'!r} to say so.",
            stacklevel=2,
        )
    return config


class HeadRotation:
    """The ``BasisChange`` of ``rotation="heads"``; ``run`` gives the stopwatch and the report.

    The rotation loss before and after learning goes to the report's ``rotation_losses``.
    """

    def __init__(self, config: RoseConfig, run: Run) -> None:
        self.config, self.run = config, run
        self.block_path = ""

    def before_capture(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Refuse, before any weight changes, a model whose blocks have no rotatable attention."""
        refusal = heads_refusal(model, blocks)
        if refusal is not None:
            raise ValueError(refusal)
        self.block_path = find_blocks(model, self.config.block_path)[0]

    def _sparsity(self, index: int, attention: Attention, module: nn.Module) -> float:
        """The sparsity ``module`` will be pruned to: the plan's (``allocation``) where it has one."""
        sub = ".".join(p for p in (attention.name, "v_proj" if module is attention.v_proj else "o_proj") if p)
        planned = self.run.prune.sparsities.get(f"{self.block_path}.{index}.{sub}")
        return float(self.config.sparsity or 0.0) if planned is None else planned

    def reads(self, block: nn.Module, targets: Collection[nn.Module]) -> Sequence[nn.Module]:
        """``v_proj`` and ``o_proj`` of every attention module it rotates."""
        return [m for a in _served(block, targets) for m in (a.v_proj, a.o_proj)]

    def on_calibrated(
        self, index: int, block: nn.Module, targets: Collection[nn.Module], hessians: BlockHessians
    ) -> None:
        """Learn and merge the head rotations of every attention module of block ``index`` whose
        ``v_proj`` or ``o_proj`` is pruned; ``o_proj``'s Hessian turns with its input (``v_proj``'s
        input does not change)."""
        run = self.run
        with run.stopwatch.phase("rotate"):
            for attention in _served(block, targets):
                heads, kv_heads = attention.heads, attention.kv_heads
                Hinv_v, Hinv_o = (
                    inverse_hessian(hessians.of(m), self.config.percdamp) for m in (attention.v_proj, attention.o_proj)
                )
                Wv, Wo = weight_matrix(attention.v_proj), weight_matrix(attention.o_proj)
                R, losses = learn_head_rotations(
                    Wv,
                    Hinv_v,
                    Wo,
                    Hinv_o,
                    kv_heads,
                    heads,
                    steps=self.config.rotation_steps,
                    objective=self.config.rotation_objective,
                    pattern=(self._sparsity(index, attention, attention.v_proj), *self.config.nm),
                    o_sparsity=self._sparsity(index, attention, attention.o_proj),
                )
                del Hinv_v, Hinv_o
                bias = attention.v_proj.bias
                Wv_rot, bias_rot, Wo_rot = fuse_head_rotations(
                    Wv.detach(), None if bias is None else bias.detach(), Wo.detach(), R, heads
                )
                write_weight(attention.v_proj, Wv_rot)
                write_weight(attention.o_proj, Wo_rot)
                if bias is not None and bias_rot is not None:
                    with torch.no_grad():
                        bias.copy_(bias_rot)
                hessians.rebase(attention.o_proj, functools.partial(rotate_hessian, R=R, heads=heads))
                label = f"{index}.{attention.name}" if attention.name else str(index)
                run.prune.report.rotation_losses[label] = [losses[0], losses[-1]]
                logger.debug("block %s: rotation loss %.4g -> %.4g", label, losses[0], losses[-1])
            run.tidy()
