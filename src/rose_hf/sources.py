"""Where calibration and evaluation text comes from: local files, ``save_to_disk`` folders, Hub
datasets and the named presets, all read through ``datasets`` (``load_dataset`` / ``load_from_disk``).

A source is one string, resolved in this order:

1. an existing ``.txt`` file: used as it is;
2. an existing ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file: records, read by the
   ``datasets`` builder of that format (never as raw text), text from ``column``;
3. an existing folder written by ``Dataset.save_to_disk`` (or ``DatasetDict``: ``split`` picks);
4. a named preset, ``"wikitext2"`` or ``"c4"``: a thin alias for its Hub dataset, config and files;
5. any other Hub dataset id (``org/name``), with an optional ``config`` and ``split``, streamed.

Hub sources are checked with one request first, so offline or with a wrong id the error comes at
once (``datasets`` itself retries for about 25 s) and names the local alternative.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_OFFLINE_HINT = "offline, pass a local .txt/.jsonl/.parquet/.csv file or a folder saved with save_to_disk"


@dataclass(frozen=True)
class Preset:
    """A named source: the ``load_dataset`` arguments behind it."""

    repo_id: str
    config: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # split -> data file, where only some are read


# The SparseGPT and ROSE papers sample C4 from the first shard of each split.
PRESETS = {
    "wikitext2": Preset("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "c4": Preset(
        "allenai/c4",
        files={"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
}
NAMED_SOURCES = tuple(PRESETS)
# The Hub dataset behind each named source (the model card's ``datasets:``).
HUB_DATASETS = {name: preset.repo_id for name, preset in PRESETS.items()}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError("calibration files and datasets need the 'datasets' package: pip install datasets") from None
    return datasets


def is_hub_id(source: str) -> bool:
    """Whether ``source`` names a Hub dataset rather than a local path (``org/name``, not on disk)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(source).exists() or Path(source).suffix in (".txt", *_BUILDERS) or source.count("/") != 1:
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def load_records(
    source: str,
    split: str | None = None,
    config: str | None = None,
    column: str = "text",
    max_records: int = 5000,
) -> list[Any]:
    """The ``column`` values of the first ``max_records`` records of ``source`` (see the module doc).

    A ``.txt`` file gives one record, its whole text. Local files and folders are read whole;
    Hub datasets are streamed, so only ``max_records`` records are fetched.
    """
    path = Path(source)
    if path.is_file() and path.suffix not in _BUILDERS:
        return [_read_txt(path)]
    if path.is_file() or path.is_dir():
        records = open_local(path, split)
    elif source in PRESETS or is_hub_id(source):
        records = _hub(source, split, config)
    else:
        raise FileNotFoundError(
            f"calibration source {source!r} is not a file or folder, a Hub dataset id (org/name), or one of "
            f"{list(NAMED_SOURCES)}; pass an existing .txt/.jsonl/.json/.parquet/.csv file, a save_to_disk "
            "folder, or a dataset id."
        )
    names = list(records.column_names or [])
    if column not in names:
        raise ValueError(
            f"{source!r} has columns {names}, none named {column!r}; name the text column with --calib-column "
            "(column= in rose_hf.sources)."
        )
    return [row[column] for _, row in zip(range(max_records), records)]


def load_text(
    source: str,
    split: str | None = None,
    config: str | None = None,
    column: str = "text",
    max_documents: int = 5000,
) -> str:
    """Raw text of ``source``: its records' ``column`` joined with blank lines (see ``load_records``)."""
    values = load_records(source, split, config, column, max_documents)
    if not all(isinstance(v, str) or v is None for v in values):
        raise ValueError(
            f"column {column!r} of {source!r} does not hold text; name the text column with --calib-column "
            "(or pass --calib-chat for a column of chat messages)."
        )
    return "\n\n".join(v for v in values if v)


def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); convert it, e.g. iconv -t UTF-8."
        ) from None


def open_local(path: Path, split: str | None = None) -> Any:
    """A local file of records or ``save_to_disk`` folder as a ``datasets.Dataset`` (``split`` of a
    ``DatasetDict``: ``train`` by default, else its first)."""
    datasets = _datasets()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ValueError(
                f"{str(path)!r} is a folder but not one written by Dataset.save_to_disk; pass that, or a file."
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            split = split or ("train" if "train" in loaded else next(iter(loaded)))
            if split not in loaded:
                raise ValueError(
                    f"{str(path)!r} has splits {sorted(loaded)}, not {split!r}; pick one with --calib-split"
                )
            return loaded[split]
        return loaded
    builder = _BUILDERS[path.suffix]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # the builder's own parse errors
        hint = "one JSON object per line" if path.suffix == ".jsonl" else f"{builder} records"
        raise ValueError(f"{str(path)!r} could not be read as {hint}: {err}") from None


def _hub(source: str, split: str | None, config: str | None) -> Any:
    preset = PRESETS.get(source)
    repo_id = preset.repo_id if preset else source
    split = split or "train"
    config = config or (preset.config if preset else None)
    files = None
    if preset and preset.files:
        if split not in preset.files:
            raise ValueError(f"split={split!r} is not a {source} split; use one of {sorted(preset.files)}.")
        files = {split: preset.files[split]}
    _check_reachable(repo_id)
    datasets = _datasets()
    try:
        return datasets.load_dataset(repo_id, config, data_files=files, split=split, streaming=True)
    except (ConnectionError, OSError) as err:
        raise ConnectionError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({err}); {_OFFLINE_HINT}."
        ) from None
    except ValueError as err:  # a wrong config or split: datasets names the ones there are
        raise ValueError(f"{repo_id!r}: {err} (pick them with --calib-config / --calib-split)") from None


def _check_reachable(repo_id: str) -> None:
    """One request to the Hub, so that offline the error comes now and not after datasets' retries."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return  # offline mode on purpose: datasets reads its cache
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(repo_id, timeout=10)
    except GatedRepoError:
        return  # datasets reports it with the token advice
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local file or folder nor a dataset on the Hugging Face Hub; check the "
            "id or the path."
        ) from None
    except Exception as err:  # no network, DNS, proxy, timeout
        raise ConnectionError(
            f"could not reach the Hugging Face Hub for dataset {repo_id!r} ({type(err).__name__}: {err}); "
            f"{_OFFLINE_HINT}."
        ) from None
