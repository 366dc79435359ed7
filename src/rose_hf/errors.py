"""The errors a pruning run raises about its inputs and its state; light to import (the CLI's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rose_hf.report import PruneReport


class PreflightError(ValueError):
    """Problems found before pruning; nothing was changed. ``problems`` lists them, one a line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"- {p}" for p in problems[:20])
        more = f"\n- ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} problem(s) found before pruning; nothing was changed:\n{shown}{more}")


class PruningError(RuntimeError):
    """Pruning stopped part way: ``report`` holds the modules pruned so far (the model is partly pruned)."""

    def __init__(self, message: str, report: PruneReport) -> None:
        super().__init__(message)
        self.report = report


class RotationError(ValueError):
    """The model cannot take the rotation asked for; nothing has been changed."""


LAYER_NOT_SAVED = (
    "rotation='layer' leaves one rotation per block that must run at inference (forward hooks, not weights): "
    "it is for evaluating in memory only and its model cannot be saved as a checkpoint. Use rotation='residual' "
    "(merged, a plain checkpoint; Llama-style models), 'heads' or 'residual+heads'."
)
