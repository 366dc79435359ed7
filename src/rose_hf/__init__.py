"""rose_hf: one-shot ROSE / SparseGPT pruning for Hugging Face transformers models."""

from rose_hf.config import RoseConfig
from rose_hf.pruner import RosePruner
from rose_hf.report import ModuleReport, PruneReport
from rose_hf.version import __version__

__all__ = ["ModuleReport", "PruneReport", "RoseConfig", "RosePruner", "__version__"]
