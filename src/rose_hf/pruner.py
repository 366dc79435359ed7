"""``RosePruner``: prune a loaded transformers model in place, then save or push it.

The work is ``rose_hf.pipeline.prune_model`` with the model's blocks at home in memory (or where
accelerate dispatched them: ``rose_hf.homes.LoadedHome``); this class adds the user-facing
configuration checks, the report and the calibration record, and the output path.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from rose_hf.activations import check_place
from rose_hf.config import RoseConfig
from rose_hf.data import describe_calibration
from rose_hf.distributed import current_world
from rose_hf.homes import LoadedHome
from rose_hf.pipeline import Extensions, SparsityPlan, Transform, prune_model
from rose_hf.plans import BlockPlan
from rose_hf.pruning import Observer, Refiner
from rose_hf.report import PruneReport
from rose_hf.rotating import resolve_rotation
from rose_hf.runtime import resolve_device
from rose_hf.steps import BasisChange


class RosePruner:
    """Prune a transformers causal LM in place with ROSE (or a baseline) from calibration data.

    Args:
        model: A loaded ``PreTrainedModel`` (any device placement; blocks return where they were).
        config: A ``RoseConfig``; ``RoseConfig()`` (ROSE, 50 % unstructured) when omitted.
        observer: Optional ``observer(name, W, H)`` called before each module is pruned with its
            dense ``(out, in)`` weight and its Hessian (``None`` for magnitude), for per-layer
            analysis. It must not modify them.
        activations: Where the calibration hidden states wait between blocks: ``"memory"`` (on the
            compute device; fastest) or ``"disk"`` (files in ``scratch_dir``; one batch in memory at
            a time, for calibration sets larger than memory). The result is the same.
        scratch_dir: Folder for ``activations="disk"`` (default: the system's temporary folder);
            a subfolder is created there and removed when pruning ends.
        transforms: Model transforms applied before pruning (``rose_hf.pipeline.Transform``, or
            ``rose_hf.steps.BasisChange`` for exact changes of basis run on the step's Hessians).
        refiners: ``refiner(name, W, W_pruned, H) -> W`` run after each module's method.
        plan: A per-module sparsity plan, made before the loop: a ``rose_hf.plans.BlockPlan`` (such as
            ``OutlierPlan(lam=0.1)``; its dense pass runs block by block, so it works offloaded too) or
            any ``rose_hf.pipeline.SparsityPlan`` callable (which sees the whole model at once).

    Example::

        report = RosePruner(model, RoseConfig(sparsity=0.6)).prune(calib_loader)
        model.save_pretrained("out")
    """

    def __init__(
        self,
        model: nn.Module,
        config: RoseConfig | None = None,
        observer: Observer | None = None,
        *,
        activations: str = "memory",
        scratch_dir: str | Path | None = None,
        transforms: Sequence[Transform | BasisChange] = (),
        refiners: Sequence[Refiner] = (),
        plan: SparsityPlan | BlockPlan | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module (a transformers model); got {type(model).__name__}.")
        self.model = model
        self.config = config if config is not None else RoseConfig()
        if not isinstance(self.config, RoseConfig):
            raise TypeError(f"config must be a RoseConfig; got {type(self.config).__name__}.")
        self.world = current_world()
        self.device = resolve_device(self.config.device, self.world)
        self.activations = check_place(activations)
        self.scratch_dir = scratch_dir
        self.extensions = Extensions(tuple(transforms), tuple(refiners), plan, observer)
        self.report: PruneReport | None = None
        self.calibration: dict[str, Any] = {}

    def prune(self, calib: Any = None, *, progress: bool = True) -> PruneReport:
        """Prune every target module of every decoder block; returns a ``PruneReport``.

        Args:
            calib: Calibration token ids in any form ``rose_hf.data.as_batches`` accepts. Only
                ``method="magnitude"`` may omit it.
            progress: Show a tqdm bar over the blocks.

        Under ``torch.distributed`` every rank passes the same data and runs its share of it; see
        ``rose_hf.distributed``.
        """
        self.config = resolve_rotation(self.config, self.model)  # the recipe records what ran
        report, batches = prune_model(
            self.model,
            self.config,
            calib,
            LoadedHome(self.device),
            device=self.device,
            world=self.world,
            activations=self.activations,
            scratch_dir=self.scratch_dir,
            progress=progress,
            extensions=self.extensions,
        )
        self.report = report
        self.calibration = describe_calibration(calib, batches, self.config.seed)
        self._mark_model()
        return report

    def _mark_model(self) -> None:
        """Record the recipe in ``model.config`` and tag the model, so that a plain
        ``model.save_pretrained`` / ``push_to_hub`` still says how it was made."""
        from rose_hf import card, output

        model_config = getattr(self.model, "config", None)
        if model_config is None or self.report is None:
            return
        base = getattr(model_config, "_name_or_path", None) or None
        with warnings.catch_warnings():  # an unresolvable Hub base: save_pretrained says so when it matters
            warnings.simplefilter("ignore")
            record = output.record_for(
                self.config, self.report, self.calibration, base_model=base, model_config=model_config
            )
        setattr(model_config, output.CONFIG_KEY, output.config_entry(record))
        add_tags = getattr(self.model, "add_model_tags", None)  # transformers' PreTrainedModel
        if callable(add_tags):
            add_tags(card.tags_for(record["config"]))

    def save_pretrained(
        self,
        output_dir: str | Path,
        *,
        tokenizer: Any = None,
        base_model: str | None = None,
        revision: str | None = None,
        calibration: dict[str, Any] | None = None,
        calibration_source: str | None = None,
        perplexity: dict[str, Any] | None = None,
        zero_shot: dict[str, Any] | None = None,
        overwrite: bool = False,
        max_shard_size: str | int = "5GB",
        repo_id: str | None = None,
        token: str | None = None,
        endpoint: str | None = None,
    ) -> Path:
        """Save the pruned model with ``rose_config.json`` provenance and a model card.

        A plain ``model.save_pretrained`` also works; this adds the recipe, versions, calibration
        hash and per-module results, and writes all or nothing (see ``rose_hf.output.save_pruned``).
        ``base_model`` defaults to the model's ``name_or_path``; ``revision`` is the base revision
        asked for when loading it (a Hub base is recorded as the commit the Hub resolves it to, with
        ``token`` and ``endpoint``); ``calibration`` replaces the calibration record (the CLI's names
        the source and split), ``calibration_source`` only its source. ``perplexity`` (``rose_hf.eval``)
        and ``zero_shot`` (``rose_hf.zero_shot``) results go into the record and the card's model-index.
        """
        from rose_hf import card, output

        if self.report is None:
            raise RuntimeError("nothing to save yet: call prune() first.")
        meta = next((name for name, tensor in self.model.state_dict().items() if tensor.is_meta), None)
        if meta is not None:
            raise ValueError(
                f"the model holds weights on the meta device (e.g. {meta!r}), so there is nothing to save; "
                "prune a loaded model, or prune checkpoints larger than memory with rose_hf.streaming.prune_checkpoint."
            )
        model_config = getattr(self.model, "config", None)
        base = base_model or getattr(model_config, "_name_or_path", None) or None
        record_calibration = dict(calibration if calibration is not None else self.calibration)
        if calibration_source:
            record_calibration["source"] = calibration_source
        record = output.record_for(
            self.config,
            self.report,
            record_calibration,
            base_model=base,
            revision=revision,
            model_config=model_config,
            perplexity=perplexity,
            zero_shot=zero_shot,
            token=token,
            endpoint=endpoint,
        )
        return output.save_pruned(
            self.model,
            output_dir,
            record,
            tokenizer=tokenizer,
            license=card.base_license(base, revision, token=token, endpoint=endpoint),
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            repo_id=repo_id,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        create_pr: bool = False,
        endpoint: str | None = None,
        **save_kwargs: Any,
    ) -> Any:
        """``save_pretrained`` into a temporary folder, then ``rose_hf.hub.push_pruned`` it.

        Skips the upload (``result.skipped``) when the repository already holds the same recipe.
        """
        from rose_hf import hub

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(
                Path(tmp) / "model", repo_id=repo_id, token=token, endpoint=endpoint, **save_kwargs
            )
            return hub.push_pruned(
                folder, repo_id, token=token, private=private, create_pr=create_pr, endpoint=endpoint
            )
