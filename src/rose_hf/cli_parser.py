"""The ``rose-hf`` argument parser. The recipe flags are generated from ``RoseConfig``'s fields
(name, default, choices and help kept beside each field), so the CLI and the Python API cannot
drift apart. Imports nothing heavy: ``rose-hf --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, NoReturn

from rose_hf.config import ConfigError, RoseConfig
from rose_hf.version import __version__

DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(Exception):
    """Bad flags or values: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def flag_of(field: dataclasses.Field[Any]) -> str:
    """The CLI flag of a ``RoseConfig`` field (``reorder_threshold`` -> ``--reorder-threshold``)."""
    return str(field.metadata.get("flag") or "--" + field.name.replace("_", "-"))


def _kind(field: dataclasses.Field[Any]) -> str:
    annotation = str(field.type)
    for kind in ("list", "bool", "int", "float"):
        if annotation.startswith(kind):
            return kind
    return "str"


def add_recipe_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per ``RoseConfig`` field; unset flags leave the field at its default."""
    for field in dataclasses.fields(RoseConfig):
        default = None if field.default is dataclasses.MISSING else field.default
        help_text = str(field.metadata.get("help", ""))
        kind = _kind(field)
        if kind == "bool":
            group.add_argument(flag_of(field), dest=field.name, action="store_true", default=None, help=help_text)
            continue
        shown = f"default: {default}" if default is not None and kind != "list" else ""
        options: dict[str, Any] = {
            "dest": field.name,
            "default": None,
            "help": "; ".join(filter(None, [help_text, shown])),
        }
        if kind == "list":
            options["action"] = "append"
            options["metavar"] = "REGEX"
        else:
            options["type"] = {"int": int, "float": float}.get(kind, str)
        if "choices" in field.metadata:
            options["choices"] = field.metadata["choices"]
        group.add_argument(flag_of(field), **options)


def config_from(args: argparse.Namespace, recipe: RoseConfig | None = None) -> RoseConfig:
    """The ``RoseConfig`` the recipe flags describe, over ``recipe`` (``--recipe``) where one is
    given, else over the defaults; a config error names its flag."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RoseConfig) if getattr(args, f.name) is not None}
    start = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(RoseConfig)} if recipe else {}
    try:
        return RoseConfig(**{**start, **given})
    except ConfigError as err:
        flag = next(flag_of(f) for f in dataclasses.fields(RoseConfig) if f.name == err.field)
        raise UsageError(f"{flag}: {err}") from None


def build_parser() -> argparse.ArgumentParser:
    """The whole ``rose-hf`` parser: ``prune``, ``eval``, ``inspect``."""
    parser = _Parser(prog="rose-hf", description="One-shot ROSE / SparseGPT pruning for Hugging Face models.")
    add_commands(parser)
    return parser


def add_commands(parser: argparse.ArgumentParser, parser_class: type[argparse.ArgumentParser] = _Parser) -> None:
    """Add ``--version``, ``-v`` and the ``prune`` / ``eval`` / ``inspect`` commands to ``parser``
    (``rose-hf`` itself, or the ``rose`` command of ``optimum-cli``, whose sub-parsers report bad
    flags the argparse way, as optimum parses before rose_hf runs)."""
    parser.add_argument("--version", action="version", version=f"rose_hf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)
    _add_prune(sub.add_parser("prune", help="prune a model to a new folder (and optionally push it)"))

    evaluate = sub.add_parser("eval", help="perplexity and zero-shot tasks (lm-evaluation-harness) of a model")
    evaluate.add_argument("model", help="Hub model id or local folder")
    evaluate.add_argument(
        "--dataset",
        help="perplexity on: wikitext2 | c4 | a Hub dataset id | a .txt/.jsonl/.parquet/.csv file "
        "(default wikitext2, or none when --tasks is given)",
    )
    evaluate.add_argument("--split", default="test", help="split of a dataset (C4: validation)")
    evaluate.add_argument("--seqlen", type=int, default=2048)
    evaluate.add_argument("--windows", type=int, help="evaluate at most this many windows")
    evaluate.add_argument("--dtype", default="auto", help=" | ".join(DTYPES))
    evaluate.add_argument("--device", help="default: cuda when available")
    _add_tasks(evaluate, "--tasks")
    evaluate.add_argument(
        "--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's, 0 for most)"
    )
    evaluate.add_argument(
        "--update-card",
        action="store_true",
        help="write the results into the model-index of the folder's README.md (a local folder only)",
    )
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of text")

    inspect = sub.add_parser("inspect", help="per-module sparsity and N:M validity of a checkpoint folder")
    inspect.add_argument("path", type=Path, help="a folder with config.json and *.safetensors")
    inspect.add_argument("--pattern", help="check this N:M pattern (default: the one in rose_config.json)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")


def task_list(text: str) -> list[str]:
    """``"arc_easy, hellaswag"`` -> ``["arc_easy", "hellaswag"]`` (argparse type of the task flags)."""
    tasks = [task.strip() for task in text.split(",") if task.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("name at least one task, e.g. arc_easy,hellaswag")
    return tasks


def _add_tasks(group: Any, flag: str) -> None:
    group.add_argument(
        flag,
        type=task_list,
        help="lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,hellaswag; needs rose_hf[eval])",
    )
    group.add_argument("--tasks-path", type=Path, help="a folder of extra task YAML files for the harness")
    group.add_argument(
        "--limit" if flag == "--tasks" else "--eval-limit",
        type=int,
        help="at most this many documents per task (a quick check, not a score to report)",
    )


def _add_prune(prune: argparse.ArgumentParser) -> None:
    prune.add_argument("model", help="Hub model id or local folder")
    prune.add_argument("-o", "--output", required=True, type=Path, help="folder for the pruned checkpoint")
    recipe = prune.add_argument_group("recipe (RoseConfig)")
    recipe.add_argument(
        "--recipe",
        help="start from this rose_config.json: a file, a pruned folder, or a Hub id (org/model-rose-60); "
        "recipe flags given as well override its values",
    )
    add_recipe_flags(recipe)
    calib = prune.add_argument_group("calibration")
    calib.add_argument(
        "--calib",
        default="c4",
        help="c4 | wikitext2 | a Hub dataset id (org/name) | a .txt file | a .jsonl/.json/.parquet/.csv file of "
        "records | a save_to_disk folder (of text, or of token ids used as they are)",
    )
    calib.add_argument("--calib-config", help="configuration (subset) of a Hub dataset")
    calib.add_argument("--calib-split", help="split of a dataset (default train)")
    calib.add_argument("--calib-column", help="the column holding the text (default: text; messages with --calib-chat)")
    calib.add_argument(
        "--calib-chat",
        action="store_true",
        help="the column holds conversations ([{role, content}, ...]): render each with the tokenizer's chat template",
    )
    calib.add_argument("--nsamples", type=int, default=128)
    calib.add_argument("--seqlen", type=int, default=2048)
    load = prune.add_argument_group("loading and saving")
    load.add_argument("--revision", help="base model revision (branch, tag or commit)")
    load.add_argument("--dtype", default="auto", help=" | ".join(DTYPES))
    load.add_argument("--max-shard-size", default="5GB")
    load.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    load.add_argument(
        "--stream",
        action="store_true",
        help="read one block at a time from the safetensors shards and write as it goes (models larger than RAM)",
    )
    load.add_argument(
        "--activations",
        choices=("disk", "memory"),
        help="where calibration activations wait between blocks (default: disk with --stream, else memory)",
    )
    load.add_argument(
        "--mmap-threshold",
        type=int,
        default=1 << 20,
        help="with --stream: fix glibc's mmap threshold at this many bytes so freed memory returns to the OS "
        "at once (default 1 MiB; 0 leaves glibc's own)",
    )
    load.add_argument("--eval", dest="eval_source", help="measure perplexity after pruning on this source")
    load.add_argument("--eval-windows", type=int, help="evaluate at most this many windows")
    _add_tasks(load, "--eval-tasks")
    load.add_argument("--report", type=Path, help="also write the per-module report as JSON here")
    hub = prune.add_argument_group("Hub")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result to this Hub repository")
    hub.add_argument("--private", action="store_true")
    hub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    hub.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    prune.add_argument("--no-progress", action="store_true")
