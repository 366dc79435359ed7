"""The model card (``README.md``) of a pruned checkpoint, built from its ``rose_config.json`` record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from rose_hf.sources import HUB_DATASETS, is_hub_id

CITATION = """@inproceedings{su2026rose,
  title     = {ROSE: Reordered SparseGPT for More Accurate One-Shot Large Language Models Pruning},
  author    = {Su, Mingluo and Wang, Huan},
  booktitle = {Conference on Parsimony and Learning (CPAL)},
  year      = {2026},
  note      = {arXiv:2603.05878}
}"""
ALPS_CITATION = """@inproceedings{meng2024alps,
  title     = {ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large Language Models},
  author    = {Meng, Xiang and Behdin, Kayhan and Wang, Haoyue and Mazumder, Rahul},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2024},
  note      = {arXiv:2406.07831}
}"""
DENOISEROTATOR_CITATION = """@inproceedings{denoiserotator2025,
  title     = {DenoiseRotator: Enhance Pruning Robustness for LLMs via Importance Concentration},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2025},
  note      = {arXiv:2505.23049}
}"""
ROTATIONS = {
    "heads": "heads (each key/value head of v_proj and o_proj rotated before pruning and merged into both, "
    "DenoiseRotator's R2)",
    "none": "none",
    "residual": "residual (one rotation of the residual stream, learned before pruning and merged into the "
    "embeddings, every block and lm_head; norms folded into the Linears that read them, DenoiseRotator's R1 "
    "made shared)",
    "layer": "layer (per-block input rotations applied by hooks; not a checkpoint)",
    "residual+heads": "residual and heads (DenoiseRotator's R1, shared and merged, and its R2)",
}
REFINEMENTS = {
    "admm": "admm (mask and weights optimised together by ADMM from the method's result, ALPS-style)",
    "refit": "refit (kept weights re-fitted by least squares on the method's mask)",
    "none": "none",
}


def tags_for(config: dict[str, Any]) -> list[str]:
    """The Hub tags of a model pruned with ``config`` (``RoseConfig.to_dict()``)."""
    pattern = str(config["pattern"])
    return ["pruned", "sparse", "rose", pattern.replace(":", "-") if pattern != "unstructured" else "unstructured"]


def model_card(record: dict[str, Any], license: str | None = None, repo_id: str | None = None) -> ModelCard:
    """A model card (``README.md``) for a pruned model from its ``rose_config.json`` record.

    ``repo_id`` is the name users load it by (the Hub repository, or a local folder).
    """
    config = record["config"]
    base = record.get("base_model")
    result = record["result"]
    pattern = config["pattern"]
    tags = tags_for(config)
    calibration = record.get("calibration", {})
    source = str(calibration.get("source"))
    calibration_dataset = HUB_DATASETS.get(source) or (source if is_hub_id(source) else None)
    data = ModelCardData(
        base_model=base if base and not Path(str(base)).exists() else None,
        library_name="transformers",
        tags=tags,
        license=license,
        pipeline_tag="text-generation",
        datasets=[calibration_dataset] if calibration_dataset else None,  # what it was calibrated on
        model_name=_model_name(repo_id, base),
        eval_results=eval_results(result.get("perplexity"), result.get("zero_shot")) or None,
    )
    ppl = result.get("perplexity")
    untied = int(result.get("untied_parameters") or 0)
    extra_rows = (
        f"| lm_head | untied from the input embeddings by the rotation: +{untied:,} parameters |\n" if untied else ""
    )
    if config.get("channel_permutation"):
        extra_rows += (
            f"| channel permutation | N:M groups of {int(result.get('permuted_modules') or 0)} modules balanced by "
            "reordering MLP and key/value-head channels (exact, merged) |\n"
        )
    gate = f"{config['reorder']}, threshold {config['reorder_threshold']} ({result['reordered_modules']} reordered)"
    calib = (
        f"{calibration.get('source')}, {calibration.get('nsamples')} × {calibration.get('seqlen')} tokens, "
        f"seed {calibration.get('seed')}"
    )
    ppl_line = f"| perplexity ({ppl['dataset']}, seqlen {ppl['seqlen']}) | {ppl['value']:.2f} |\n" if ppl else ""
    for task, scores in (result.get("zero_shot") or {}).get("tasks", {}).items():
        ppl_line += "".join(
            f"| {task} {metric} (lm-evaluation-harness) | {value:.4f} |\n"
            for metric, value in scores["metrics"].items()
            if not metric.endswith("_stderr")
        )
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
| refinement | {REFINEMENTS.get(str(config.get("refine", "none")), config.get("refine"))} |
| rotation | {ROTATIONS.get(str(config.get("rotation", "none")), config.get("rotation"))} |
{extra_rows}| calibration | {calib} |
{ppl_line}
Per-module sparsity and the full recipe are in `rose_config.json`.

## How to load

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{load_name}")
```

## Citation

```bibtex
{CITATION}{chr(10) + chr(10) + ALPS_CITATION if config.get("refine") == "admm" else ""}{
        chr(10) + chr(10) + DENOISEROTATOR_CITATION if config.get("rotation", "none") != "none" else ""
    }
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def base_license(
    base_model: str | None,
    revision: str | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
) -> str | None:
    """The base model's license: from its local model card, or for a Hub id from the card the Hub
    serves (one request, no retries; ``None`` offline). Only informative: never stops a save."""
    if not base_model:
        return None
    if Path(base_model).exists():
        card = Path(base_model) / "README.md"
        try:
            return ModelCard.load(card).data.to_dict().get("license") if card.is_file() else None
        except Exception:  # a malformed card must not stop a save
            return None
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(base_model, revision=revision, timeout=10)
    except Exception:  # offline, unknown id, no access
        return None
    data = info.card_data.to_dict() if info.card_data is not None else {}
    value = data.get("license")
    return value if isinstance(value, str) else None


def _model_name(repo_id: str | None, base: Any) -> str:
    """The name the model-index gives this model."""
    if repo_id and not Path(repo_id).exists():
        return repo_id.split("/")[-1]
    return f"{Path(str(base)).name}-rose" if base else "rose-pruned-model"


def eval_results(perplexity: dict[str, Any] | None, zero_shot: dict[str, Any] | None) -> list[EvalResult]:
    """The model-index entries (``EvalResult``) for a perplexity and lm-evaluation-harness results."""
    results = []
    if perplexity:
        source = str(perplexity["dataset"])
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=HUB_DATASETS.get(source, source),
                dataset_name=source,
                metric_type="perplexity",
                metric_value=round(float(perplexity["value"]), 4),
                metric_config=f"seqlen {perplexity['seqlen']}, {perplexity['windows']} windows",
            )
        )
    zero_shot = zero_shot or {}
    subset = f" (first {zero_shot['limit']} documents)" if zero_shot.get("limit") else ""
    harness = f"lm-evaluation-harness {zero_shot.get('lm_eval')}, {zero_shot.get('num_fewshot') or 0}-shot"
    for task, scores in zero_shot.get("tasks", {}).items():
        for metric, value in scores["metrics"].items():
            if metric.endswith("_stderr"):
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=task,
                    dataset_type=scores["dataset"],
                    dataset_name=task + subset,
                    metric_type=metric,
                    metric_value=round(value, 4),
                    metric_config=harness,
                )
            )
    return results


def add_eval_results(folder: str | Path, results: list[EvalResult]) -> Path:
    """Put ``results`` into the model-index of ``folder/README.md`` (made if missing), replacing
    earlier entries for the same task, dataset and metric. Returns the card's path."""
    path = Path(folder) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n")
    data: Any = card.data  # ModelCardData, as ModelCard loads it
    new = {(r.task_type, r.dataset_name, r.metric_type) for r in results}
    kept = [r for r in data.eval_results or [] if (r.task_type, r.dataset_name, r.metric_type) not in new]
    data.eval_results = kept + results
    data.model_name = data.model_name or Path(folder).resolve().name
    card.save(path)
    return path
