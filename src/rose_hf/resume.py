"""Resume a streamed prune that was killed, from the last block it finished.

A streaming run (``prune_checkpoint``, ``rose-hf prune --stream``) stages its output in a folder
beside the target, ``.<name>.partial``, and records after each finished block which blocks are done,
their shards and their report rows (``rose_progress.json``, written atomically). A run killed at any
point (SIGKILL included) leaves that folder; the same call again finds it, checks that it comes from
the same recipe, calibration tokens, base checkpoint and rose_hf version (``run_key``), and goes on
from there: the finished blocks are replayed from their written shards to rebuild the next block's
inputs (the same forwards on the same weights as the uninterrupted run's propagation, so the result
is bitwise the same), and only the rest are pruned. A partial run of anything else is refused with
the way out (delete it, or ``overwrite``), never silently reused or left behind unannounced.

Single process only (under ``torch.distributed`` the other ranks cannot see rank 0's shards), and
not for ``objective="dense"`` (the dense reference activations would need their own replay): those
start over, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rose_hf.config import RoseConfig
from rose_hf.report import ModuleReport, PruneReport
from rose_hf.version import __version__

PROGRESS = "rose_progress.json"
SUFFIX = ".partial"


def run_key(source: Path, config: RoseConfig, calibration_sha256: str, max_shard_size: int | str) -> str:
    """What a partial run must share with this one to be resumed, as a sha256.

    The recipe (without the compute device), the calibration tokens, the shard size, the rose_hf
    version, and the source's weight files by name, size and modification time (cheap to read for
    a 140 GB checkpoint, and changed by any re-download).
    """
    recipe = {k: v for k, v in config.to_dict().items() if k != "device"}
    files = sorted([*source.glob("*.safetensors"), *source.glob("*.json")])
    stamps = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    payload = json.dumps(
        {"recipe": recipe, "calibration": calibration_sha256, "shard": str(max_shard_size), "files": stamps},
        sort_keys=True,
    )
    return hashlib.sha256(f"{__version__}\n{payload}".encode()).hexdigest()


@dataclass
class Progress:
    """Which blocks a staged streaming run has finished, their shards and report rows."""

    key: str
    blocks_done: int = 0
    shards: list[list[Any]] = field(default_factory=list)  # [file, tensor names, tensor bytes]
    modules: list[dict[str, Any]] = field(default_factory=list)

    def record(
        self, folder: Path, blocks_done: int, shards: list[tuple[str, list[str], int]], report: PruneReport
    ) -> None:
        """Note that ``blocks_done`` blocks are finished and written, atomically."""
        self.blocks_done = blocks_done
        self.shards = [list(shard) for shard in shards]
        self.modules = [asdict(m) for m in report.modules]
        temporary = folder / f"{PROGRESS}.tmp"
        temporary.write_text(json.dumps(asdict(self), sort_keys=True), encoding="utf-8")
        os.replace(temporary, folder / PROGRESS)

    def rows(self) -> list[ModuleReport]:
        """The finished modules' report rows."""
        return [ModuleReport(**{**row, "shape": tuple(row["shape"])}) for row in self.modules]

    @staticmethod
    def load(folder: Path) -> Progress | None:
        """The progress recorded in ``folder``, or ``None`` when there is none to read."""
        try:
            data = json.loads((folder / PROGRESS).read_text(encoding="utf-8"))
            return Progress(**data)
        except (OSError, ValueError, TypeError):
            return None


@contextlib.contextmanager
def resumable_output(target: Path, overwrite: bool, key: str) -> Iterator[tuple[Path, Progress]]:
    """Like ``rose_hf.output.staged_output``, but the staging folder outlives a failure once a block
    is finished, so the same call can resume; yields ``(staging, progress)``."""
    from rose_hf.output import check_output_dir, publish

    check_output_dir(target, overwrite)
    staging = target.parent / f".{target.name}{SUFFIX}"
    progress = Progress.load(staging) if staging.is_dir() else None
    if staging.exists() and (progress is None or progress.key != key):
        if not overwrite:
            raise FileExistsError(
                f"{str(staging)!r} holds a partial run of another recipe, calibration, base checkpoint or rose_hf "
                "version; delete it, or pass overwrite=True (--overwrite) to start over."
            )
        shutil.rmtree(staging)
        progress = None
    if progress is None:
        staging.mkdir(parents=True)
        progress = Progress(key)
    for scratch in staging.glob("rose_hf-activations-*"):  # a killed run's activations: stale
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        yield staging, progress
        (staging / PROGRESS).unlink(missing_ok=True)
        publish(staging, target)
    except BaseException as err:
        if progress.blocks_done == 0:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            err.add_note(
                f"{progress.blocks_done} finished blocks are kept in {str(staging)!r}: the same call resumes "
                "from there (delete the folder to start over)."
            )
        raise


@contextlib.contextmanager
def fresh_output(staged: contextlib.AbstractContextManager[Path]) -> Iterator[tuple[Path, Progress | None]]:
    """``staged`` (a non-resumable staging context) in ``resumable_output``'s shape: no progress."""
    with staged as staging:
        yield staging, None
