"""``rose-hf``: prune, evaluate and inspect checkpoints from the command line (and from CI jobs).

Exit codes: 0 success (including a push skipped because the Hub already has the same recipe),
1 a failure while running (model not found, Hub error, ...), 2 bad usage (flags, values, paths).
Errors print one line, ``rose-hf: error: ...``, naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rose_hf.cli_checks import (
    check_model,
    check_prune_usage,
    check_source,
    check_tasks,
    dtype_of,
    hub_token,
    positive,
)
from rose_hf.cli_parser import UsageError, build_parser, config_from
from rose_hf.errors import LAYER_NOT_SAVED, PreflightError

if TYPE_CHECKING:
    from rose_hf.config import RoseConfig

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rose-hf`` console script; returns the exit code.

    SIGTERM (a cancelled CI job) is handled like Ctrl-C: nothing half-written is left as output,
    and a streamed run keeps its finished blocks for the same command to resume.
    """
    return _guarded(lambda: build_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run a command already parsed by a parser ``cli_parser.add_commands`` filled (``optimum-cli rose``)."""
    return _guarded(lambda: args)


def _guarded(parse: Callable[[], argparse.Namespace]) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _run(parse)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run(parse: Callable[[], argparse.Namespace]) -> int:
    try:
        args = parse()
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        handler = {"prune": _prune, "eval": _eval, "inspect": _inspect}[args.command]
        return handler(args)
    except UsageError as err:
        _fail(str(err))
        return EXIT_USAGE
    except PreflightError as err:  # the model, the data and the recipe do not fit: nothing was changed
        _fail(str(err).replace(":\n- ", ": ").replace("\n- ", "; ").replace("\n", " "))
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        _fail(" ".join(["interrupted;", *getattr(err, "__notes__", ["no output was written."])]))
        return EXIT_FAILURE
    except Exception as err:  # one line for CI logs; -v shows the traceback
        if logging.getLogger().isEnabledFor(logging.INFO):
            logging.exception("rose-hf failed")
        _fail(" ".join([f"{type(err).__name__}: {err}", *getattr(err, "__notes__", [])]).replace("\n", " "))
        return EXIT_FAILURE


def _fail(message: str) -> None:
    print(f"rose-hf: error: {message}", file=sys.stderr)


def _load(model_id: str, revision: str | None, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, dtype=dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"cannot load model {model_id!r}: {first}") from None
    return model, tokenizer


def _prune(args: argparse.Namespace) -> int:
    dtype = check_prune_usage(args)
    token = hub_token(args)
    config = config_from(args, _recipe(args))
    if config.rotation == "layer":
        raise UsageError(LAYER_NOT_SAVED)
    if args.stream:
        return _prune_streaming(args, config, token)
    from rose_hf import output
    from rose_hf.pruner import RosePruner
    from rose_hf.rotating import resolve_rotation

    model, tokenizer = _load(args.model, args.revision, dtype)
    config = resolve_rotation(config, model)  # before the fingerprint: the recipe that will run
    batches, calibration = _calibration(args, tokenizer, config.seed)
    base_revision = output.base_revision(args.model, revision=args.revision, model_config=model.config, token=token)
    if _up_to_date(args, token, base_revision, config, calibration):
        return EXIT_OK
    pruner = RosePruner(model, config, activations=args.activations or "memory")
    report = pruner.prune(batches, progress=not args.no_progress)
    perplexity = None
    if args.eval_source:
        perplexity = _measure(model, tokenizer, args.eval_source, "test", args.seqlen, args.eval_windows)
    zero_shot = _zero_shot(model, tokenizer, args.eval_tasks, args.tasks_path, args.eval_limit, None)
    pruner.save_pretrained(
        args.output,
        tokenizer=tokenizer,
        base_model=args.model,
        revision=args.revision,
        calibration=calibration,
        perplexity=perplexity,
        zero_shot=zero_shot,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        repo_id=args.push_to_hub,
        token=token,
    )
    if perplexity:
        print(f"perplexity on {perplexity['dataset']}: {perplexity['value']:.3f}")
    _print_zero_shot(zero_shot)
    return _finish(args, report, token, "saved")


def _finish(args: argparse.Namespace, report: Any, token: str | None, verb: str) -> int:
    """What both prune paths do last: the JSON report, one summary line, the push."""
    if args.report:
        args.report.write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True), encoding="utf-8")
    print(f"{report.summary()}; {verb} to {args.output}")
    if args.push_to_hub:
        from rose_hf import hub

        result = hub.push_pruned(
            args.output, args.push_to_hub, token=token, private=args.private, create_pr=args.create_pr
        )
        print(("skipped push to " if result.skipped else "pushed to ") + result.repo_url)
    return EXIT_OK


def _recipe(args: argparse.Namespace) -> RoseConfig | None:
    if not args.recipe:
        return None
    from rose_hf.config import RoseConfig

    try:
        return RoseConfig.from_pretrained(args.recipe, token=args.token)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--recipe {args.recipe!r}: {err}") from None


def _calibration(args: argparse.Namespace, tokenizer: Any, seed: int) -> tuple[list[Any], dict[str, Any]]:
    from rose_hf.data import calibration_batches
    from rose_hf.data import fingerprint as calibration_sha256

    column = args.calib_column or ("messages" if args.calib_chat else "text")
    batches = calibration_batches(
        tokenizer,
        args.calib,
        args.nsamples,
        args.seqlen,
        seed,
        split=args.calib_split,
        column=column,
        config=args.calib_config,
        chat=args.calib_chat,
    )
    calibration = {
        "source": args.calib,
        "config": args.calib_config,
        "split": args.calib_split,
        "column": column,
        "chat": args.calib_chat,
        "nsamples": len(batches),
        "seqlen": args.seqlen,
        "seed": seed,
        "sha256": calibration_sha256(batches),
    }
    return batches, calibration


def _up_to_date(
    args: argparse.Namespace, token: str | None, base_revision: str | None, config: Any, calibration: dict[str, Any]
) -> bool:
    """Whether the push target already holds this recipe (then nothing is pruned or written)."""
    if not args.push_to_hub:
        return False
    from rose_hf import hub

    wanted = hub.fingerprint(args.model, base_revision, config, calibration["sha256"])
    if hub.remote_fingerprint(args.push_to_hub, token=token) != wanted:
        return False
    print(f"{args.push_to_hub} already holds this recipe (fingerprint {wanted[:12]}); nothing to do.")
    return True


def _prune_streaming(args: argparse.Namespace, config: Any, token: str | None) -> int:
    from transformers import AutoTokenizer

    from rose_hf import output
    from rose_hf.modeling import empty_model
    from rose_hf.rotating import resolve_rotation
    from rose_hf.streaming import prune_checkpoint

    source = Path(args.model)
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(args.model, revision=args.revision, token=token))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"cannot load the tokenizer of {args.model!r}: {str(err).splitlines()[0]}") from None
    batches, calibration = _calibration(args, tokenizer, config.seed)
    del tokenizer  # only the token ids are needed from here on
    config = resolve_rotation(config, empty_model(source))  # before the fingerprint: the recipe that will run
    if _up_to_date(args, token, output.base_revision(args.model, folder=source), config, calibration):
        return EXIT_OK
    report = prune_checkpoint(
        source,
        args.output,
        config,
        batches,
        base_model=args.model,
        calibration=calibration,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        repo_id=args.push_to_hub,
        activations=args.activations or "disk",
        mmap_threshold=args.mmap_threshold or None,
        max_shard_size=args.max_shard_size,
    )
    return _finish(args, report, token, "streamed")


def _measure(model: Any, tokenizer: Any, source: str, split: str, seqlen: int, windows: int | None) -> dict[str, Any]:
    import torch

    from rose_hf.eval import bos_token_for, perplexity, perplexity_windows
    from rose_hf.sources import load_text

    text = load_text(source, split)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    chunks = perplexity_windows(ids, seqlen, bos_token_for(tokenizer))
    if windows is not None:
        chunks = chunks[:windows]
    return {"dataset": source, "seqlen": seqlen, "windows": int(chunks.shape[0]), "value": perplexity(model, chunks)}


def _eval(args: argparse.Namespace) -> int:
    positive("--seqlen", args.seqlen)
    positive("--windows", args.windows)
    positive("--limit", args.limit)
    check_model(args.model)
    dataset = args.dataset or (None if args.tasks else "wikitext2")
    if dataset:
        check_source("--dataset", dataset)
    check_tasks(args.tasks, args.tasks_path, "--tasks")
    if args.update_card and not Path(args.model).is_dir():
        raise UsageError(f"--update-card writes into a local folder's README.md; {args.model!r} is not a folder")
    model, tokenizer = _load(args.model, None, dtype_of(args.dtype))
    if args.device:
        model.to(args.device)
    result: dict[str, Any] = {}
    if dataset:
        result["perplexity"] = _measure(model, tokenizer, dataset, args.split, args.seqlen, args.windows)
    result["zero_shot"] = _zero_shot(model, tokenizer, args.tasks, args.tasks_path, args.limit, args.num_fewshot)
    if args.update_card:
        from rose_hf import card

        entries = card.eval_results(result.get("perplexity"), result["zero_shot"])
        result["card"] = str(card.add_eval_results(args.model, entries))
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return EXIT_OK
    if "perplexity" in result:
        ppl = result["perplexity"]
        print(f"perplexity {ppl['value']:.3f} on {dataset} ({ppl['windows']} windows of {args.seqlen})")
    _print_zero_shot(result["zero_shot"])
    if args.update_card:
        print(f"results written to the model-index of {result['card']}")
    return EXIT_OK


def _zero_shot(
    model: Any, tokenizer: Any, tasks: list[str] | None, path: Path | None, limit: int | None, shots: int | None
) -> dict[str, Any] | None:
    if not tasks:
        return None
    from rose_hf.zero_shot import zero_shot

    return zero_shot(model, tokenizer, tasks, tasks_path=path, limit=limit, num_fewshot=shots)


def _print_zero_shot(result: dict[str, Any] | None) -> None:
    for task, scores in (result or {}).get("tasks", {}).items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in scores["metrics"].items())
        print(f"{task}: {shown}")


def _inspect(args: argparse.Namespace) -> int:
    from rose_hf.eval import inspect_checkpoint

    if not (args.path / "config.json").is_file():
        raise UsageError(f"{str(args.path)!r} has no config.json; pass a checkpoint folder")
    result = inspect_checkpoint(args.path, args.pattern)
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return EXIT_OK
    pattern = result["pattern"]
    print(f"{'module':60} {'shape':>14} {'sparsity':>9}" + (f" {pattern:>6}" if pattern else ""))
    for name, entry in result["modules"].items():
        valid = f" {'ok' if entry.get('nm_valid') else 'NO':>6}" if pattern else ""
        print(f"{name:60} {'x'.join(map(str, entry['shape'])):>14} {entry['sparsity']:9.4f}{valid}")
    print(f"overall sparsity of block weights: {result['overall_sparsity']:.4f}")
    if result.get("rose_config"):
        recipe = result["rose_config"]
        print(f"rose_config.json: method {recipe.get('method')}, pattern {recipe.get('pattern')}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
