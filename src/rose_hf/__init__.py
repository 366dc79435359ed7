"""rose_hf: one-shot ROSE / SparseGPT pruning for Hugging Face transformers models.

The public names load on first use (PEP 562), so ``import rose_hf.cli`` and ``rose-hf --help``
do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rose_hf.version import __version__

if TYPE_CHECKING:
    from rose_hf.config import RoseConfig
    from rose_hf.pruner import RosePruner
    from rose_hf.report import ModuleReport, PruneReport

_WHERE = {
    "ModuleReport": "rose_hf.report",
    "PruneReport": "rose_hf.report",
    "RoseConfig": "rose_hf.config",
    "RosePruner": "rose_hf.pruner",
}

__all__ = ["ModuleReport", "PruneReport", "RoseConfig", "RosePruner", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'rose_hf' has no attribute {name!r}")
