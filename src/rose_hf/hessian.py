"""Collect ``H = 2/N X^T X`` for the target modules of one block through forward hooks.

``HessianCollector`` owns its hooks: they exist only inside its ``with`` block and are removed in
``finally`` even when the forward raises. Modules that read the very same input tensor in a forward
(q/k/v projections, gate/up) share one accumulator, so ``X^T X`` is paid once per distinct input.
Accumulation is float32 on the module's own device (CUDA when the block is there).

Only the upper triangle of each ``X^T X`` is computed, in panels of ``GRAM_PANEL`` rows
(``gram_update``), and mirrored once at the end: about a third fewer flops than a full product.
With ``stop_early=True`` and ``run()``, a forward ends as soon as the last module's input is in
(its pre-hook raises), so the block's last projection and whatever follows it are never computed.

For ``RoseConfig(objective="dense")`` a forward inside ``reference_pass()`` records each module's
input in the dense model instead; the next forward then also accumulates the cross term
``X^T (X_d - X)`` between the pruned model's inputs ``X`` and the shift to the dense inputs ``X_d``
(same tokens): exactly zero where the two agree, and free of the cancellation that subtracting two
large ``X^T X``-sized sums would suffer.

For ``RoseConfig(true_sequential=True)`` the forwards of all batches run side by side
(``rose_hf.lockstep``): ``set_after_input`` pauses each one once a module's input is in, each forward keeps
its own token mask (``sample``/``use_sample``), and ``hessian(name)`` hands out one module's ``H``
while the forwards are still under way.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from rose_hf.modeling import weight_matrix

GRAM_PANEL = 128


def gram_update(total: torch.Tensor, X: torch.Tensor) -> None:
    """Add ``X^T X`` to ``total`` in place, on and above the diagonal only.

    Row panels of ``GRAM_PANEL``: ``total[a:b, a:] += X[:, a:b]^T X[:, a:]``. Below the diagonal,
    only the panels' diagonal blocks are filled; ``symmetrize`` reads the upper triangle alone.
    """
    cols = X.shape[1]
    for start in range(0, cols, GRAM_PANEL):
        stop = min(start + GRAM_PANEL, cols)
        total[start:stop, start:].addmm_(X[:, start:stop].T, X[:, start:])


def symmetrize(upper: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale`` times the symmetric matrix with ``upper``'s upper triangle (a new tensor)."""
    strict = upper.triu(1)
    full = strict + strict.T
    del strict
    torch.diagonal(full).copy_(torch.diagonal(upper))
    return full.mul_(scale)


class _Calibrated(Exception):
    """Raised by the last module's pre-hook: the rest of the forward is not needed."""


@dataclass
class Sample:
    """What the collector knows about one forward: its token mask and the inputs it has seen."""

    token_mask: torch.Tensor | None = None
    # Inputs seen in this forward, as weak references: one that is gone never matches, so a later
    # input that reuses its memory (or its id) cannot pass for it, and none is kept alive here.
    seen: list[tuple[weakref.ref[torch.Tensor], str]] = field(default_factory=list)


class HessianCollector:
    """Accumulate ``X^T X`` of the inputs of ``modules`` while their block runs.

    Usage::

        with HessianCollector({"mlp.up_proj": up, ...}) as collector:
            for x, token_mask in samples:
                collector.set_token_mask(token_mask)   # (batch, seq) bool, or None for all tokens
                block(x)
        H = collector.hessians()                       # name -> (cols, cols) float32

    With a dense reference, per sample: ``set_token_mask``, then the dense forward inside
    ``with collector.reference_pass():``, then the pruned model's forward; ``crosses()`` then holds
    ``C = 2/N X^T (X_d - X)``.

    Tokens where ``token_mask`` is False (padding) are left out of ``X``.

    ``stop_early=True``: forwards run through ``collector.run(lambda: block(x))`` stop after the
    last module's input, once the first forward has shown that every module is called exactly once
    per forward (otherwise every forward runs to the end). Reference passes always run to the end.
    """

    def __init__(self, modules: Mapping[str, nn.Module], stop_early: bool = False) -> None:
        self._modules = dict(modules)
        self._stop_early = stop_early
        self._after_input: Callable[[str], None] | None = None
        self._first_calls: list[str] = []
        self._called: set[str] = set()
        self._last: str | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._alias: dict[str, str] = {}
        self._step = 0
        self._sample = Sample()
        self._taken: dict[str, torch.Tensor] = {}
        self.late: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._recording = False
        self._reference: dict[str, torch.Tensor] = {}
        self._cross: dict[str, torch.Tensor] = {}

    def __enter__(self) -> HessianCollector:
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this collector registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sample = Sample()

    def set_token_mask(self, token_mask: torch.Tensor | None) -> None:
        """Start a new forward: ``token_mask`` ``(batch, seq)`` marks real tokens (``None``: all)."""
        self._sample = Sample(None if token_mask is None else token_mask.to(torch.bool))
        self._reference = {}
        if self._step == 1 and self._stop_early:
            calls = self._first_calls
            if len(calls) == len(set(calls)) == len(self._modules):
                self._last = calls[-1]
        self._called = set()
        self._step += 1

    def set_after_input(self, after_input: Callable[[str], None] | None) -> None:
        """Call ``after_input(name)`` at the end of every accumulating hook (``None``: nothing)."""
        self._after_input = after_input

    def sample(self) -> Sample:
        """The current forward's state (after ``set_token_mask``), to hand back to ``use_sample``."""
        return self._sample

    def use_sample(self, sample: Sample) -> None:
        """Continue the forward that ``sample`` came from (forwards that run side by side)."""
        self._sample = sample

    def run(self, forward: Callable[[], object]) -> None:
        """Call ``forward()`` (one forward of the block) for the inputs it feeds the modules.

        Its output is discarded: with ``stop_early`` it may end before the block computes one.
        """
        try:
            forward()
        except _Calibrated:
            pass

    @contextlib.contextmanager
    def reference_pass(self) -> Iterator[None]:
        """Inside: forwards record each module's input as the reference (dense-model) input of the
        next accumulating forward, and accumulate nothing."""
        self._reference = {}
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def _make_hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self._recording:
                self._reference[name] = args[0].detach()
                return
            self._accumulate(name, args[0])
            if self._step == 1:
                self._first_calls.append(name)
            self._called.add(name)
            # Stop only once every module has its input: a forward that differs from the first
            # (which it should not) runs to the end instead of silently missing inputs.
            if name == self._last and len(self._called) == len(self._modules):
                raise _Calibrated
            if self._after_input is not None:
                self._after_input(name)

        return hook

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 ``(tokens, features)`` rows, padding tokens dropped."""
        X = x.detach().reshape(-1, x.shape[-1])
        mask = self._sample.token_mask
        if mask is not None and mask.numel() == X.shape[0]:
            X = X[mask.reshape(-1).to(X.device)]
        return X.to(torch.float32)

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        seen_list = self._sample.seen
        owner = next((seen_name for seen, seen_name in seen_list if seen() is x), None)
        # A module's first input decides whether it shares an accumulator; later ones must agree.
        if owner is not None and name not in self._sums and name not in self._alias:
            self._alias[name] = owner
        if name in self._alias:
            if owner != self._alias[name]:
                raise RuntimeError(
                    f"{name} shared its input with {self._alias[name]} in the first forward but not "
                    "later; the block's inputs are not deterministic."
                )
            return
        if owner is None:
            seen_list.append((weakref.ref(x), name))
        if name in self._taken:  # its H is out already: an input after that cannot count
            self.late.add(name)
            return
        X = self._rows(x)
        if name not in self._sums:
            self._sums[name] = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
            self._counts[name] = 0
        gram_update(self._sums[name], X)
        self._counts[name] += X.shape[0]
        if self._reference:
            if name not in self._reference:
                raise RuntimeError(f"{name} got no input in the reference pass; the block's calls differ.")
            Xd = self._rows(self._reference[name]).to(X.device)
            if name not in self._cross:
                self._cross[name] = torch.zeros_like(self._sums[name])
            self._cross[name].addmm_(X.T, Xd - X)

    def all_reduce(self) -> None:
        """Sum the accumulators and token counts over all ranks of ``torch.distributed``.

        Every rank must have accumulated the same modules (always true for dense models).
        """
        from rose_hf.distributed import all_reduce_sum

        names = sorted(self._sums)
        for name in names:
            all_reduce_sum(self._sums[name])
            if name in self._cross:
                all_reduce_sum(self._cross[name])
        if names:
            device = self._sums[names[0]].device
            counts = torch.tensor([self._counts[n] for n in names], dtype=torch.float64, device=device)
            all_reduce_sum(counts)
            self._counts.update({n: int(c) for n, c in zip(names, counts.tolist())})

    def token_count(self, name: str) -> int:
        """Tokens accumulated for ``name`` (through its alias, if it shares an input)."""
        return self._counts.get(self._alias.get(name, name), 0)

    def shared_with(self, name: str) -> str | None:
        """The module whose accumulator ``name`` reuses, or ``None``."""
        return self._alias.get(name)

    def hessians(self) -> dict[str, torch.Tensor]:
        """``H = 2/N X^T X`` per module that saw at least one token; sharing modules share a tensor."""
        return self._scaled(self._sums, symmetric=True)

    def hessian(self, name: str, all_reduce: bool = False) -> torch.Tensor | None:
        """``H`` of one module now (``None``: no token yet); its accumulator stops counting.

        Modules sharing an input get the same tensor. ``all_reduce=True`` first sums the accumulator
        over the ranks of ``torch.distributed`` (every rank must ask for the same names in order).
        Inputs that reach the module afterwards are left out and their names listed in ``late``.
        """
        owner = self._alias.get(name, name)
        if owner in self._taken:
            return self._taken[owner]
        total = self._sums.pop(owner, None)
        if all_reduce:
            from rose_hf.distributed import all_reduce_sum

            if total is None:  # no token of this rank reached it: the others' sums still need a partner
                weight = weight_matrix(self._modules[owner])
                total = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float32, device=weight.device)
            all_reduce_sum(total)
            count = torch.tensor([float(self._counts.get(owner, 0))], dtype=torch.float64, device=total.device)
            all_reduce_sum(count)
            self._counts[owner] = int(count.item())
        if total is None or self._counts.get(owner, 0) == 0:
            return None
        H = symmetrize(total, 2.0 / self._counts[owner])
        del total
        self._taken[owner] = H
        return H

    def crosses(self) -> dict[str, torch.Tensor]:
        """``C = 2/N X^T (X_d - X)`` per module, from forwards that followed a ``reference_pass``."""
        return self._scaled(self._cross, symmetric=False)

    def _scaled(self, sums: dict[str, torch.Tensor], symmetric: bool) -> dict[str, torch.Tensor]:
        owned = {
            name: symmetrize(total, 2.0 / self._counts[name]) if symmetric else total * (2.0 / self._counts[name])
            for name, total in sums.items()
            if self._counts[name] > 0
        }
        result = dict(owned)
        for name, owner in self._alias.items():
            if owner in owned:
                result[name] = owned[owner]
        return result
