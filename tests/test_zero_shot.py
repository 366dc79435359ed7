"""Zero-shot tasks through lm-evaluation-harness, on a tiny local task (no download)."""

import json
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from rose_hf.cli import main

pytest.importorskip("lm_eval")
from rose_hf.zero_shot import zero_shot

DOCS = [
    {"question": "The pruner keeps the", "choices": [" weights", " zebra"], "answer": 0},
    {"question": "Sparse models run", "choices": [" purple", " faster"], "answer": 1},
    {"question": "One shot pruning needs", "choices": [" calibration", " sand"], "answer": 0},
    {"question": "The Hessian is", "choices": [" water", " symmetric"], "answer": 1},
]


@pytest.fixture
def tiny_task(tmp_path):
    """A multiple-choice task for the harness: a YAML file in a folder, reading a local jsonl."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "rose_tiny.yaml").write_text(
        textwrap.dedent(
            f"""
            task: rose_tiny
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {tmp_path / "docs.jsonl"}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{question}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: "{{{{answer}}}}"
            target_delimiter: ""
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            """
        )
    )
    return folder


def _accuracy_by_hand(model, tokenizer):
    """The task's accuracy from the model's log-likelihoods, computed here without the harness."""
    right = 0
    for doc in DOCS:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["question"], add_special_tokens=False).input_ids
            whole = tokenizer(doc["question"] + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = model(ids).logits.log_softmax(-1)[0, :-1]
            targets = ids[0, 1:]
            per_token = logprobs.gather(1, targets[:, None])[:, 0]
            scores.append(float(per_token[len(context) - 1 :].sum()))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(DOCS)


@pytest.mark.slow  # imports lm-evaluation-harness
def test_zero_shot_matches_the_log_likelihoods_and_leaves_the_rng_alone(tiny_checkpoint, tiny_task):
    base, _ = tiny_checkpoint
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    result = zero_shot(model, tokenizer, ["rose_tiny"], tasks_path=tiny_task)
    assert torch.equal(torch.get_rng_state(), state)
    scores = result["tasks"]["rose_tiny"]
    assert scores["dataset"] == "json" and set(scores["metrics"]) == {"acc", "acc_stderr"}
    assert scores["metrics"]["acc"] == pytest.approx(_accuracy_by_hand(model, tokenizer))
    with pytest.raises(ValueError, match=r"no task \['rose_nothing'\].*--tasks-path"):
        zero_shot(model, tokenizer, ["rose_nothing"], tasks_path=tiny_task)
    with pytest.raises(FileNotFoundError, match="is not a folder of task YAML files"):
        zero_shot(model, tokenizer, ["rose_tiny"], tasks_path=tiny_task / "missing")


def _index(folder):
    return {
        (r.task_name, r.metric_type): r.metric_value for r in ModelCard.load(folder / "README.md").data.eval_results
    }


@pytest.mark.slow
def test_eval_tasks_write_the_model_index_of_the_card(tiny_checkpoint, tiny_task, tmp_path, capsys):
    base, calib = tiny_checkpoint
    out = tmp_path / "pruned"
    prune = ["prune", str(base), "-o", str(out), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"]
    flags = ["--blocksize", "32", "--no-progress", "--eval", str(calib), "--eval-windows", "2"]
    assert main([*prune, *flags, "--eval-tasks", "rose_tiny", "--tasks-path", str(tiny_task)]) == 0
    record = json.loads((out / "rose_config.json").read_text())
    acc = record["result"]["zero_shot"]["tasks"]["rose_tiny"]["metrics"]["acc"]
    assert _index(out) == {
        ("rose_tiny", "acc"): round(acc, 4),
        (None, "perplexity"): pytest.approx(record["result"]["perplexity"]["value"], abs=1e-4),
    }
    assert "rose_tiny: acc" in capsys.readouterr().out

    # rose-hf eval --update-card replaces the entry it measures again and keeps the others.
    card = ModelCard.load(out / "README.md")
    card.data.eval_results[0].metric_value = 0.123  # a stale score, as after a re-prune
    card.save(out / "README.md")
    assert (
        main(["eval", str(out), "--tasks", "rose_tiny", "--tasks-path", str(tiny_task), "--update-card", "--json"]) == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["zero_shot"]["tasks"]["rose_tiny"]["metrics"]["acc"] == pytest.approx(acc)
    assert "perplexity" not in shown  # --tasks alone measures no perplexity
    index = _index(out)
    assert len(index) == 2 and index[("rose_tiny", "acc")] == round(acc, 4)
    assert "# " in (out / "README.md").read_text()  # the card's body is kept


def test_task_flags_are_checked_before_any_work(tiny_checkpoint, tmp_path, capsys):
    base, calib = tiny_checkpoint
    assert main(["eval", str(base), "--tasks", "x", "--tasks-path", str(tmp_path / "none")]) == 2
    assert "--tasks-path" in capsys.readouterr().err
    assert main(["eval", "org/model", "--tasks", "x", "--update-card"]) == 2
    assert "writes into a local folder" in capsys.readouterr().err
    assert main(["eval", str(base), "--tasks", " , "]) == 2
    assert "name at least one task" in capsys.readouterr().err
    args = ["prune", str(base), "-o", str(tmp_path / "o"), "--calib", str(calib), "--stream", "--eval-tasks", "x"]
    assert main(args) == 2
    assert "--eval-tasks cannot be combined with --stream" in capsys.readouterr().err
