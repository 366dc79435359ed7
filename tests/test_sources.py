import itertools
import json
import time
import typing

import pytest

from rose_hf import sources
from rose_hf.data import calibration_batches
from rose_hf.sources import is_hub_id, load_records, load_text


def test_local_text_files_and_sources_that_are_nowhere(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    assert load_text(str(tmp_path / "a.txt")) == "hello"
    for missing in (str(tmp_path / "missing.txt"), "pile", str(tmp_path / "no" / "such" / "folder")):
        with pytest.raises(FileNotFoundError, match="is not a file or folder, a Hub dataset id"):
            load_text(missing)


def _records():
    import datasets

    rows = {"body": ["first record text", "second record text"], "id": [1, 2]}
    return datasets.Dataset.from_dict(rows), rows


def test_files_of_records_are_read_as_records_never_as_raw_text(tmp_path):
    records, rows = _records()
    records.to_parquet(str(tmp_path / "calib.parquet"))
    records.to_csv(str(tmp_path / "calib.csv"))
    (tmp_path / "calib.json").write_text(json.dumps([{"body": t} for t in rows["body"]]))  # an array of records
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in rows["body"]))
    want = "first record text\n\nsecond record text"
    for name in ("calib.parquet", "calib.csv", "calib.json", "calib.jsonl"):
        assert load_text(str(tmp_path / name), column="body") == want, name
    with pytest.raises(ValueError, match=r"has columns \['body', 'id'\], none named 'text'.*--calib-column"):
        load_text(str(tmp_path / "calib.parquet"))
    with pytest.raises(ValueError, match="column 'id' of .* does not hold text"):
        load_text(str(tmp_path / "calib.parquet"), column="id")
    (tmp_path / "broken.jsonl").write_text('{"body": "x"}\n{not json\n')
    with pytest.raises(ValueError, match="could not be read as one JSON object per line"):
        load_text(str(tmp_path / "broken.jsonl"), column="body")


def test_save_to_disk_folders_of_text_with_splits(tmp_path):
    import datasets

    records, _ = _records()
    records.save_to_disk(str(tmp_path / "one"))
    assert load_text(str(tmp_path / "one"), column="body") == "first record text\n\nsecond record text"
    both = datasets.DatasetDict({"train": records, "validation": records.select([1])})
    both.save_to_disk(str(tmp_path / "both"))
    assert load_text(str(tmp_path / "both"), column="body") == "first record text\n\nsecond record text"
    assert load_text(str(tmp_path / "both"), split="validation", column="body") == "second record text"
    with pytest.raises(ValueError, match=r"has splits \['train', 'validation'\], not 'test'.*--calib-split"):
        load_text(str(tmp_path / "both"), split="test", column="body")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not one written by Dataset.save_to_disk"):
        load_text(str(tmp_path / "plain"))


def test_what_counts_as_a_hub_dataset_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/name")  # a local folder of that name wins
    assert is_hub_id("allenai/c4") and is_hub_id("HuggingFaceFW/fineweb-edu")
    assert not is_hub_id("c4")  # a preset, or a missing local name
    assert not is_hub_id("data/calib.jsonl") and not is_hub_id("a/b/c") and not is_hub_id("bad id/x")


class _Api:
    """Stands in for huggingface_hub.HfApi in these tests: dataset_info raises what it is given."""

    error: Exception | None = None
    asked: typing.ClassVar[list[str]] = []

    def dataset_info(self, repo_id, timeout=None):
        _Api.asked.append(repo_id)
        if _Api.error is not None:
            raise _Api.error


@pytest.fixture
def hub(monkeypatch):
    import datasets
    import huggingface_hub

    calls = []

    def load_dataset(path, name=None, data_files=None, split=None, streaming=False):
        calls.append({"path": path, "name": name, "data_files": data_files, "split": split, "streaming": streaming})
        return datasets.Dataset.from_dict({"text": ["alpha", "beta", "gamma"], "n": [1, 2, 3]})

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _Api)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    _Api.error, _Api.asked = None, []
    return calls


def test_hub_datasets_and_presets_go_through_load_dataset(hub):
    assert load_records("org/corpus", split="validation", config="en", max_records=2) == ["alpha", "beta"]
    assert hub[-1] == {"path": "org/corpus", "name": "en", "data_files": None, "split": "validation", "streaming": True}
    load_text("wikitext2")
    assert hub[-1]["path"] == "Salesforce/wikitext" and hub[-1]["name"] == "wikitext-2-raw-v1"
    assert hub[-1]["split"] == "train"
    load_text("c4", split="validation")
    assert hub[-1]["path"] == "allenai/c4" and hub[-1]["data_files"] == {
        "validation": sources.PRESETS["c4"].files["validation"]
    }
    assert _Api.asked == ["org/corpus", "Salesforce/wikitext", "allenai/c4"]
    with pytest.raises(ValueError, match=r"split='test' is not a c4 split; use one of \['train', 'validation'\]"):
        load_text("c4", split="test")


def test_offline_or_a_wrong_id_fails_at_once_naming_the_local_alternative(hub, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    _Api.error = ConnectionError("Name or service not known")
    started = time.perf_counter()
    with pytest.raises(
        ConnectionError, match="could not reach the Hugging Face Hub for dataset 'org/corpus'.*save_to_disk"
    ):
        load_text("org/corpus")
    with pytest.raises(ConnectionError, match="'Salesforce/wikitext'.*offline, pass a local"):
        load_text("wikitext2")
    assert time.perf_counter() - started < 5 and hub == []  # datasets (with its retries) never ran
    _Api.error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as a 404 raises it
    with pytest.raises(
        FileNotFoundError, match="'org/typo' is neither a local file or folder nor a dataset on the Hugging Face Hub"
    ):
        load_text("org/typo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline on purpose: datasets reads its cache, no request
    _Api.asked = []
    assert load_text("org/corpus") == "alpha\n\nbeta\n\ngamma" and _Api.asked == []


def _chat_tokenizer(base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    return tokenizer


def test_chat_records_are_rendered_with_the_chat_template(tiny_checkpoint, tmp_path):
    from conftest import TEXT

    base, _ = tiny_checkpoint
    tokenizer = _chat_tokenizer(base)
    sentences = [s for s in TEXT.split(". ") if s]
    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in itertools.pairwise(sentences)
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    batches = calibration_batches(tokenizer, str(tmp_path / "chats.jsonl"), 8, 32, column="messages", chat=True)
    rendered = "\n\n".join(tokenizer.apply_chat_template(c, tokenize=False) for c in chats)
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    windows = [b["input_ids"][0].tolist() for b in batches]
    assert all(any(ids[i : i + 32] == w for i in range(len(ids) - 31)) for w in windows)  # cut from the chats
    assert any("<assistant>" in tokenizer.decode(w) or "<user>" in tokenizer.decode(w) for w in windows)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        calibration_batches(tokenizer, str(tmp_path / "chats.jsonl"), 3, 16, column="messages", chat=True)
    (tmp_path / "plain.jsonl").write_text(json.dumps({"messages": "not a chat"}) + "\n")
    with pytest.raises(ValueError, match="must hold a list of .*messages for --calib-chat"):
        calibration_batches(_chat_tokenizer(base), str(tmp_path / "plain.jsonl"), 3, 16, column="messages", chat=True)
