"""Validation of a ``RoseConfig``: each check raises ``ConfigError`` naming the field, the value and
the fix. ``RoseConfig.__post_init__`` runs ``validate``; nothing else needs to call it."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from rose_hf.config import (
    ALLOCATIONS,
    METHODS,
    OBJECTIVES,
    REFINEMENTS,
    REORDER_MODES,
    ROTATION_OBJECTIVES,
    ROTATIONS,
    SCORES,
    ConfigError,
    parse_pattern,
)

if TYPE_CHECKING:
    from rose_hf.config import RoseConfig

_EXAMPLES = {
    "blocksize": 128,
    "seed": 0,
    "admm_iters": 120,
    "percdamp": 0.01,
    "reorder_threshold": 0.5,
    "correction_damp": 0.1,
    "owl_lambda": 0.08,
    "owl_m": 5.0,
}


def validate(config: RoseConfig) -> None:
    """Check every field of ``config`` (filling the sparsity an N:M pattern implies)."""
    try:
        n, m = parse_pattern(config.pattern)
    except ValueError as err:
        raise ConfigError("pattern", str(err)) from None
    _check_sparsity(config, n, m)
    if config.refine is None:  # the default recipe refines; the baselines stay themselves
        config.refine = "admm" if config.method == "rose" and config.objective == "layer" else "none"
    if config.rotation is None and not (config.method == "rose" and config.objective == "layer"):
        config.rotation = "none"  # the rest of the rule needs the model (rose_hf.rotating.resolve_rotation)
    choices = (
        ("method", METHODS),
        ("reorder", REORDER_MODES),
        ("score", SCORES),
        ("objective", OBJECTIVES),
        ("refine", REFINEMENTS),
        ("allocation", ALLOCATIONS),
        ("rotation", ROTATIONS),
        ("rotation_objective", ROTATION_OBJECTIVES),
    )
    for name, allowed in choices:
        if name == "rotation" and config.rotation is None:
            continue
        if getattr(config, name) not in allowed:
            raise ConfigError(name, f"{name}={getattr(config, name)!r} is not one of {list(allowed)}.")
    _check_combinations(config)
    _check_numbers(config, m)
    for name in ("targets", "ignore"):
        _check_regexes(config, name)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sparsity(config: RoseConfig, n: int, m: int) -> None:
    if config.sparsity is None:
        config.sparsity = 0.5 if m == 0 else 1.0 - n / m
    if not _is_number(config.sparsity):
        raise ConfigError("sparsity", f"sparsity={config.sparsity!r} must be a number in [0, 1), e.g. 0.6.")
    config.sparsity = float(config.sparsity)
    if not 0.0 <= config.sparsity < 1.0:
        raise ConfigError(
            "sparsity",
            f"sparsity={config.sparsity} is outside [0, 1); pass the fraction of weights to zero, e.g. 0.6 for 60 %.",
        )
    if m and not math.isclose(config.sparsity, 1.0 - n / m, abs_tol=1e-9):
        raise ConfigError(
            "sparsity",
            f"sparsity={config.sparsity} contradicts pattern={config.pattern!r}, which is "
            f"{1 - n / m:g} sparse; leave sparsity unset for N:M patterns.",
        )


def _check_combinations(config: RoseConfig) -> None:
    if config.channel_permutation and config.nm[1] == 0:
        raise ConfigError(
            "channel_permutation",
            f"channel_permutation=True regroups the columns of N:M patterns; with sparsity={config.sparsity} "
            "(unstructured) it changes nothing. Set pattern='2:4' or channel_permutation=False.",
        )
    if config.channel_permutation and config.method in ("magnitude", "wanda"):
        raise ConfigError(
            "channel_permutation",
            f"channel_permutation=True balances SparseGPT's importance, which method={config.method!r} does not "
            "prune by; use method='rose' or 'sparsegpt', or channel_permutation=False.",
        )
    if config.rotation not in (None, "none") and config.method == "magnitude":
        raise ConfigError(
            "rotation",
            f"rotation={config.rotation!r} learns from calibration Hessians, which method='magnitude' has none of; "
            "use rotation='none' or another method.",
        )
    if config.objective == "dense" and config.method in ("wanda", "magnitude"):
        raise ConfigError(
            "objective",
            f"objective='dense' needs a reconstructing method, not method={config.method!r}; "
            "use method='rose' or 'sparsegpt', or objective='layer'.",
        )
    if config.refine != "none" and (config.method == "magnitude" or config.objective == "dense"):
        raise ConfigError(
            "refine",
            f"refine={config.refine!r} needs calibration inputs and the layer objective, not method={config.method!r} "
            f"with objective={config.objective!r}; use method='rose', 'sparsegpt' or 'wanda' with objective='layer'.",
        )
    if config.allocation != "uniform" and config.pattern != "unstructured":
        raise ConfigError(
            "allocation",
            f"allocation={config.allocation!r} shares an unstructured sparsity out over blocks; pattern="
            f"{config.pattern!r} is the same in every module. Use allocation='uniform' or pattern='unstructured'.",
        )
    if config.allocation != "uniform" and config.method == "magnitude":
        raise ConfigError(
            "allocation",
            f"allocation={config.allocation!r} reads calibration inputs, which method='magnitude' has none of; "
            "use allocation='uniform' or another method.",
        )
    if not isinstance(config.true_sequential, bool):
        raise ConfigError("true_sequential", f"true_sequential={config.true_sequential!r} must be True or False.")
    if config.true_sequential and config.method == "magnitude":
        raise ConfigError(
            "true_sequential",
            "true_sequential=True does not apply with method='magnitude': magnitude pruning reads no "
            "calibration inputs; drop true_sequential.",
        )
    if config.true_sequential and config.objective == "dense":
        raise ConfigError(
            "true_sequential",
            "true_sequential=True does not apply with objective='dense': the dense objective needs the "
            "dense block's inputs; use objective='layer'.",
        )


def _check_numbers(config: RoseConfig, m: int) -> None:
    for name in ("blocksize", "seed", "admm_iters", "rotation_steps"):
        if isinstance(getattr(config, name), bool) or not isinstance(getattr(config, name), int):
            raise ConfigError(name, f"{name}={getattr(config, name)!r} must be an int, e.g. {_EXAMPLES[name]}.")
    for name in ("percdamp", "reorder_threshold", "correction_damp", "owl_lambda", "owl_m"):
        value = getattr(config, name)
        if not _is_number(value) and not (name == "correction_damp" and value is None):
            raise ConfigError(name, f"{name}={value!r} must be a number, e.g. {_EXAMPLES[name]}.")
    if config.admm_iters <= 0:
        raise ConfigError("admm_iters", f"admm_iters={config.admm_iters} must be positive, e.g. 120.")
    if config.rotation_steps <= 0:
        raise ConfigError("rotation_steps", f"rotation_steps={config.rotation_steps} must be positive, e.g. 100.")
    if config.blocksize <= 0:
        raise ConfigError("blocksize", f"blocksize={config.blocksize} must be positive, e.g. 128.")
    if m and config.blocksize % m:
        raise ConfigError(
            "blocksize",
            f"blocksize={config.blocksize} is not a multiple of M={m} from "
            f"pattern={config.pattern!r}; use a multiple such as {m * max(1, 128 // m)}.",
        )
    if not 0.0 < config.percdamp <= 1.0:
        raise ConfigError("percdamp", f"percdamp={config.percdamp} must be in (0, 1]; 0.01 is the usual value.")
    if config.correction_damp is not None and not (
        math.isfinite(config.correction_damp) and config.correction_damp > 0.0
    ):
        raise ConfigError(
            "correction_damp",
            f"correction_damp={config.correction_damp} must be a positive number (or None to use percdamp).",
        )
    if config.correction_damp is not None and config.objective != "dense":
        raise ConfigError(
            "correction_damp",
            f"correction_damp={config.correction_damp} only applies to objective='dense', not "
            f"objective={config.objective!r}; drop it or set objective='dense'.",
        )
    if not 0.0 <= config.owl_lambda < 0.5 or config.owl_m <= 0:
        raise ConfigError(
            "owl_lambda" if not 0.0 <= config.owl_lambda < 0.5 else "owl_m",
            f"owl_lambda={config.owl_lambda} must be in [0, 0.5) and owl_m={config.owl_m} positive; the paper "
            "uses 0.08 and 5.",
        )
    if not 0.0 <= config.reorder_threshold <= 1.0:
        raise ConfigError(
            "reorder_threshold",
            f"reorder_threshold={config.reorder_threshold} must be in [0, 1]; use "
            "reorder='always' or 'never' to force the gate.",
        )


def _check_regexes(config: RoseConfig, name: str) -> None:
    patterns = getattr(config, name)
    if patterns is None:
        return
    if isinstance(patterns, str):
        raise ConfigError(name, f"{name}={patterns!r} must be a list of regexes, e.g. [{patterns!r}].")
    setattr(config, name, list(patterns))
    for pat in patterns:
        try:
            re.compile(pat)
        except (re.error, TypeError) as err:
            raise ConfigError(name, f"{name} entry {pat!r} is not a valid regex: {err}.") from None
