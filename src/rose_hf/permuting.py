"""``channel_permutation=True``: N:M-balancing channel permutations as a pipeline transform (plumbing).

Once the step has calibrated the dense block (``rose_hf.steps.change_bases``), after any head
rotation, ``ChannelPermutation`` reads the Hessians of its ``o_proj`` and ``down_proj`` inputs from
that calibration (all-reduced under ``torch.distributed``; measured in one forward of its own only
where the step prunes as it goes, ``true_sequential``), chooses an order of each key/value head's
channels and of the MLP's hidden channels whose N:M groups drop less importance
(``rose_hf.permutation``), reorders ``v_proj`` rows / ``o_proj`` columns and ``gate_proj`` and
``up_proj`` rows / ``down_proj`` columns to match, and reorders the two Hessians with them. The
block computes the same function; nothing is added to the model. It runs after ``rotation="heads"``
(the order the pipeline lists transforms in), so it balances the rotated basis.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rose_hf.config import RoseConfig
from rose_hf.modeling import weight_matrix, write_weight
from rose_hf.permutation import (
    balance_permutation,
    expand_head_permutation,
    head_permutation,
    permutation_cost,
    permute_square,
)
from rose_hf.rotating import Attention, attentions
from rose_hf.rotation import importance
from rose_hf.sparsegpt import inverse_hessian
from rose_hf.steps import BlockHessians, Run

logger = logging.getLogger(__name__)

ROUNDS = 50  # local-search rounds per module: most of the gain comes in the first few dozen


@dataclass(frozen=True)
class Mlp:
    """A gated MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))``, every part an ``nn.Linear``."""

    name: str
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


def mlps(block: nn.Module) -> list[Mlp]:
    """Every module in ``block`` with ``nn.Linear`` ``gate_proj``, ``up_proj`` and ``down_proj``."""
    found = []
    for name, module in block.named_modules():
        gate, up, down = (getattr(module, key, None) for key in ("gate_proj", "up_proj", "down_proj"))
        if isinstance(gate, nn.Linear) and isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
            found.append(Mlp(name, gate, up, down))
    return found


def _rotatable(block: nn.Module) -> list[Attention]:
    found = attentions(block, "channel_permutation=True", "channel_permutation=False")
    return [a for a in found if getattr(a.module, "v_norm", None) is None]


def _served(block: nn.Module, targets: Collection[nn.Module]) -> tuple[list[Attention], list[Mlp]]:
    """The attention and MLP modules of ``block`` whose reordering serves a pruned module: the order
    only changes the N:M groups of ``o_proj`` / ``down_proj`` columns, so the rest keep their weights."""
    return (
        [a for a in _rotatable(block) if a.o_proj in targets],
        [m for m in mlps(block) if m.down_proj in targets],
    )


def _reorder_rows(module: nn.Linear, order: torch.Tensor) -> None:
    write_weight(module, weight_matrix(module)[order.to(module.weight.device)].clone())
    if module.bias is not None:
        with torch.no_grad():
            module.bias.copy_(module.bias[order.to(module.bias.device)].clone())


def _reorder_columns(module: nn.Linear, order: torch.Tensor) -> None:
    write_weight(module, weight_matrix(module)[:, order.to(module.weight.device)].clone())


class ChannelPermutation:
    """The ``BasisChange`` of ``channel_permutation=True``; ``run`` gives the stopwatch and the report.

    Each permuted module's cost (the importance its N:M groups drop) before and after goes to the
    report's ``permutation_costs``.
    """

    def __init__(self, config: RoseConfig, run: Run) -> None:
        self.config, self.run = config, run
        self.n, self.m = config.nm

    def before_capture(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Refuse, before any weight changes, a model with no channels this can reorder."""
        found = [(mlps(block), _rotatable(block)) for block in blocks]  # _rotatable refuses unreadable heads
        if not any(m or a for m, a in found):
            raise ValueError(
                f"channel_permutation=True reorders gated MLPs (gate_proj/up_proj/down_proj) and attention "
                f"v_proj/o_proj; {type(model).__name__} has neither as nn.Linear. Use channel_permutation=False."
            )

    def reads(self, block: nn.Module, targets: Collection[nn.Module]) -> Sequence[nn.Module]:
        """``o_proj`` and ``down_proj`` of every attention and gated MLP it reorders."""
        attention, mlp = _served(block, targets)
        return [a.o_proj for a in attention] + [m.down_proj for m in mlp]

    def on_calibrated(
        self, index: int, block: nn.Module, targets: Collection[nn.Module], hessians: BlockHessians
    ) -> None:
        """Choose and apply the channel orders of every attention and MLP module of block ``index``
        whose ``o_proj`` / ``down_proj`` is pruned; their Hessians are reordered with their inputs."""
        run = self.run
        with run.stopwatch.phase("rotate"):
            generator = torch.Generator().manual_seed(self.config.seed + index)
            attention_served, mlp_served = _served(block, targets)
            for attention in attention_served:
                S = self._importance(attention.o_proj, hessians.of(attention.o_proj))
                perm = head_permutation(S, attention.heads, attention.kv_heads, self.n, self.m, ROUNDS, generator)
                v_order, o_order = expand_head_permutation(perm, attention.heads)
                self._record(index, attention.name, "o_proj", S, o_order)
                _reorder_rows(attention.v_proj, v_order)
                _reorder_columns(attention.o_proj, o_order)
                hessians.rebase(attention.o_proj, functools.partial(permute_square, order=o_order))
            for mlp in mlp_served:
                S = self._importance(mlp.down_proj, hessians.of(mlp.down_proj))
                if S.shape[1] % self.m:
                    continue  # validated before pruning: such a down_proj cannot take the pattern either
                order = balance_permutation(S, self.n, self.m, ROUNDS, generator)
                self._record(index, mlp.name, "down_proj", S, order)
                _reorder_rows(mlp.gate_proj, order)
                _reorder_rows(mlp.up_proj, order)
                _reorder_columns(mlp.down_proj, order)
                hessians.rebase(mlp.down_proj, functools.partial(permute_square, order=order))
            run.tidy()

    def _importance(self, module: nn.Linear, H: torch.Tensor) -> torch.Tensor:
        """SparseGPT's importance of ``module``'s weights on the CPU: the permutation search is small."""
        Hinv = inverse_hessian(H.to(torch.float32), self.config.percdamp)
        W = weight_matrix(module).detach().to(device=Hinv.device, dtype=torch.float32)
        return importance(W, torch.diagonal(Hinv)).cpu()

    def _record(self, index: int, path: str, leaf: str, S: torch.Tensor, order: torch.Tensor) -> None:
        label = f"{index}.{path}.{leaf}" if path else f"{index}.{leaf}"
        before = permutation_cost(S, torch.arange(S.shape[1]), self.n, self.m)
        after = permutation_cost(S, order, self.n, self.m)
        self.run.prune.report.permutation_costs[label] = [before, after]
        logger.debug("block %s: N:M cost %.4g -> %.4g", label, before, after)
