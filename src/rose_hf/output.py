"""Write a pruned checkpoint, all or nothing, with its provenance (``rose_config.json``) and card.

On disk (see docs/format.md): what ``save_pretrained`` writes (safetensors, sharded as transformers
does; no ``quantization_config`` or ``sparsity_config`` in ``config.json``), ``rose_config.json``
(the recipe and where the model came from) and ``README.md`` (the model card). ``record_for`` is
the one place a provenance record is built, for the CLI, the Python API and streaming alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from rose_hf.card import model_card
from rose_hf.config import CONFIG_NAME, RoseConfig
from rose_hf.errors import LAYER_NOT_SAVED, RotationError
from rose_hf.hub import fingerprint
from rose_hf.report import PruneReport
from rose_hf.runtime import warn_caller
from rose_hf.version import __version__

# Keys that make vLLM / transformers treat a plain sparse checkpoint as a compressed one.
FORBIDDEN_CONFIG_KEYS = ("quantization_config", "sparsity_config", "compression_config")
# The key of ``config.json`` that carries the recipe and fingerprint: a name no loader reads
# (transformers keeps unknown keys as plain attributes; vLLM reads only the keys above).
CONFIG_KEY = "rose_hf"


def local_revision(folder: str | Path) -> str | None:
    """A content hash standing in for a Hub revision when the base model is a local folder.

    sha256 over ``config.json`` and every weight file (``*.safetensors``, ``*.bin``), streamed, so a
    changed checkpoint never looks like the one already pushed. ``None`` when ``folder`` is not a
    local folder. The hash is kept for the process while no file's size or modification time
    changes, so ``prune()`` and the save after it read the weights once.
    """
    path = Path(folder)
    if not path.is_dir():
        return None
    files = [*sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]), path / "config.json"]
    stamp = tuple((str(f.absolute()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    return _content_hash(stamp)


@functools.lru_cache(maxsize=8)
def _content_hash(stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        file = Path(name)
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def base_revision(
    base_model: str | None,
    *,
    folder: str | Path | None = None,
    revision: str | None = None,
    model_config: Any = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> str | None:
    """The one rule for which revision of the base a pruned model came from.

    A local folder holding the weights (``folder``, such as a downloaded snapshot, or the base
    itself when it is a folder) is identified by its content hash (``local_revision``); otherwise
    the commit transformers resolved (``model_config._commit_hash``, which transformers 5 no longer
    sets), else the commit the Hub resolves ``revision`` (default: main) of ``base_model`` to, else
    the ``revision`` asked for, with a warning: a branch name does not change when the branch gets
    new weights, so an idempotent CI push would then miss a new base release.
    """
    local = folder if folder is not None else base_model
    if local is not None and Path(local).is_dir():
        return local_revision(local)
    commit = getattr(model_config, "_commit_hash", None)
    if commit or not base_model:
        return commit or revision
    from rose_hf.hub import resolve_commit

    resolved = resolve_commit(base_model, revision, token=token, endpoint=endpoint)
    if resolved is None:
        warn_caller(
            f"could not resolve {base_model!r} at revision {revision or 'main'!r} to a commit on the Hub; the "
            "provenance records the revision name instead, so a new release on that branch looks unchanged."
        )
    return resolved or revision


def provenance(
    config: RoseConfig,
    report: PruneReport,
    *,
    base_model: str | None,
    base_revision: str | None,
    calibration: dict[str, Any],
    perplexity: dict[str, Any] | None = None,
    zero_shot: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``rose_config.json``: recipe, versions, origin, calibration and results.

    ``calibration`` should hold ``source``, ``nsamples``, ``seqlen``, ``seed`` and ``sha256``. An
    unset ``rotation`` (the default recipe's rule) is recorded as the one that ran, from ``report``.
    """
    if config.rotation is None:
        config = dataclasses.replace(config, rotation=report.config.get("rotation") or "none")
    return {
        "format_version": 1,
        "config": config.to_dict(),
        "fingerprint": fingerprint(base_model, base_revision, config, str(calibration.get("sha256"))),
        "base_model": base_model,
        "base_revision": base_revision,
        "calibration": calibration,
        "versions": {
            "rose_hf": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "result": {
            "overall_sparsity": report.overall_sparsity,
            "reordered_modules": report.reordered_count,
            "untied_parameters": report.untied_parameters,
            "permuted_modules": len(report.permutation_costs),
            "seconds": report.seconds,
            "perplexity": perplexity,
            "zero_shot": zero_shot,  # rose_hf.zero_shot's result
            "modules": {
                m.name: {
                    "sparsity": m.sparsity,
                    "relative_error": m.relative_error,
                    "reordered": m.reordered,
                    "method": m.method,
                }
                for m in report.modules
            },
        },
    }


def record_for(
    config: RoseConfig,
    report: PruneReport,
    calibration: dict[str, Any],
    *,
    base_model: str | None,
    folder: str | Path | None = None,
    revision: str | None = None,
    model_config: Any = None,
    perplexity: dict[str, Any] | None = None,
    zero_shot: dict[str, Any] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """``provenance`` with the base revision found by ``base_revision``: every output path uses this."""
    resolved = base_revision(
        base_model, folder=folder, revision=revision, model_config=model_config, token=token, endpoint=endpoint
    )
    return provenance(
        config,
        report,
        base_model=base_model,
        base_revision=resolved,
        calibration=calibration,
        perplexity=perplexity,
        zero_shot=zero_shot,
    )


@contextlib.contextmanager
def without_compression_keys(model_config: Any) -> Iterator[None]:
    """Inside, ``model_config`` lacks ``FORBIDDEN_CONFIG_KEYS``; they are put back after."""
    removed = {k: getattr(model_config, k) for k in FORBIDDEN_CONFIG_KEYS if hasattr(model_config, k)}
    try:
        for key in removed:
            delattr(model_config, key)
        yield
    finally:
        for key, value in removed.items():
            setattr(model_config, key, value)


def save_pruned(
    model: nn.Module,
    output_dir: str | Path,
    record: dict[str, Any],
    *,
    tokenizer: Any = None,
    license: str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    repo_id: str | None = None,
) -> Path:
    """Write the pruned checkpoint, ``rose_config.json`` and the model card, all or nothing.

    Everything is written into a temporary folder beside ``output_dir`` and renamed into place at
    the end, so a failure leaves no half-written output. An existing non-empty ``output_dir`` is
    an error unless ``overwrite``.
    """
    if record.get("config", {}).get("rotation") == "layer":
        raise RotationError(LAYER_NOT_SAVED)
    target = Path(output_dir)
    with without_compression_keys(getattr(model, "config", None)), staged_output(target, overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_provenance(staging, record, license, repo_id)
    return target


def copy_side_files(source: Path, staging: Path) -> None:
    """Into ``staging``: the source folder's config without compression keys, and every other file
    that is not weights or rewritten here (tokenizer, generation config, ...), as they are."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(source)
    with without_compression_keys(model_config):
        model_config.save_pretrained(staging)
    rewritten = {"config.json", "README.md", CONFIG_NAME, "model.safetensors.index.json"}
    for file in source.iterdir():
        if file.is_file() and file.suffix not in (".safetensors", ".bin", ".pt") and file.name not in rewritten:
            shutil.copy2(file, staging / file.name)


def untie_in_config(folder: Path) -> None:
    """Set ``tie_word_embeddings`` to false in ``folder``'s ``config.json`` (and its text config's),
    as ``save_pretrained`` writes it for a model whose head was untied in memory."""
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["tie_word_embeddings"] = False
    if isinstance(data.get("text_config"), dict):
        data["text_config"]["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def config_entry(record: dict[str, Any]) -> dict[str, Any]:
    """What ``config.json`` carries under ``CONFIG_KEY``: the recipe and fingerprint of ``record``
    (no per-module results), so a plain ``model.push_to_hub`` still says how the model was made."""
    return {
        "config": record["config"],
        "fingerprint": record["fingerprint"],
        "base_model": record["base_model"],
        "base_revision": record["base_revision"],
        "calibration_sha256": record["calibration"].get("sha256"),
        "overall_sparsity": record["result"]["overall_sparsity"],
        "rose_hf_version": record["versions"]["rose_hf"],
    }


def write_provenance(folder: Path, record: dict[str, Any], license: str | None, repo_id: str | None) -> None:
    """Write ``rose_config.json`` and the model card ``README.md`` into ``folder``, and the
    ``config_entry`` into its ``config.json``."""
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    model_card(record, license, repo_id).save(folder / "README.md")
    config_file = folder / "config.json"
    if config_file.is_file():
        data = json.loads(config_file.read_text(encoding="utf-8"))
        data[CONFIG_KEY] = config_entry(record)
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def staged_output(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``target`` that becomes ``target`` only on success.

    On any exception the temporary folder is removed and ``target`` is left as it was.
    """
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    report_leftovers(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def report_leftovers(target: Path) -> None:
    """Warn about staging folders that killed saves to ``target`` left behind (they are never reused)."""
    if not target.parent.is_dir():
        return
    stale = sorted(
        p.name for p in target.parent.glob(f".{target.name}.*") if p.is_dir() and not p.name.endswith(".partial")
    )
    if stale:
        warn_caller(
            f"{len(stale)} staging folders of interrupted saves to {str(target)!r} are left in "
            f"{str(target.parent)!r}: {stale[:3]}; nothing uses them, delete them to free the space."
        )


def publish(staging: Path, target: Path) -> None:
    """Make the finished ``staging`` folder ``target``, with an ordinary folder's permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 -> what mkdir (and save_pretrained) gives
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def check_output_dir(target: Path, overwrite: bool, overwrite_hint: str = "overwrite=True") -> None:
    """Raise early, with the fix, when ``target`` cannot receive a checkpoint.

    ``overwrite_hint`` names the switch that allows replacing a non-empty folder in the caller's
    terms (the CLI passes ``--overwrite``).
    """
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output {str(target)!r} is a file; pass a folder path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(target)!r} is not empty; pass {overwrite_hint} or another path.")
    parent = target.parent if not target.exists() else target
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot create {str(target)!r}: {str(parent)!r} is a file; choose another path.")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {str(parent)!r}; choose an output folder you can write.")
