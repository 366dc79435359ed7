"""Checks of the ``rose-hf`` arguments that need no model, run before anything is loaded.

Each raises ``UsageError`` (exit code 2) naming the flag, the value and the fix. Light to import:
what they need beyond the standard library is imported inside them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rose_hf.cli_parser import DTYPES, UsageError


def dtype_of(name: str) -> Any:
    """The torch dtype (or ``"auto"``) a ``--dtype`` value names."""
    import torch

    choices = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise UsageError(f"--dtype {name!r} is not one of {list(DTYPES)}")
    return choices[name]


def positive(name: str, value: int | None) -> None:
    """``value`` of flag ``name`` must be a positive integer when given."""
    if value is not None and value <= 0:
        raise UsageError(f"{name} {value} must be a positive integer")


def check_prune_usage(args: argparse.Namespace) -> Any:
    """Every check that needs no model, before anything is loaded; returns the resolved dtype."""
    from rose_hf import output

    for name in ("nsamples", "seqlen", "eval_windows", "eval_limit"):
        positive(f"--{name.replace('_', '-')}", getattr(args, name))
    dtype = dtype_of(args.dtype)
    if args.mmap_threshold < 0:
        raise UsageError(f"--mmap-threshold {args.mmap_threshold} must be a number of bytes, or 0 to leave glibc's own")
    from rose_hf.shards import plan_shards

    try:
        plan_shards({}, args.max_shard_size)
    except ValueError as err:
        raise UsageError(f"--max-shard-size {args.max_shard_size!r}: {err}") from None
    for flag, given in (("--eval", args.eval_source), ("--eval-tasks", args.eval_tasks)):
        if args.stream and given:
            raise UsageError(
                f"{flag} cannot be combined with --stream (the model is never in memory); run 'rose-hf eval' on the "
                "output (with --update-card to put the results in its card)"
            )
    check_tasks(args.eval_tasks, args.tasks_path, "--eval-tasks")
    try:
        output.check_output_dir(args.output, args.overwrite, overwrite_hint="--overwrite")
    except (FileExistsError, PermissionError, NotADirectoryError) as err:
        raise UsageError(str(err)) from None
    check_model(args.model)
    check_source("--calib", args.calib)
    if args.eval_source:
        check_source("--eval", args.eval_source)
    if args.report is not None:
        folder = args.report.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UsageError(
                f"--report {str(args.report)!r}: {str(folder)!r} is not a folder you can write; create it first"
            )
    return dtype


def check_model(model: str) -> None:
    """A model argument that names a local folder must be a checkpoint folder (Hub ids pass)."""
    path = Path(model).expanduser()
    if not (path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1):
        return  # "name" or "org/name": a Hub id, resolved when loading
    if not path.is_dir():
        raise UsageError(
            f"model folder {model!r} does not exist; pass a checkpoint folder or a Hub id such as org/name"
        )
    if not (path / "config.json").is_file():
        raise UsageError(f"model folder {model!r} has no config.json; pass a folder written by save_pretrained")


def check_source(flag: str, source: str) -> None:
    """A text source must be a named one, a Hub dataset id, or an existing file or folder."""
    from rose_hf.sources import NAMED_SOURCES, is_hub_id

    if source not in NAMED_SOURCES and not Path(source).exists() and not is_hub_id(source):
        raise UsageError(
            f"{flag} {source!r} is neither an existing file or folder, a Hub dataset id (org/name), nor one of "
            f"{list(NAMED_SOURCES)}; pass an existing .txt/.jsonl/.json/.parquet/.csv file or save_to_disk folder"
        )


def check_tasks(tasks: list[str] | None, tasks_path: Path | None, flag: str) -> None:
    """lm-evaluation-harness tasks need the harness; a tasks folder must exist."""
    if tasks_path is not None and not tasks_path.is_dir():
        raise UsageError(f"--tasks-path {str(tasks_path)!r} is not a folder; pass a folder of task YAML files")
    if not tasks:
        return
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError(f"{flag} needs lm-evaluation-harness: pip install 'rose_hf[eval]'")


def hub_token(args: argparse.Namespace) -> str | None:
    """The Hub token ``--push-to-hub`` needs (``--token``, ``HF_TOKEN`` or the saved login)."""
    if not args.push_to_hub:
        return None
    from huggingface_hub import get_token

    token = args.token or get_token()
    if not token:
        raise UsageError("--push-to-hub needs a Hub token: set HF_TOKEN, run 'hf auth login', or pass --token")
    return str(token)
