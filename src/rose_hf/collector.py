"""Feed ``GramSum`` accumulators from forward pre-hooks on the target modules of one block.

``HessianCollector`` owns its hooks: they exist only inside its ``with`` block and are removed in
``finally`` even when the forward raises. Modules that read the very same input tensor in a forward
(q/k/v projections, gate/up) share one accumulator, so ``X^T X`` is paid once per distinct input.

Each forward starts with ``begin_forward(token_mask)``, which also decides, after the first forward,
whether later ones may stop early: with ``stop_early=True`` and ``run()``, a forward ends as soon
as the last module's input is in (its pre-hook raises), so the block's last projection and whatever
follows it are never computed.

For ``RoseConfig(objective="dense")`` a forward inside ``reference_pass()`` records each module's
input in the dense model instead; the next forward then also accumulates the cross term.

Forwards may run interleaved (``rose_hf.lockstep``): ``begin_forward`` returns the forward's state
and ``resume`` switches back to it; ``after_input(name)`` is called once a module's input is in,
and ``take(name)`` hands out one module's ``H`` while the forwards are still under way.
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

from rose_hf.distributed import World
from rose_hf.hessian import GramSum, symmetrize
from rose_hf.modeling import weight_matrix


class _Calibrated(Exception):
    """Raised by the last module's pre-hook: the rest of the forward is not needed."""


@dataclass
class ForwardState:
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
                collector.begin_forward(token_mask)   # (batch, seq) bool, or None for all tokens
                block(x)
        H = collector.hessians()                       # name -> (cols, cols) float32

    Tokens where ``token_mask`` is False (padding) are left out of ``X``.

    Args:
        modules: Name -> module whose input is collected.
        stop_early: Forwards run through ``run`` stop after the last module's input, once the first
            forward has shown that every module is called exactly once per forward (otherwise every
            forward runs to the end). Reference passes always run to the end.
        after_input: Called with a module's name at the end of each hook that accumulated.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        stop_early: bool = False,
        after_input: Callable[[str], None] | None = None,
    ) -> None:
        self._modules = dict(modules)
        self._stop_early = stop_early
        self._after_input = after_input
        self._first_calls: list[str] = []
        self._called: set[str] = set()
        self._last: str | None = None
        self._sums: dict[str, GramSum] = {}
        self._alias: dict[str, str] = {}
        self._forwards = 0
        self._state = ForwardState()
        self._taken: dict[str, torch.Tensor] = {}
        self.late: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._recording = False
        self._reference: dict[str, torch.Tensor] = {}

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
        """Remove every hook this collector registered and drop its callback (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state = ForwardState()
        self._after_input = None  # no cycle through a driver that holds this collector

    def begin_forward(self, token_mask: torch.Tensor | None) -> ForwardState:
        """Start a new forward whose real tokens ``token_mask`` ``(batch, seq)`` marks (``None``: all).

        After the first forward it also decides whether later ones stop early. Returns the new
        forward's state, for ``resume`` when forwards run interleaved.
        """
        self._state = ForwardState(None if token_mask is None else token_mask.to(torch.bool))
        self._reference = {}
        if self._forwards == 1 and self._stop_early:
            calls = self._first_calls
            if len(calls) == len(set(calls)) == len(self._modules):
                self._last = calls[-1]
        self._called = set()
        self._forwards += 1
        return self._state

    def resume(self, state: ForwardState) -> None:
        """Continue the forward that ``state`` came from (forwards that run interleaved)."""
        self._state = state

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
            if self._forwards == 1:
                self._first_calls.append(name)
            self._called.add(name)
            # Stop only once every module has its input: a forward that differs from the first
            # (which it should not) runs to the end instead of silently missing inputs.
            if name == self._last and len(self._called) == len(self._modules):
                raise _Calibrated
            if self._after_input is not None:
                self._after_input(name)

        return hook

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 ``(tokens, features)`` rows, padding tokens dropped."""
        X = x.detach().reshape(-1, x.shape[-1])
        mask = self._state.token_mask
        if mask is not None:
            if mask.numel() == X.shape[0]:
                X = X[mask.reshape(-1).to(X.device)]
            elif not bool(mask.all()):
                # A module that sees a subset of the tokens (a routed expert) cannot be told which
                # of its rows are padding; with no padding in the batch every row is real.
                raise ValueError(
                    f"{name} got {X.shape[0]} token rows but the attention mask covers {mask.numel()} tokens, "
                    "some of them padding, so padding cannot be left out of its Hessian. Calibrate with "
                    "unpadded windows of equal length (rose_hf.data.sample_windows) for such modules."
                )
        return X.to(torch.float32)

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        seen_list = self._state.seen
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
        X = self._rows(name, x)
        X_dense = None
        if self._reference:
            if name not in self._reference:
                raise RuntimeError(f"{name} got no input in the reference pass; the block's calls differ.")
            X_dense = self._rows(name, self._reference[name]).to(X.device)
        self._sums.setdefault(name, GramSum()).update(X, X_dense)

    def all_reduce(self, world: World) -> None:
        """Sum the accumulators and token counts over ``world`` (a no-op for one process).

        Every rank must have accumulated the same modules (always true for dense models).
        """
        names = sorted(self._sums)
        for name in names:
            total, cross = self._sums[name].total, self._sums[name].cross
            if total is not None:
                world.all_reduce_sum(total)
            if cross is not None:
                world.all_reduce_sum(cross)
        if names:
            device = self._sums[names[0]].total.device  # type: ignore[union-attr]
            counts = torch.tensor([self._sums[n].count for n in names], dtype=torch.float64, device=device)
            world.all_reduce_sum(counts)
            for n, c in zip(names, counts.tolist()):
                self._sums[n].count = int(c)

    def token_count(self, name: str) -> int:
        """Tokens accumulated for ``name`` (through its alias, if it shares an input)."""
        found = self._sums.get(self._alias.get(name, name))
        return found.count if found is not None else 0

    def shared_with(self, name: str) -> str | None:
        """The module whose accumulator ``name`` reuses, or ``None``."""
        return self._alias.get(name)

    def hessians(self) -> dict[str, torch.Tensor]:
        """``H = 2/N X^T X`` per module that saw at least one token; sharing modules share a tensor."""
        return self._per_module({name: total.hessian() for name, total in self._sums.items()})

    def crosses(self) -> dict[str, torch.Tensor]:
        """``C = 2/N X^T (X_d - X)`` per module, from forwards that followed a ``reference_pass``."""
        return self._per_module({name: total.cross_term() for name, total in self._sums.items()})

    def _per_module(self, owned: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        result = {name: value for name, value in owned.items() if value is not None}
        for name, owner in self._alias.items():
            if owner in result:
                result[name] = result[owner]
        return result

    def take(self, name: str, world: World) -> torch.Tensor | None:
        """``H`` of one module now, summed over ``world`` (``None``: no token yet); its accumulator
        stops counting.

        Modules sharing an input get the same tensor. Every rank must ask for the same names in the
        same order. Inputs that reach the module afterwards are left out and listed in ``late``.
        """
        owner = self._alias.get(name, name)
        if owner in self._taken:
            return self._taken[owner]
        found = self._sums.pop(owner, None)
        total, count = (found.total, found.count) if found is not None else (None, 0)
        if total is None:  # no token of this rank reached it: other ranks' sums still need a partner
            weight = weight_matrix(self._modules[owner])
            total = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float32, device=weight.device)
        world.all_reduce_sum(total)
        counted = torch.tensor([float(count)], dtype=torch.float64, device=total.device)
        count = int(world.all_reduce_sum(counted).item())
        if count == 0:
            return None
        H = symmetrize(total, 2.0 / count)
        del total, found
        self._taken[owner] = H
        return H
