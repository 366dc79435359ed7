"""Where streaming mode's peak RSS comes from: RSS sampled through one streaming run, by phase.

    python benchmarks/stream_trace.py     # benchmarks/results/stream_trace.json; speed.py --render uses it

A thread samples ``/proc/self/status`` (VmRSS, RssAnon, RssFile) every few milliseconds while
``prune_checkpoint`` streams SmolLM2-135M as the CLI does (70 % ROSE, the calibration set of speed.py,
activations on disk, glibc's mmap threshold fixed at 1 MiB); the pruner's
block and module steps are wrapped to label each sample with the phase it was taken in. Linux only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import ROOT, peak_rss_mib, prepare
from speed import STREAM_VARIANTS, calib

OUT = ROOT / "benchmarks" / "results" / "stream_trace.json"


def status() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process in MiB."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) / 1024
    return values


class Tracer:
    """Samples RSS in a thread; ``phase`` labels the samples taken while it is set."""

    def __init__(self) -> None:
        self.phase = "start"
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append({**status(), "phase": self.phase})
            time.sleep(0.005)

    def __enter__(self) -> Tracer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def wrap(self, owner: type, name: str, label: Callable[..., str], after: Callable[..., str]) -> None:
        """Label samples ``label(*args)`` during ``owner.name`` and ``after(*args)`` once it returns."""
        original = getattr(owner, name)

        def wrapped(this: Any, *args: Any, **kwargs: Any) -> Any:
            self.phase = label(*args)
            try:
                return original(this, *args, **kwargs)
            finally:
                self.phase = after(*args)

        setattr(owner, name, wrapped)


def summarise(samples: list[dict[str, Any]], start: dict[str, float]) -> dict[str, Any]:
    peak = max(samples, key=lambda s: s["VmRSS"])
    by_phase: dict[str, float] = {}
    for sample in samples:
        kind = sample["phase"].split(":")[0]
        if kind.startswith(("prune", "after prune")):  # by module kind: q_proj, down_proj, ...
            kind += " " + sample["phase"].rsplit(".", 1)[-1]
        by_phase[kind] = max(by_phase.get(kind, 0.0), sample["VmRSS"])
    enters = [s["VmRSS"] for s in samples if s["phase"].startswith("load block:")]
    return {
        "start": start,
        "peak": peak,
        "peak_by_phase": by_phase,
        "first_block_enter_mib": enters[0] if enters else None,
        "last_block_enter_mib": enters[-1] if enters else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import rose_hf.streaming as streaming
    from rose_hf import RoseConfig
    from rose_hf.pruning import ModulePruner

    ids = calib(args)
    source = prepare()
    start = status()
    tracer = Tracer()
    home = streaming.CheckpointHome
    tracer.wrap(home, "__init__", lambda *a: "build model", lambda *a: "start")
    tracer.wrap(home, "before_capture", lambda *a: "load embedding rows", lambda *a: "capture")
    tracer.wrap(home, "after_capture", lambda *a: "free embeddings", lambda *a: "between blocks")
    tracer.wrap(home, "enter", lambda i, b: f"load block:{i}", lambda i, b: f"calibrate:{i}")
    tracer.wrap(ModulePruner, "__call__", lambda name, *a: f"prune:{name}", lambda name, *a: f"after prune:{name}")
    tracer.wrap(home, "leave", lambda i, b: f"write block:{i}", lambda i, b: "between blocks")
    tracer.wrap(home, "finish", lambda *a: "finish", lambda *a: "done")
    with tracer, tempfile.TemporaryDirectory() as tmp:
        streaming.prune_checkpoint(
            source,
            Path(tmp) / "out",
            RoseConfig(sparsity=0.7, rotation="none"),  # as traced before the default rotated (#14)
            ids,
            progress=False,
            **STREAM_VARIANTS["stream_cli"][1],
        )
    result = summarise(tracer.samples, start)
    result["peak_rss_mib"] = peak_rss_mib()
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
