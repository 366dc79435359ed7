"""Save a pruned model as an ordinary checkpoint with provenance and a model card; push it.

On disk (see docs/format.md): what ``save_pretrained`` writes (safetensors, sharded as transformers
does; no ``quantization_config`` or ``sparsity_config`` in ``config.json``), ``rose_config.json``
(the recipe and where the model came from) and ``README.md`` (the model card).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from torch import nn

from rose_hf.config import CONFIG_NAME, RoseConfig
from rose_hf.report import PruneReport
from rose_hf.version import __version__

logger = logging.getLogger(__name__)

# Keys that make vLLM / transformers treat a plain sparse checkpoint as a compressed one.
_FORBIDDEN_CONFIG_KEYS = ("quantization_config", "sparsity_config", "compression_config")
_FINGERPRINT_CONFIG_SKIP = ("rose_hf_version", "device")

CITATION = """@inproceedings{su2026rose,
  title     = {ROSE: Reordered SparseGPT for More Accurate One-Shot Large Language Models Pruning},
  author    = {Su, Mingluo and Wang, Huan},
  booktitle = {Conference on Parsimony and Learning (CPAL)},
  year      = {2026},
  note      = {arXiv:2510.06751}
}"""


@dataclass(frozen=True)
class PushResult:
    """Outcome of ``push_pruned``: the repository URL, whether it was skipped, and the commit URL."""

    repo_url: str
    skipped: bool
    commit_url: str | None = None


def fingerprint(base_model: str | None, base_revision: str | None, config: RoseConfig, calibration_sha256: str) -> str:
    """sha256 identifying a pruning recipe: base model + revision, config and calibration tokens.

    The rose_hf version and the compute device are left out: the same recipe on a newer rose_hf or
    another GPU is the same model for an idempotent CI push.
    """
    recipe = {k: v for k, v in config.to_dict().items() if k not in _FINGERPRINT_CONFIG_SKIP}
    payload = json.dumps(
        {"base_model": base_model, "base_revision": base_revision, "config": recipe, "calibration": calibration_sha256},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def local_revision(folder: str | Path) -> str | None:
    """A content hash standing in for a Hub revision when the base model is a local folder.

    sha256 over ``config.json`` and every weight file (``*.safetensors``, ``*.bin``), streamed, so a
    changed checkpoint never looks like the one already pushed. ``None`` when ``folder`` is not a
    local folder.
    """
    path = Path(folder)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    files = [*sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]), path / "config.json"]
    for file in files:
        if not file.is_file():
            continue
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def provenance(
    config: RoseConfig,
    report: PruneReport,
    *,
    base_model: str | None,
    base_revision: str | None,
    calibration: dict[str, Any],
    perplexity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``rose_config.json``: recipe, versions, origin, calibration and results.

    ``calibration`` should hold ``source``, ``nsamples``, ``seqlen``, ``seed`` and ``sha256``.
    """
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
            "seconds": report.seconds,
            "perplexity": perplexity,
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


def model_card(record: dict[str, Any], license: str | None = None, repo_id: str | None = None) -> ModelCard:
    """A model card (``README.md``) for a pruned model from its ``rose_config.json`` record.

    ``repo_id`` is the name users load it by (the Hub repository, or a local folder).
    """
    config = record["config"]
    base = record.get("base_model")
    result = record["result"]
    pattern = config["pattern"]
    tags = ["pruned", "sparse", "rose", pattern.replace(":", "-") if pattern != "unstructured" else "unstructured"]
    data = ModelCardData(
        base_model=base if base and not Path(str(base)).exists() else None,
        library_name="transformers",
        tags=tags,
        license=license,
        pipeline_tag="text-generation",
    )
    calibration = record.get("calibration", {})
    ppl = result.get("perplexity")
    gate = f"{config['reorder']}, threshold {config['reorder_threshold']} ({result['reordered_modules']} reordered)"
    calib = (
        f"{calibration.get('source')}, {calibration.get('nsamples')} × {calibration.get('seqlen')} tokens, "
        f"seed {calibration.get('seed')}"
    )
    ppl_line = f"| perplexity ({ppl['dataset']}, seqlen {ppl['seqlen']}) | {ppl['value']:.2f} |\n" if ppl else ""
    load_name = repo_id or "path/to/this/folder"
    body = f"""
# {Path(str(base)).name if base else "Model"} pruned with ROSE

This is {f"`{base}`" if base else "a model"} made {result["overall_sparsity"]:.1%} sparse
({pattern}) in one shot with rose_hf using
**{config["method"]}**. It is an ordinary dense-layout `transformers` checkpoint whose pruned weights
are exact zeros: it loads and runs anywhere the base model does, with no extra package.

| recipe | value |
|---|---|
| method | {config["method"]} |
| pattern | {pattern} |
| sparsity (requested / achieved) | {config["sparsity"]:.2f} / {result["overall_sparsity"]:.4f} |
| blocksize, percdamp | {config["blocksize"]}, {config["percdamp"]} |
| ROSE gate | {gate} |
| calibration | {calib} |
{ppl_line}
Per-module sparsity and the full recipe are in `rose_config.json`.

## How to load

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{load_name}")
```

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def base_license(base_model: str | None) -> str | None:
    """The base model's license from its local model card, when it has one."""
    if not base_model:
        return None
    card = Path(base_model) / "README.md"
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # a malformed card must not stop a save; the license is only informative
        return None


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
    target = Path(output_dir)
    config = getattr(model, "config", None)
    removed = {k: getattr(config, k) for k in _FORBIDDEN_CONFIG_KEYS if config is not None and hasattr(config, k)}
    try:
        for key in removed:
            delattr(config, key)
        with staged_output(target, overwrite) as staging:
            model.save_pretrained(staging, max_shard_size=max_shard_size)  # type: ignore[operator]
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            write_provenance(staging, record, license, repo_id)
    finally:
        for key, value in removed.items():
            setattr(config, key, value)
    return target


def write_provenance(folder: Path, record: dict[str, Any], license: str | None, repo_id: str | None) -> None:
    """Write ``rose_config.json`` and the model card ``README.md`` into ``folder``."""
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    model_card(record, license, repo_id).save(folder / "README.md")


@contextlib.contextmanager
def staged_output(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``target`` that becomes ``target`` only on success.

    On any exception the temporary folder is removed and ``target`` is left as it was.
    """
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_output_dir(target: Path, overwrite: bool) -> None:
    """Raise early, with the fix, when ``target`` cannot receive a checkpoint."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output {str(target)!r} is a file; pass a folder path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {str(target)!r} is not empty; pass overwrite=True (--overwrite) or another path."
        )
    parent = target.parent if not target.exists() else target
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot create {str(target)!r}: {str(parent)!r} is a file; choose another path.")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {str(parent)!r}; choose an output folder you can write.")


def remote_fingerprint(
    repo_id: str, *, token: str | None = None, revision: str | None = None, endpoint: str | None = None
) -> str | None:
    """The fingerprint in ``rose_config.json`` of a Hub repository, or ``None`` when it has none."""
    try:
        path = hf_hub_download(
            repo_id, CONFIG_NAME, revision=revision, token=token, endpoint=endpoint, cache_dir=tempfile.mkdtemp()
        )
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8")).get("fingerprint")
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def push_pruned(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Upload a folder written by ``save_pruned`` to ``repo_id``; skip when already there.

    The repository is created if needed (``exist_ok``). If it already holds a ``rose_config.json``
    with the same fingerprint (base model revision + recipe + calibration tokens), nothing is
    uploaded and ``PushResult.skipped`` is True: CI jobs can run this on every trigger.
    """
    folder = Path(folder)
    record_path = folder / CONFIG_NAME
    if not record_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {CONFIG_NAME}; save it with rose_hf.hub.save_pruned first.")
    local = json.loads(record_path.read_text(encoding="utf-8")).get("fingerprint")
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = str(api.create_repo(repo_id, private=private, exist_ok=True))
    if local and remote_fingerprint(repo_id, token=token, revision=revision, endpoint=endpoint) == local:
        logger.info("%s already holds this recipe (fingerprint %s); skipped", repo_id, local[:12])
        return PushResult(repo_url, skipped=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or f"Upload model pruned with rose_hf {__version__}",
        revision=revision,
        create_pr=create_pr,
    )
    return PushResult(repo_url, skipped=False, commit_url=str(info.commit_url))
