"""Run the forwards of all calibration batches through one block side by side, pausing at modules.

``RoseConfig(true_sequential=True)`` prunes each module on the inputs that the block's earlier,
already-pruned modules produce. A module's Hessian needs its input from *every* batch before the
module computes anything, and a batch's forward cannot be cut in two and resumed. So each batch's
forward runs in its own greenlet (a coroutine with its own stack, on this thread): the Hessian
hook calls ``Forwards.pause`` once it has the input, which hands control back to the pruner. When
every batch waits at the same module, the pruner prunes it and resumes them all. One forward per
block then both calibrates every module and propagates the pruned block's outputs::

    batch 0: ln -> q|pause            k|pause ... o|pause ...  down|pause ... -> output
    batch 1: ln -> q|pause            k|pause ... o|pause ...  down|pause ... -> output
                       ^ prune q          ^ prune k  ^ prune o      ^ prune down

The cost is memory: while paused, every batch holds what its forward holds at that point (for a
Llama block at ``down_proj``: the residual stream, the normed input and the MLP's inner
activations), instead of one set of hidden states. ``decide`` says what to do after a round;
``Lockstep`` is the pipeline step that drives it all for one block.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import greenlet
import torch

from rose_hf.activations import Activations
from rose_hf.collector import ForwardState, HessianCollector
from rose_hf.modeling import BlockCall, run_block
from rose_hf.runtime import warn_caller
from rose_hf.steps import BlockTurn, Run, change_bases, propagate


@dataclass(frozen=True)
class Round:
    """Where one process's forwards stand after a round: the modules they wait at, how many finished."""

    waiting: frozenset[str]
    waiting_count: int
    finished_count: int


def decide(rounds: Sequence[Round], pruned: set[str]) -> tuple[str, str]:
    """What to do after a round, from every process's ``Round``; all processes decide the same.

    Returns ``("prune", module)`` when every unfinished forward waits at the same module, which is
    not pruned yet; ``("done", "")`` when every forward has finished; otherwise
    ``("diverge", reason)``: the forwards took different paths (a mixture-of-experts router, a
    module called only for some inputs) or a module was called twice, and lockstep cannot go on.
    """
    waiting = frozenset().union(*(r.waiting for r in rounds))
    waiting_count = sum(r.waiting_count for r in rounds)
    finished_count = sum(r.finished_count for r in rounds)
    if waiting_count == 0:
        return "done", ""
    if len(waiting) > 1:
        return "diverge", f"batches wait at different modules ({', '.join(sorted(waiting))})"
    (name,) = waiting
    if finished_count:
        return "diverge", f"some batches finished without calling {name}"
    if name in pruned:
        return "diverge", f"{name} is called more than once per forward"
    return "prune", name


class Forwards:
    """Forwards that run side by side and pause in ``pause``; drive them with ``step``.

    Args:
        forwards: One zero-argument callable per batch (one forward of the block); its return
            value lands in ``results``.
        before_resume: Called with a batch's index right before its forward resumes (the Hessian
            collector switches to that batch's token mask there).
    """

    def __init__(self, forwards: Sequence[Callable[[], Any]], before_resume: Callable[[int], None]) -> None:
        self._main = greenlet.getcurrent()
        self._greenlets = [greenlet.greenlet(forward) for forward in forwards]
        self._before_resume = before_resume
        self._free = False
        self.results: list[Any] = [None] * len(forwards)
        self._running = list(range(len(forwards)))

    def pause(self, name: str) -> None:
        """Hand control back to the driver, waiting at module ``name`` (a no-op once ``finish`` runs,
        or when called outside one of this object's forwards)."""
        current = greenlet.getcurrent()
        if self._free or current is self._main or current.parent is not self._main:
            return
        self._main.switch(name)

    def step(self) -> Round:
        """Resume every unfinished forward until it pauses or finishes."""
        waiting: set[str] = set()
        still, finished = [], 0
        for index in self._running:
            self._before_resume(index)
            value = self._greenlets[index].switch()
            if self._greenlets[index].dead:
                self.results[index] = value
                finished += 1
            else:
                waiting.add(value)
                still.append(index)
        self._running = still
        return Round(frozenset(waiting), len(still), finished)

    def finish(self) -> None:
        """Run every unfinished forward to its end without pausing again."""
        self._free = True
        while self._running:
            self.step()

    def close(self) -> None:
        """Abandon unfinished forwards (after an error), releasing what they hold."""
        for index in self._running:
            if not self._greenlets[index].dead:
                self._greenlets[index].throw()  # GreenletExit: unwinds its frames
        self._running = []


class Lockstep:
    """The ``true_sequential`` step: one side-by-side forward of all batches prunes each module when
    every batch waits at its input, and its outputs are the pruned block's."""

    needs_calibration = True

    def run(self, run: Run, turn: BlockTurn) -> None:
        """Prune the block's modules in call order; fall back (warned) when the batches diverge."""
        assert run.hidden is not None
        change_bases(run, turn)  # modules are pruned as they are reached: the changes measure for themselves
        hidden, calls = run.hidden, run.calls[turn.index]
        pruned: set[str] = set()
        states: list[ForwardState] = []
        forwards = [functools.partial(_forward, turn, hidden, k, call, run.device) for k, call in enumerate(calls)]
        runner = Forwards(forwards, lambda k: collector.resume(states[k]))
        with run.stopwatch.phase("calibrate"), HessianCollector(turn.modules, after_input=runner.pause) as collector:
            states.extend(collector.begin_forward(mask) for mask in run.masks)
            try:
                action = self._prune_in_call_order(run, turn, collector, runner, pruned)
            finally:
                runner.close()
                states.clear()
        if collector.late and run.world.lead:
            warn_caller(
                f"block {turn.index}: {sorted(collector.late)} got inputs after being pruned (called more than "
                "once per forward); only their first call's inputs were used."
            )
        if action == "done":
            for k, output in enumerate(runner.results):
                hidden[k] = output
        elif not turn.last:  # the forward's outputs came partly from dense modules: propagate once more
            propagate(run, turn)
        runner.results.clear()

    @staticmethod
    def _prune_in_call_order(
        run: Run, turn: BlockTurn, collector: HessianCollector, runner: Forwards, pruned: set[str]
    ) -> str:
        while True:
            action, detail = decide(run.world.gather_objects(runner.step()), pruned)
            if action != "prune":
                break
            with run.stopwatch.phase("prune"):
                run.prune(detail, turn.modules[detail], collector.take(detail, run.world))
            pruned.add(detail)
        if action == "diverge":
            runner.finish()
            if run.world.lead:
                warn_caller(
                    f"block {turn.index}: true_sequential stopped because {detail}; the block's remaining "
                    "modules are pruned on the inputs of a forward in which they were still dense."
                )
        with run.stopwatch.phase("prune"):
            for name, module in turn.modules.items():  # after "done": modules no batch called
                if name not in pruned:
                    run.prune(name, module, collector.take(name, run.world))
        return action


def _forward(turn: BlockTurn, hidden: Activations, k: int, call: BlockCall, device: torch.device) -> torch.Tensor:
    return run_block(turn.block, hidden[k], call, device)
