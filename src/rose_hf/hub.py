"""The Hub side of a pruned checkpoint: the recipe fingerprint and an idempotent push."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from rose_hf.config import CONFIG_NAME, RoseConfig
from rose_hf.version import __version__

logger = logging.getLogger(__name__)

_FINGERPRINT_CONFIG_SKIP = ("rose_hf_version", "device")
# Fields added after the first release, left out at the value that changes nothing, so a recipe
# pushed before they existed keeps its fingerprint (and CI does not re-push an unchanged model).
_FINGERPRINT_NOOP = {
    "refine": "none",
    "allocation": "uniform",
    "owl_lambda": 0.08,
    "owl_m": 5.0,
    "admm_iters": 120,
    "rotation": "none",
    "rotation_steps": 100,
    "rotation_objective": "entropy",
    "channel_permutation": False,
}


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
    recipe = {
        k: v
        for k, v in config.to_dict().items()
        if k not in _FINGERPRINT_CONFIG_SKIP and not (k in _FINGERPRINT_NOOP and _FINGERPRINT_NOOP[k] == v)
    }
    payload = json.dumps(
        {"base_model": base_model, "base_revision": base_revision, "config": recipe, "calibration": calibration_sha256},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def resolve_commit(
    repo_id: str, revision: str | None = None, *, token: str | None = None, endpoint: str | None = None
) -> str | None:
    """The commit sha the Hub resolves ``revision`` (default: main) of model ``repo_id`` to, or
    ``None`` when the Hub cannot say (offline, no such repository)."""
    try:
        return HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, timeout=10).sha
    except Exception:  # offline, unknown id, no access: the caller falls back and says so
        return None


def remote_fingerprint(
    repo_id: str, *, token: str | None = None, revision: str | None = None, endpoint: str | None = None
) -> str | None:
    """The fingerprint in ``rose_config.json`` of a Hub repository, or ``None`` when it has none.

    An unreachable Hub is an error (``ConnectionError``, after one request, no retries), never
    "no recipe there yet": that would prune for hours and then fail at the push.
    """
    if not _has_config(repo_id, token, revision, endpoint):
        return None
    with tempfile.TemporaryDirectory(prefix="rose_hf-fingerprint-") as cache:  # nothing left behind
        path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token, endpoint=endpoint, cache_dir=cache)
        try:
            value = json.loads(Path(path).read_text(encoding="utf-8")).get("fingerprint")
        except (json.JSONDecodeError, AttributeError):
            return None
    return value if isinstance(value, str) else None


def _has_config(repo_id: str, token: str | None, revision: str | None, endpoint: str | None) -> bool:
    url = hf_hub_url(repo_id, CONFIG_NAME, revision=revision, endpoint=endpoint)
    try:
        get_hf_file_metadata(url, token=token, retry_on_errors=False)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return False
    except HfHubHTTPError:
        raise
    except Exception as err:  # the transport's own errors: refused, unresolvable, timed out
        raise ConnectionError(
            f"cannot reach the Hub to read {repo_id}'s {CONFIG_NAME} ({type(err).__name__}: {err}); nothing was "
            "pruned. Check the network and HF_ENDPOINT, or drop --push-to-hub and push later."
        ) from None
    return True


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
        raise FileNotFoundError(f"{str(folder)!r} has no {CONFIG_NAME}; save it with rose_hf.output.save_pruned first.")
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


def download_config(
    repo_id: str, *, revision: str | None = None, token: str | None = None, endpoint: str | None = None
) -> Path:
    """Fetch ``rose_config.json`` of Hub repository ``repo_id`` (into the Hub cache); its local path.

    One request first, so offline or for a repository without one the error comes at once.
    """
    if not _has_config(repo_id, token, revision, endpoint):
        raise FileNotFoundError(
            f"the Hub repository {repo_id!r} has no {CONFIG_NAME} (or does not exist, or needs a token); pass a "
            "pruned model or recipe repository, or a local folder."
        )
    return Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token, endpoint=endpoint))


def push_config(
    config: RoseConfig,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``config`` alone as ``rose_config.json`` to ``repo_id`` (created if needed): a shared
    recipe that ``RoseConfig.from_pretrained`` and ``rose-hf prune --recipe`` read. Returns the
    commit URL. A repository that holds a pruned model keeps its provenance: pushing is refused.
    """
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if remote_fingerprint(repo_id, token=token, revision=revision, endpoint=endpoint) is not None:
        raise FileExistsError(
            f"{repo_id!r} holds a pruned model whose {CONFIG_NAME} records how it was made; pushing a bare recipe "
            "would replace that record. Push the recipe to a repository of its own."
        )
    info = api.upload_file(
        path_or_fileobj=config.to_json_string().encode("utf-8"),
        path_in_repo=CONFIG_NAME,
        repo_id=repo_id,
        revision=revision,
        commit_message=commit_message or f"Upload rose_hf recipe ({config.method}, {config.pattern})",
    )
    return str(info.commit_url)
