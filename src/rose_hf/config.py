"""`RoseConfig`: every knob of a pruning run, validated once, saved as JSON next to the checkpoint."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rose_hf.version import __version__

CONFIG_NAME = "rose_config.json"

METHODS = ("rose", "sparsegpt", "wanda", "magnitude")
REORDER_MODES = ("auto", "always", "never", "best")
REFINEMENTS = ("none", "refit", "admm")
ALLOCATIONS = ("uniform", "owl", "error")
ROTATIONS = ("none", "heads", "residual", "residual+heads", "layer")
ROTATION_OBJECTIVES = ("entropy", "dropped")
SCORES = ("paper", "obs")
OBJECTIVES = ("layer", "dense")
_NM = re.compile(r"^(\d+):(\d+)$")


class ConfigError(ValueError):
    """A ``RoseConfig`` value that cannot be used; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Return ``(n, m)`` for an ``"N:M"`` pattern, ``(0, 0)`` for ``"unstructured"``.

    ``N:M`` keeps at most ``N`` of every ``M`` consecutive input weights, i.e. prunes ``M - N``
    (``"2:4"`` is 50 % sparse). Raises ``ValueError`` naming the bad value otherwise.
    """
    if pattern == "unstructured":
        return 0, 0
    match = _NM.match(pattern)
    if match is None:
        raise ValueError(f"pattern={pattern!r} is not understood; use 'unstructured' or 'N:M' such as '2:4'.")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern={pattern!r} needs 0 < N < M (N weights kept of every M); try '2:4' or '4:8'.")
    return n, m


@dataclass
class RoseConfig:
    """Configuration of a one-shot pruning run.

    Args:
        sparsity: Fraction of weights set to zero in every target module, in ``[0, 1)``. Defaults to
            0.5 for unstructured pruning and to ``1 - N/M`` for an ``N:M`` pattern; an explicit value
            that contradicts the pattern is an error.
        pattern: ``"unstructured"`` or ``"N:M"`` (for example ``"2:4"``: at most 2 non-zeros in every
            4 consecutive input weights of a row, the layout sparse tensor cores accelerate).
        method: ``"rose"`` (SparseGPT with ROSE's column reordering, the default), or a baseline run
            through the same pipeline: ``"sparsegpt"``, ``"wanda"``, ``"magnitude"``.
        blocksize: Columns per SparseGPT block (lazy updates, adaptive mask, ROSE's blocks). A width
            that is not a multiple is fine: the last block is shorter. Must be a multiple of ``M`` for
            ``N:M`` patterns.
        percdamp: Dampening added to the Hessian diagonal, as a fraction of its mean.
        reorder: Which modules ROSE reorders. ``"auto"`` (the default) is the paper's gate,
            reordering a module only when the relative range of its block losses exceeds
            ``reorder_threshold``; ``"always"`` reorders every module; ``"never"`` is SparseGPT's
            order. Measured on two models and two domains (docs/recipes.md, 3 seeds at 70 %), the
            gate is never worse than SparseGPT beyond the seed spread on either model, and
            ``"always"`` is: much better on SmolLM2 out of domain, worse on Gemma-3-270M, where it
            lowers every module's layer error and still raises perplexity. ``"best"`` prunes each
            module both ways and keeps the order with the lower layer error on the calibration
            tokens (twice the pruning math).
        reorder_threshold: The gate threshold in ``[0, 1]`` for ``reorder="auto"`` (0.5 in the
            paper's code).
        score: ROSE pre-pruning score. ``"paper"`` is ``|W_ij| * ||X_j||`` as in the paper;
            ``"obs"`` is SparseGPT's own saliency ``W_ij^2 / [H^-1]_jj`` (see docs/algorithm.md).
        objective: What each module reconstructs. ``"layer"`` (SparseGPT's and the paper's objective)
            is its own dense output on the inputs the already-pruned layers produce; ``"dense"`` is
            the dense *model's* output for the same tokens, so each module also corrects the error
            that reaches it from upstream (one more set of calibration activations and one more
            block forward per block). An experiment that measured much worse than ``"layer"`` on real
            weights (docs/benchmarks.md); not recommended.
        correction_damp: For ``objective="dense"``: dampening of the correction solve, as a fraction
            of ``mean(diag(H))``; ``None`` uses ``percdamp``. Larger values shrink the correction
            towards the plain layer-wise objective (ridge regression).
        refine: What follows each module's method. ``"admm"``: ADMM over the mask *and* the weights,
            started from the method's result (ALPS-style, ``rose_hf.admm``; the mask may move, the
            exact sparsity or N:M pattern is kept, never a higher layer error). ``"refit"`` re-fits
            only the kept weights on the method's mask by least squares (``rose_hf.refit``).
            ``"none"``: the method's result as it is. Unset (``None``), it is ``"admm"`` for
            ``method="rose"`` with the layer objective, the default recipe (measured on two models
            and two text domains, docs/recipes.md), and ``"none"`` for the baselines, which stay
            what their names say. ``"admm"`` and ``"refit"`` need calibration inputs and the layer
            objective.
        admm_iters: ``refine="admm"``: most ADMM iterations per module (it stops earlier once the
            support settles, after 20-26 on the real layers measured); each costs one Cholesky
            solve with the weight's rows as right-hand sides.
        allocation: How the sparsity is shared out over the decoder blocks. ``"uniform"``: every
            module at ``sparsity``. ``"owl"``: OWL's outlier-weighted layer sparsity
            (``rose_hf.allocation``): blocks with more outlier weights (Wanda score above
            ``owl_m`` times the mean) are pruned less, within ``sparsity ± owl_lambda``, with the
            parameter-weighted mean exactly ``sparsity``. ``"error"``: the same rule with, instead of
            outliers, the share of each block's Wanda score mass that pruning at ``sparsity`` would
            remove (more lost, less pruned). Both need one extra dense forward of the calibration
            data, block by block (so streaming and offload work too); unstructured only.
        owl_lambda: Half spread of the block sparsities for ``allocation="owl"`` or ``"error"``
            (0.08 in the OWL paper).
        owl_m: OWL's outlier threshold, a multiple of the mean score (5 in the paper).
        rotation: Unset (``None``), the default recipe's rule: ``"heads"`` for ``method="rose"``
            with the layer objective on a model whose every block has an attention with separate
            ``v_proj`` and ``o_proj`` and a readable head size (Llama, Mistral, Qwen, Gemma, ...),
            ``"none"`` for the baselines (which stay what their names say) and for other models
            (GPT-2, OPT, GPT-NeoX, Phi-3's fused projections) or when no ``v_proj`` / ``o_proj`` is
            pruned (``targets`` / ``ignore``; an explicit ``"heads"`` then warns), logged; resolved against the model
            when pruning starts, and the saved recipe records the value that ran
            (``rose_hf.rotating.resolve_rotation``). ``"none"``: no rotation. ``"heads"``: before
            each block is pruned, learn one orthogonal rotation per key/value head that concentrates
            SparseGPT's importance of ``v_proj`` and ``o_proj`` on fewer weights (DenoiseRotator's
            R2, arXiv 2505.23049) and merge it into both, exactly: the checkpoint stays a plain one.
            Reads the Hessians of the step's own calibration (no extra forward; one per block under
            ``true_sequential``).
            ``"residual"``: before anything is pruned, fold every RMSNorm's weight into the Linears
            that read it and learn one orthogonal rotation of the residual stream that concentrates
            the importance of every block's q/k/v and gate/up projections, merged into the
            embeddings, every block and ``lm_head`` (a plain checkpoint; tied embeddings become
            untied, the report and card say by how much).
            Llama-style pre-norm models (not Gemma 2/3's sandwich norms, not LayerNorm models), in
            memory, offloaded or streamed (the learning holds a copy of every block's q/k/v and
            gate/up weights on the host, docs/scaling.md). ``"residual+heads"``: both.
            ``"layer"``: DenoiseRotator's own per-block input rotations (one for q/k/v, one for
            gate/up), applied by forward hooks: for evaluation in memory only, never saved.
            Measured (docs/algorithm.md), against the same recipe with ``"none"``: ``"heads"``
            lowers perplexity on SmolLM2-135M and Gemma-3-270M at 50 %, 60 %, 70 % and 2:4 beyond
            the seed spread in at least one domain and never raises it (at 80 % lower in domain on
            both, out of domain lower on Gemma, within the spread on SmolLM2), hence the default;
            on SmolLM2 2:4 ``"residual"`` raises it and ``"layer"`` lowers it the most.
        rotation_steps: Adam steps of the rotation learning (lr 0.01), per block for ``"heads"`` and
            ``"layer"``, once for ``"residual"`` (each step reads a sample of 16 norm outputs and 256
            rows per module).
        rotation_objective: What the learned rotations (every ``rotation`` but ``"none"``) lower:
            ``"entropy"`` (DenoiseRotator's: the entropy of SparseGPT's importance per row and
            column) or ``"dropped"`` (the share of that importance the run's pattern, ``sparsity``
            or ``N:M``, would drop by importance alone, ``rose_hf.rotation.dropped_share``; under
            ``allocation`` the head rotations read each module's planned sparsity, the input
            rotations of ``"residual"`` / ``"layer"``, which several modules share, the run's). Per layer, on
            SmolLM2-135M 2:4, ``"dropped"`` lowers the layer error of ``v_proj`` and ``o_proj`` more
            than ``"entropy"``, on Gemma-3-270M too; end to end its perplexity is within the seed
            spread of ``"entropy"``'s at 2:4 and shows no gain at 70 % (one seed; docs/algorithm.md),
            so the default stays ``"entropy"``.
        channel_permutation: N:M patterns only: before each block is pruned, reorder the channels
            whose order is a free choice of the model (the MLP's hidden channels: ``gate_proj`` and
            ``up_proj`` rows with ``down_proj`` columns; each key/value head's channels: ``v_proj``
            rows with ``o_proj`` columns) so that the N:M groups of ``down_proj`` and ``o_proj``
            drop less of SparseGPT's importance (``rose_hf.permutation``). Exact and merged: the
            checkpoint is a plain one with valid N:M groups. Costs a local search per module on the
            Hessians of the step's own calibration (no extra forward but under ``true_sequential``,
            one per block, shared with ``rotation="heads"``). Measured with
            ``rotation="heads"`` at 2:4 (docs/algorithm.md): lower perplexity than ``"heads"``
            alone beyond the seed spread on Gemma-3-270M, within it on SmolLM2-135M.
        true_sequential: Prune each module of a block on the inputs that the block's earlier modules
            produce once *they* are pruned (GPTQ's "true sequential"), instead of on the dense
            block's inputs. The forwards of all calibration batches run side by side and pause at
            each module (``rose_hf.lockstep``), so one forward per block both calibrates and
            propagates: faster, but while a block runs the activations of every batch are alive
            at once, several times the memory of one set of hidden states (docs/scaling.md).
            Blocks whose batches take different paths (mixture-of-experts routing) fall back to
            the dense block's inputs for the rest of the block, with a warning.
        targets: Regular expressions (``re.search`` on the full module name); only modules inside
            decoder blocks that match one are pruned. ``None`` targets every ``nn.Linear`` (and GPT-2
            ``Conv1D``) inside the decoder blocks.
        ignore: Regular expressions for modules never pruned, checked after ``targets``. Embeddings
            and ``lm_head`` live outside the decoder blocks and are never pruned either way.
        seed: Seed of the calibration windows. ``rose_hf.data.calibration_batches`` and the CLI draw
            their windows with it, and it is recorded in the provenance. Pruning itself draws no random
            numbers: the same calibration tokens give bitwise-identical weights on the same machine,
            whatever the seed.
        device: Compute device for one block at a time (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
            ``None`` picks CUDA when available, else CPU. Other blocks stay where they are.
        block_path: Dotted path of the ``nn.ModuleList`` of decoder blocks (``"model.layers"``).
            ``None`` finds it from the model's own metadata.
    """

    sparsity: float | None = field(
        default=None, metadata={"help": "fraction of weights to zero (default 0.5; implied by an N:M pattern)"}
    )
    pattern: str = field(default="unstructured", metadata={"help": "'unstructured' or 'N:M' such as '2:4'"})
    method: str = field(default="rose", metadata={"help": "pruning method", "choices": METHODS})
    blocksize: int = field(default=128, metadata={"help": "columns per SparseGPT block"})
    percdamp: float = field(default=0.01, metadata={"help": "Hessian dampening, a fraction of its mean diagonal"})
    reorder: str = field(
        default="auto",
        metadata={"help": "which modules ROSE reorders (auto: the paper's gate)", "choices": REORDER_MODES},
    )
    reorder_threshold: float = field(default=0.5, metadata={"help": "the gate's threshold for --reorder auto"})
    score: str = field(default="paper", metadata={"help": "ROSE pre-pruning score", "choices": SCORES})
    objective: str = field(
        default="layer",
        metadata={"help": "what each module reconstructs (dense: experimental, measured worse)", "choices": OBJECTIVES},
    )
    correction_damp: float | None = field(
        default=None, metadata={"help": "dampening of the dense objective's correction (default: percdamp)"}
    )
    refine: str | None = field(
        default=None,
        metadata={
            "help": "step after each module's method (admm: mask and weights; refit: least squares); "
            "default: admm for method rose, none for the baselines",
            "choices": REFINEMENTS,
        },
    )
    admm_iters: int = field(default=120, metadata={"help": "--refine admm: most ADMM iterations per module"})
    allocation: str = field(
        default="uniform",
        metadata={
            "help": "how sparsity is shared out over blocks (owl: outlier-weighted; error: by the score mass "
            "pruning would remove)",
            "choices": ALLOCATIONS,
        },
    )
    owl_lambda: float = field(
        default=0.08, metadata={"help": "--allocation owl|error: half spread of block sparsities"}
    )
    owl_m: float = field(default=5.0, metadata={"help": "--allocation owl: outlier threshold, times the mean score"})
    rotation: str | None = field(
        default=None,
        metadata={
            "help": "default: heads for method rose where every block's attention has v_proj and o_proj, else "
            "none; heads: rotate each kv head of v_proj/o_proj to concentrate importance first (exact; "
            "DenoiseRotator's R2); residual: one rotation of the residual stream (its R1, shared, merged); "
            "residual+heads: both; layer: per-block input rotations by hooks, in memory only (cannot be saved)",
            "choices": ROTATIONS,
        },
    )
    rotation_steps: int = field(
        default=100, metadata={"help": "--rotation: Adam steps (per block for heads, once for residual)"}
    )
    rotation_objective: str = field(
        default="entropy",
        metadata={
            "help": "--rotation: what the learned rotations lower: entropy (DenoiseRotator's) or dropped (the "
            "share of importance the sparsity pattern would drop)",
            "choices": ROTATION_OBJECTIVES,
        },
    )
    channel_permutation: bool = field(
        default=False,
        metadata={
            "help": "N:M patterns: reorder each block's MLP channels and each kv head's channels (exactly, in the "
            "checkpoint) so the N:M groups drop less importance"
        },
    )
    true_sequential: bool = field(
        default=False,
        metadata={
            "help": "prune each module on the inputs of the block's already-pruned modules: one forward per block "
            "instead of two, several times the activation memory (docs/scaling.md)"
        },
    )
    targets: list[str] | None = field(
        default=None, metadata={"help": "regex of modules to prune (repeatable; default: all)", "flag": "--target"}
    )
    ignore: list[str] = field(
        default_factory=lambda: [r"(^|\.)lm_head$", r"embed"],
        metadata={"help": "regex of modules to keep dense (repeatable; replaces the default)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the calibration windows, recorded in the provenance"})
    device: str | None = field(
        default=None, metadata={"help": "compute device, e.g. cuda or cpu (default: cuda when available)"}
    )
    block_path: str | None = field(
        default=None, metadata={"help": "dotted path of the decoder blocks' ModuleList (default: found)"}
    )

    def __post_init__(self) -> None:
        from rose_hf.validation import validate

        validate(self)
        if self.sparsity is not None and self.sparsity >= 0.9:
            # stacklevel 3: past this method and the dataclass's generated __init__, to the caller.
            warnings.warn(f"sparsity={self.sparsity} is very high; expect a large loss of quality.", stacklevel=3)

    @property
    def nm(self) -> tuple[int, int]:
        """``(N, M)`` of the pattern, ``(0, 0)`` when unstructured."""
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        """All fields plus a ``rose_hf_version`` stamp, JSON-ready."""
        data = asdict(self)
        data["rose_hf_version"] = __version__
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoseConfig:
        """Build a config from ``to_dict`` output; unknown keys are dropped with a warning. A recipe
        written before ``rotation`` existed (a ``rose_hf_version`` and no ``rotation``) ran without
        one, and keeps ``"none"`` rather than today's default rule."""
        known = {f.name for f in fields(cls)}
        if "rose_hf_version" in data and "rotation" not in data:
            data = {**data, "rotation": "none"}
        unknown = sorted(set(data) - known - {"rose_hf_version"})
        if unknown:
            warnings.warn(
                f"ignoring unknown RoseConfig keys {unknown} (written by a newer rose_hf?).",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        """Sorted, indented JSON of ``to_dict``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``rose_config.json`` holding only this config into ``save_directory``."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        target = path / CONFIG_NAME
        target.write_text(self.to_json_string(), encoding="utf-8")
        return target

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, revision: str | None = None, token: str | None = None, endpoint: str | None = None
    ) -> RoseConfig:
        """Read a config from a folder holding ``rose_config.json``, that file itself, or a Hub
        repository id (``org/model-rose-60``; ``revision``, ``token`` and ``endpoint`` as in ``hf_hub_download``).

        A full provenance file (written by ``rose_hf.output``) keeps the config under ``"config"``.
        """
        from rose_hf.sources import is_hub_id  # one rule for "a Hub id, not a local path"

        file = Path(path)
        if is_hub_id(str(path)):
            from rose_hf.hub import download_config

            file = download_config(str(path), revision=revision, token=token, endpoint=endpoint)
        if file.is_dir():
            file = file / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} at {str(path)!r}; pass the pruned folder or a Hub id.")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(file)!r} is not valid JSON ({err}); restore it or save the config again.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{str(file)!r} holds {type(data).__name__}, not a JSON object of RoseConfig fields.")
        if "config" in data and isinstance(data["config"], dict):
            data = data["config"]
        return cls.from_dict(data)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        revision: str | None = None,
        endpoint: str | None = None,
    ) -> str:
        """Share this recipe: upload it as ``rose_config.json`` to Hub repository ``repo_id``.

        Returns the commit URL. See ``rose_hf.hub.push_config`` (a pruned model's repository is refused).
        """
        from rose_hf.hub import push_config

        return push_config(self, repo_id, token=token, private=private, revision=revision, endpoint=endpoint)
