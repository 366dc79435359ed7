"""``rose-hf``: prune, evaluate and inspect checkpoints from the command line (and from CI jobs).

Exit codes: 0 success (including a push skipped because the Hub already has the same recipe),
1 a failure while running (model not found, Hub error, ...), 2 bad usage (flags, values, paths).
Errors print one line, ``rose-hf: error: ...``, naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from rose_hf.version import __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad flags or values: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rose-hf", description="One-shot ROSE / SparseGPT pruning for Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"rose_hf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prune = sub.add_parser("prune", help="prune a model to a new folder (and optionally push it)")
    prune.add_argument("model", help="Hub model id or local folder")
    prune.add_argument("-o", "--output", required=True, type=Path, help="folder for the pruned checkpoint")
    recipe = prune.add_argument_group("recipe (RoseConfig)")
    recipe.add_argument("--sparsity", type=float, help="fraction of weights to zero (default 0.5; implied by N:M)")
    recipe.add_argument("--pattern", default="unstructured", help="'unstructured' or 'N:M' such as '2:4'")
    recipe.add_argument("--method", default="rose", help="rose | sparsegpt | wanda | magnitude")
    recipe.add_argument("--blocksize", type=int, default=128)
    recipe.add_argument("--percdamp", type=float, default=0.01)
    recipe.add_argument(
        "--reorder", default="always", help="which modules ROSE reorders: always | auto (the paper's gate) | never"
    )
    recipe.add_argument("--reorder-threshold", type=float, default=0.5)
    recipe.add_argument("--score", default="paper", help="ROSE pre-pruning score: paper | obs")
    recipe.add_argument(
        "--objective",
        default="layer",
        help="what each module reconstructs: layer (SparseGPT) | dense (experimental, measured worse)",
    )
    recipe.add_argument(
        "--true-sequential",
        action="store_true",
        help="prune each module on the inputs of the block's already-pruned modules: one forward per block "
        "instead of two, several times the activation memory (docs/scaling.md)",
    )
    recipe.add_argument("--target", action="append", dest="targets", help="regex of modules to prune (repeatable)")
    recipe.add_argument("--ignore", action="append", help="regex of modules to keep dense (repeatable)")
    recipe.add_argument("--seed", type=int, default=0)
    recipe.add_argument("--device", help="compute device, e.g. cuda or cpu (default: cuda when available)")
    calib = prune.add_argument_group("calibration")
    calib.add_argument("--calib", default="c4", help="c4 | wikitext2 | a .txt/.jsonl file | a tokenised dataset folder")
    calib.add_argument("--calib-split", help="split of a named source (default train)")
    calib.add_argument("--nsamples", type=int, default=128)
    calib.add_argument("--seqlen", type=int, default=2048)
    load = prune.add_argument_group("loading and saving")
    load.add_argument("--revision", help="base model revision (branch, tag or commit)")
    load.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
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
    load.add_argument("--report", type=Path, help="also write the per-module report as JSON here")
    hub = prune.add_argument_group("Hub")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result to this Hub repository")
    hub.add_argument("--private", action="store_true")
    hub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    hub.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    prune.add_argument("--no-progress", action="store_true")

    evaluate = sub.add_parser("eval", help="perplexity of a model on a dataset")
    evaluate.add_argument("model", help="Hub model id or local folder")
    evaluate.add_argument("--dataset", default="wikitext2", help="wikitext2 | c4 | a .txt/.jsonl file")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--seqlen", type=int, default=2048)
    evaluate.add_argument("--windows", type=int, help="evaluate at most this many windows")
    evaluate.add_argument("--dtype", default="auto")
    evaluate.add_argument("--device", help="default: cuda when available")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of text")

    inspect = sub.add_parser("inspect", help="per-module sparsity and N:M validity of a checkpoint folder")
    inspect.add_argument("path", type=Path, help="a folder with config.json and *.safetensors")
    inspect.add_argument("--pattern", help="check this N:M pattern (default: the one in rose_config.json)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rose-hf`` console script; returns the exit code."""
    try:
        args = _build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        handler = {"prune": _prune, "eval": _eval, "inspect": _inspect}[args.command]
        return handler(args)
    except UsageError as err:
        _fail(str(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written")
        return EXIT_FAILURE
    except Exception as err:  # one line for CI logs; -v shows the traceback
        if logging.getLogger().isEnabledFor(logging.INFO):
            logging.exception("rose-hf failed")
        _fail(f"{type(err).__name__}: {err}".replace("\n", " "))
        return EXIT_FAILURE


def _fail(message: str) -> None:
    print(f"rose-hf: error: {message}", file=sys.stderr)


def _config_from(args: argparse.Namespace) -> Any:
    from rose_hf.config import RoseConfig

    fields: dict[str, Any] = dict(
        sparsity=args.sparsity,
        pattern=args.pattern,
        method=args.method,
        blocksize=args.blocksize,
        percdamp=args.percdamp,
        reorder=args.reorder,
        reorder_threshold=args.reorder_threshold,
        score=args.score,
        objective=args.objective,
        true_sequential=args.true_sequential,
        targets=args.targets,
        seed=args.seed,
        device=args.device,
    )
    if args.ignore:
        fields["ignore"] = args.ignore
    try:
        return RoseConfig(**fields)
    except ValueError as err:
        raise UsageError(str(err).replace("sparsity=", "--sparsity ").replace("pattern=", "--pattern ")) from None


def _dtype(name: str) -> Any:
    import torch

    choices = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise UsageError(f"--dtype {name!r} is not one of {sorted(choices)}")
    return choices[name]


def _load(model_id: str, revision: str | None, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"cannot load model {model_id!r}: {first}") from None
    return model, tokenizer


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"{name} {value} must be a positive integer")


def _prune(args: argparse.Namespace) -> int:
    config = _config_from(args)
    for name in ("nsamples", "seqlen", "eval_windows"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    _dtype(args.dtype)
    if args.mmap_threshold < 0:
        raise UsageError(f"--mmap-threshold {args.mmap_threshold} must be a number of bytes, or 0 to leave glibc's own")
    if args.stream and args.eval_source:
        raise UsageError(
            "--eval cannot be combined with --stream (the model is never in memory); run 'rose-hf eval' on the output"
        )
    from rose_hf import hub

    try:
        hub.check_output_dir(args.output, args.overwrite)
    except (FileExistsError, PermissionError, NotADirectoryError) as err:
        raise UsageError(str(err).replace("overwrite=True (--overwrite)", "--overwrite")) from None
    token = None
    if args.push_to_hub:
        from huggingface_hub import get_token

        token = args.token or get_token()
        if not token:
            raise UsageError("--push-to-hub needs a Hub token: set HF_TOKEN, run 'hf auth login', or pass --token")

    from rose_hf.pruner import RosePruner

    if args.stream:
        return _prune_streaming(args, config, token)
    model, tokenizer = _load(args.model, args.revision, args.dtype)
    batches, calibration = _calibration(args, tokenizer)
    # The resolved commit (not a branch name such as "main"), so a new base commit is a new recipe.
    base_revision = getattr(model.config, "_commit_hash", None) or hub.local_revision(args.model) or args.revision
    if args.push_to_hub:
        wanted = hub.fingerprint(args.model, base_revision, config, calibration["sha256"])
        if _up_to_date(args, token, wanted):
            return EXIT_OK

    report = RosePruner(model, config, activations=args.activations or "memory").prune(
        batches, progress=not args.no_progress
    )
    perplexity = None
    if args.eval_source:
        perplexity = _measure(model, tokenizer, args.eval_source, "test", args.seqlen, args.eval_windows)
    record = hub.provenance(
        config,
        report,
        base_model=args.model,
        base_revision=base_revision,
        calibration=calibration,
        perplexity=perplexity,
    )
    hub.save_pruned(
        model,
        args.output,
        record,
        tokenizer=tokenizer,
        license=hub.base_license(args.model),
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        repo_id=args.push_to_hub,
    )
    if args.report:
        args.report.write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True), encoding="utf-8")
    print(f"{report.summary()}; saved to {args.output}")
    if perplexity:
        print(f"perplexity on {perplexity['dataset']}: {perplexity['value']:.3f}")
    if args.push_to_hub:
        _push(args, token)
    return EXIT_OK


def _calibration(args: argparse.Namespace, tokenizer: Any) -> tuple[list[Any], dict[str, Any]]:
    from rose_hf.data import calibration_batches
    from rose_hf.data import fingerprint as calibration_sha256

    batches = calibration_batches(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed, args.calib_split)
    calibration = {
        "source": args.calib,
        "split": args.calib_split,
        "nsamples": len(batches),
        "seqlen": args.seqlen,
        "seed": args.seed,
        "sha256": calibration_sha256(batches),
    }
    return batches, calibration


def _up_to_date(args: argparse.Namespace, token: str | None, wanted: str) -> bool:
    from rose_hf import hub

    if hub.remote_fingerprint(args.push_to_hub, token=token) != wanted:
        return False
    print(f"{args.push_to_hub} already holds this recipe (fingerprint {wanted[:12]}); nothing to do.")
    return True


def _push(args: argparse.Namespace, token: str | None) -> None:
    from rose_hf import hub

    result = hub.push_pruned(args.output, args.push_to_hub, token=token, private=args.private, create_pr=args.create_pr)
    print(("skipped push to " if result.skipped else "pushed to ") + result.repo_url)


def _prune_streaming(args: argparse.Namespace, config: Any, token: str | None) -> int:
    from transformers import AutoTokenizer

    from rose_hf import hub
    from rose_hf.streaming import prune_checkpoint

    source = Path(args.model)
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(args.model, revision=args.revision, token=token))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"cannot load the tokenizer of {args.model!r}: {str(err).splitlines()[0]}") from None
    batches, calibration = _calibration(args, tokenizer)
    del tokenizer  # only the token ids are needed from here on
    if args.push_to_hub:
        wanted = hub.fingerprint(args.model, hub.local_revision(source), config, calibration["sha256"])
        if _up_to_date(args, token, wanted):
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
    )
    if args.report:
        args.report.write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True), encoding="utf-8")
    print(f"{report.summary()}; streamed to {args.output}")
    if args.push_to_hub:
        _push(args, token)
    return EXIT_OK


def _measure(model: Any, tokenizer: Any, source: str, split: str, seqlen: int, windows: int | None) -> dict[str, Any]:
    import torch

    from rose_hf.data import load_text
    from rose_hf.eval import bos_token_for, perplexity, perplexity_windows

    text = load_text(source, split if source == "wikitext2" else None)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    chunks = perplexity_windows(ids, seqlen, bos_token_for(tokenizer))
    if windows is not None:
        chunks = chunks[:windows]
    return {"dataset": source, "seqlen": seqlen, "windows": int(chunks.shape[0]), "value": perplexity(model, chunks)}


def _eval(args: argparse.Namespace) -> int:
    _positive("--seqlen", args.seqlen)
    _positive("--windows", args.windows)
    model, tokenizer = _load(args.model, None, args.dtype)
    if args.device:
        model.to(args.device)
    result = _measure(model, tokenizer, args.dataset, args.split, args.seqlen, args.windows)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"perplexity {result['value']:.3f} on {args.dataset} ({result['windows']} windows of {args.seqlen})")
    return EXIT_OK


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
