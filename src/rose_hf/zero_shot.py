"""Zero-shot evaluation of an in-memory model with lm-evaluation-harness (``pip install 'rose_hf[eval]'``).

``zero_shot(model, tokenizer, ["arc_easy", "hellaswag"])`` runs the harness's own tasks on the
model as it is in memory (pruned or not), so no checkpoint is written first. Tasks that the harness
does not ship (a private benchmark, or the tiny local task the tests use) are YAML files in a
folder passed as ``tasks_path`` (the harness's ``include_path``).

The harness's seeds for its own sampling are kept, but it is told not to reseed Python's, NumPy's
or torch's global generators, so evaluating leaves the caller's random state alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    tasks_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Scores of ``model`` on lm-evaluation-harness ``tasks``.

    Args:
        model: A ``transformers`` causal LM, on the device it should run on.
        tokenizer: Its tokenizer.
        tasks: Task names (``arc_easy``, ``hellaswag``, ... or those in ``tasks_path``).
        tasks_path: A folder of task YAML files to add to the harness's own.
        limit: Evaluate at most this many documents per task (a quick check, not a score to report).
        num_fewshot: Few-shot examples per prompt (``None``: the task's default, 0 for most).
        batch_size: Requests per forward.

    Returns:
        ``{"tasks": {task: {"dataset": ..., "metrics": {"acc": ..., "acc_stderr": ...}}},
        "limit": ..., "num_fewshot": ..., "lm_eval": version}``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("zero-shot tasks need lm-evaluation-harness: pip install 'rose_hf[eval]'.") from None
    if not tasks:
        raise ValueError("no task given; name lm-evaluation-harness tasks, e.g. arc_easy,hellaswag.")
    if tasks_path is not None and not Path(tasks_path).is_dir():
        raise FileNotFoundError(f"tasks_path {str(tasks_path)!r} is not a folder of task YAML files.")
    manager = TaskManager(include_path=str(tasks_path) if tasks_path is not None else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"lm-evaluation-harness has no task {unknown}; see 'lm_eval ls tasks', or add a folder of task YAML "
            "files with --tasks-path (tasks_path=)."
        )
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=harness,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        random_seed=None,  # type: ignore[arg-type]  # None: leave the caller's generators alone
        numpy_random_seed=None,  # type: ignore[arg-type]
        torch_random_seed=None,  # type: ignore[arg-type]
    )
    if out is None:  # only on non-zero ranks of a distributed harness run
        raise RuntimeError("lm-evaluation-harness returned no results (was it run on a non-zero rank?).")
    scores = {task: {"dataset": _dataset(out, task), "metrics": metrics(out["results"][task])} for task in tasks}
    return {"tasks": scores, "limit": limit, "num_fewshot": num_fewshot, "lm_eval": lm_eval.__version__}


def metrics(row: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    out = {}
    for key, value in row.items():
        name, _, kind = key.partition(",")
        if kind and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name if kind == "none" else f"{name},{kind}"] = float(value)
    return out


def _dataset(out: dict[str, Any], task: str) -> str:
    """The dataset a task reads (its ``dataset_path``, and ``dataset_name`` where it has one)."""
    config = out.get("configs", {}).get(task, {})
    path, name = config.get("dataset_path"), config.get("dataset_name")
    return f"{path}/{name}" if path and name else str(path or task)
