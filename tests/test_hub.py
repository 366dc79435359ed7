import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hub_server import FakeHub
from rose_hf import RoseConfig, RosePruner
from rose_hf.card import model_card
from rose_hf.data import as_batches
from rose_hf.data import fingerprint as calibration_sha256
from rose_hf.hub import fingerprint, push_pruned, remote_fingerprint
from rose_hf.output import provenance, save_pruned
from zoo import build, calibration


def _pruned(arch="llama", **config):
    model = build(arch)
    config = RoseConfig(sparsity=0.5, blocksize=32, **config)
    batches = as_batches(calibration())
    report = RosePruner(model, config).prune(batches, progress=False)
    calib = {"source": "random", "nsamples": 6, "seqlen": 24, "seed": 0, "sha256": calibration_sha256(batches)}
    record = provenance(config, report, base_model="org/tiny", base_revision="abc123", calibration=calib)
    return model, record


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_checkpoint_is_plain_and_exact(tmp_path, arch):
    model, record = _pruned(arch)
    model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF-loaded model carries
    out = save_pruned(model, tmp_path / "out", record, max_shard_size="100KB")
    assert model.config.quantization_config == {"quant_method": "gguf"}  # the caller's model is untouched
    config = json.loads((out / "config.json").read_text())
    assert not {"quantization_config", "sparsity_config", "compression_config"} & set(config)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch == "gpt2")  # GPT-2 ties its head to the embeddings; the tiny Llama does not
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            assert all(handle.get_tensor(k).is_contiguous() for k in handle.keys())


def test_provenance_record(tmp_path):
    model, record = _pruned()
    out = save_pruned(model, tmp_path / "out", record)
    saved = json.loads((out / "rose_config.json").read_text())
    assert saved["config"]["sparsity"] == 0.5 and saved["base_revision"] == "abc123"
    assert set(saved["versions"]) >= {"rose_hf", "torch", "transformers"}
    assert saved["calibration"]["sha256"] and len(saved["result"]["modules"]) == 14
    assert abs(saved["result"]["overall_sparsity"] - 0.5) < 0.005
    # the recipe as it ran: the default's rotation rule resolved for this Llama
    assert RoseConfig.from_pretrained(out) == RoseConfig(sparsity=0.5, blocksize=32, rotation="heads")


def test_model_card_metadata_and_body():
    _, record = _pruned(pattern="2:4")
    card = model_card(record, license="apache-2.0", repo_id="me/tiny-2-4")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny" and data["library_name"] == "transformers"
    assert set(data["tags"]) >= {"pruned", "sparse", "rose", "2-4"} and data["license"] == "apache-2.0"
    assert 'from_pretrained("me/tiny-2-4")' in card.text and "@inproceedings{su2026rose" in card.text
    assert "datasets" not in data  # calibrated on random ids: no dataset to name
    record["calibration"]["source"] = "c4"
    assert model_card(record).data.to_dict()["datasets"] == ["allenai/c4"]
    # the default recipe's ADMM step and head rotations are named, ALPS and DenoiseRotator cited beside
    # ROSE; a plain run cites ROSE only
    assert "| refinement | admm (" in card.text and "@inproceedings{meng2024alps" in card.text
    assert "| rotation | heads (" in card.text and "@inproceedings{denoiserotator2025" in card.text
    record["config"]["refine"] = "none"
    record["config"]["rotation"] = "none"
    plain = model_card(record).text
    assert "| refinement | none |" in plain and "meng2024alps" not in plain
    assert "| rotation | none |" in plain and "denoiserotator2025" not in plain


def test_every_recipe_field_is_fingerprinted_or_has_a_no_op_value():
    """A field added to RoseConfig must be named here (it changed every fingerprint when it came) or
    get its no-op value in hub._FINGERPRINT_NOOP, so CI does not re-push unchanged models."""
    from rose_hf.hub import _FINGERPRINT_CONFIG_SKIP, _FINGERPRINT_NOOP

    # The fields of the recipe when the no-op rule came (c88e632): their values are in every fingerprint.
    fingerprinted = {
        "sparsity", "pattern", "method", "blocksize", "percdamp", "reorder", "reorder_threshold", "score",
        "objective", "correction_damp", "true_sequential", "targets", "ignore", "seed", "block_path",
    }  # fmt: skip
    fields = set(RoseConfig().to_dict()) - set(_FINGERPRINT_CONFIG_SKIP)
    assert fields - set(_FINGERPRINT_NOOP) == fingerprinted
    defaults = RoseConfig(rotation="none").to_dict()  # rotation's default resolves per model; "none" is its no-op
    assert {k: defaults[k] for k in _FINGERPRINT_NOOP if k != "refine"} == {
        k: v for k, v in _FINGERPRINT_NOOP.items() if k != "refine"
    }  # every no-op value is the field's default (refine's default resolves to admm for ROSE)


def test_a_field_added_later_keeps_old_fingerprints_at_its_no_op_value():
    import hashlib
    import json as json_module

    later = (
        "refine",
        "allocation",
        "owl_lambda",
        "owl_m",
        "admm_iters",
        "rotation",
        "rotation_steps",
        "rotation_objective",
        "channel_permutation",
    )
    old = RoseConfig(refine="none", rotation="none")  # the recipe of the first release: no refinement, no rotation
    old_recipe = {k: v for k, v in old.to_dict().items() if k not in ("rose_hf_version", "device", *later)}
    payload = {"base_model": "m", "base_revision": "r", "config": old_recipe, "calibration": "h"}
    before_the_field = hashlib.sha256(json_module.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert fingerprint("m", "r", old, "h") == before_the_field
    assert fingerprint("m", "r", RoseConfig(rotation="none"), "h") != before_the_field  # today's default refines
    assert fingerprint("m", "r", RoseConfig(refine="none", rotation="heads"), "h") != before_the_field
    assert fingerprint("m", "r", RoseConfig(refine="refit"), "h") != before_the_field
    heads = RoseConfig(refine="none", rotation="heads")
    assert fingerprint("m", "r", heads, "h") != fingerprint(
        "m", "r", RoseConfig(refine="none", rotation="heads", rotation_objective="dropped"), "h"
    )
    assert fingerprint("m", "r", RoseConfig(allocation="owl"), "h") != before_the_field
    assert fingerprint("m", "r", RoseConfig(refine="admm"), "h") != before_the_field
    assert fingerprint("m", "r", RoseConfig(refine="admm", admm_iters=60), "h") != fingerprint(
        "m", "r", RoseConfig(refine="admm"), "h"
    )


def test_fingerprint_changes_with_recipe_not_with_device():
    a = fingerprint("m", "r", RoseConfig(sparsity=0.5), "h")
    assert a == fingerprint("m", "r", RoseConfig(sparsity=0.5, device="cpu"), "h")
    assert a != fingerprint("m", "r", RoseConfig(sparsity=0.6), "h")
    assert a != fingerprint("m", "r2", RoseConfig(sparsity=0.5), "h")
    assert a != fingerprint("m", "r", RoseConfig(sparsity=0.5), "h2")


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model, record = _pruned()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, tmp_path / "out", record)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_non_empty_output(tmp_path):
    model, record = _pruned()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pruned(model, tmp_path / "out", record)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    save_pruned(model, tmp_path / "out", record, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_push_uploads_then_skips_the_same_recipe(tmp_path):
    model, record = _pruned()
    out = save_pruned(model, tmp_path / "out", record, repo_id="user/tiny")
    with FakeHub() as hub:
        first = push_pruned(out, "user/tiny", token="hf_test", endpoint=hub.url)
        assert not first.skipped and len(hub.commits) == 1
        received = hub.repos["user/tiny"]
        assert {"config.json", "model.safetensors", "rose_config.json", "README.md"} <= set(received)
        assert received["model.safetensors"] == (out / "model.safetensors").read_bytes()
        assert remote_fingerprint("user/tiny", token="hf_test", endpoint=hub.url) == record["fingerprint"]
        second = push_pruned(out, "user/tiny", token="hf_test", endpoint=hub.url)
        assert second.skipped and len(hub.commits) == 1
        assert all(token == "Bearer hf_test" for token in hub.tokens)


def test_local_revision_changes_with_the_weights(tmp_path):
    from rose_hf.output import local_revision

    model = build("llama")
    model.save_pretrained(tmp_path / "a")
    first = local_revision(tmp_path / "a")
    assert first == local_revision(tmp_path / "a") and first.startswith("sha256:")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path / "a")
    assert local_revision(tmp_path / "a") != first
    assert local_revision(tmp_path / "missing") is None


def test_pruner_save_and_push_helpers(tmp_path):
    model = build("llama")
    pruner = RosePruner(model, RoseConfig(sparsity=0.5, blocksize=32))
    with pytest.raises(RuntimeError, match="call prune"):
        pruner.save_pretrained(tmp_path / "early")
    pruner.prune(calibration(), progress=False)
    out = pruner.save_pretrained(tmp_path / "out", base_model="org/tiny", calibration_source="random ids")
    record = json.loads((out / "rose_config.json").read_text())
    assert record["calibration"]["source"] == "random ids" and record["calibration"]["nsamples"] == 6
    with FakeHub() as hub:
        first = pruner.push_to_hub("user/helper", token="t", endpoint=hub.url, base_model="org/tiny")
        second = pruner.push_to_hub("user/helper", token="t", endpoint=hub.url, base_model="org/tiny")
    assert not first.skipped and second.skipped and len(hub.commits) == 1


def _commit(hub, repo, content):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token="t")
    api.create_repo(repo, exist_ok=True)
    api.upload_file(path_or_fileobj=content, path_in_repo="config.json", repo_id=repo)
    return hub.heads[repo]


def test_a_hub_base_is_recorded_as_its_resolved_commit_so_a_new_release_is_a_new_recipe(tmp_path):
    from rose_hf.output import base_revision

    model = build("llama")
    pruner = RosePruner(model, RoseConfig(sparsity=0.5, blocksize=32))
    pruner.prune(calibration(), progress=False)
    with FakeHub() as hub:
        first = _commit(hub, "org/base", b'{"v": 1}')
        assert base_revision("org/base", endpoint=hub.url) == first
        one = pruner.save_pretrained(tmp_path / "one", base_model="org/base", endpoint=hub.url, token="t")
        second = _commit(hub, "org/base", b'{"v": 2}')  # the base repository gets new weights
        two = pruner.save_pretrained(tmp_path / "two", base_model="org/base", endpoint=hub.url, token="t")
        hub.card_data["org/base"] = {"license": "gemma", "tags": ["text-generation"]}  # the base's own card
        three = pruner.save_pretrained(tmp_path / "three", base_model="org/base", endpoint=hub.url, token="t")
    assert ModelCard.load(three / "README.md").data.license == "gemma"
    assert ModelCard.load(one / "README.md").data.license is None
    records = [json.loads((folder / "rose_config.json").read_text()) for folder in (one, two)]
    assert [r["base_revision"] for r in records] == [first, second] and first != second
    assert records[0]["fingerprint"] != records[1]["fingerprint"]  # so CI pushes the new release


def test_an_unresolvable_hub_base_falls_back_to_the_revision_name_and_says_so():
    import socket

    from rose_hf.output import base_revision

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.warns(UserWarning, match="could not resolve 'org/base' at revision 'v2'"):
        assert base_revision("org/base", revision="v2", endpoint=closed) == "v2"


def test_a_recipe_goes_to_the_hub_and_back(tmp_path):
    recipe = RoseConfig(sparsity=0.6, blocksize=32, reorder="never", seed=3)
    with FakeHub() as hub:
        url = recipe.push_to_hub("user/recipe-60", token="t", endpoint=hub.url)
        assert "user/recipe-60/commit/" in url and hub.commits[-1]["files"] == ["rose_config.json"]
        assert RoseConfig.from_pretrained("user/recipe-60", token="t", endpoint=hub.url) == recipe
        with pytest.raises(FileNotFoundError, match="'user/nothing' has no rose_config.json"):
            RoseConfig.from_pretrained("user/nothing", endpoint=hub.url)
        # A pruned model's repository keeps its provenance record: no bare recipe over it.
        model, record = _pruned()
        push_pruned(save_pruned(model, tmp_path / "out", record), "user/tiny", token="t", endpoint=hub.url)
        assert RoseConfig.from_pretrained("user/tiny", endpoint=hub.url).to_dict() == record["config"]
        with pytest.raises(FileExistsError, match="would replace that record"):
            recipe.push_to_hub("user/tiny", token="t", endpoint=hub.url)
        assert len(hub.commits) == 2


@pytest.mark.slow  # a subprocess with the fake Hub as HF_ENDPOINT
def test_a_plain_push_to_hub_after_prune_keeps_the_recipe_and_tags(tmp_path):
    """The design card's own usage: prune(), then transformers' model.push_to_hub."""
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        from zoo import build, calibration
        from rose_hf import RoseConfig, RosePruner
        model = build("llama")
        RosePruner(model, RoseConfig(sparsity=0.5, blocksize=32)).prune(calibration(), progress=False)
        model.push_to_hub("user/plain-push")
        """
    )
    with FakeHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_XET": "1"}
        subprocess.run(
            [sys.executable, "-c", script], check=True, env=env, timeout=300, cwd=Path(__file__).parent.parent
        )
        pushed = hub.repos["user/plain-push"]
    entry = json.loads(pushed["config.json"])["rose_hf"]
    assert entry["config"]["sparsity"] == 0.5 and len(entry["fingerprint"]) == 64
    assert entry["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    card = ModelCard(pushed["README.md"].decode())
    assert {"pruned", "sparse", "rose", "unstructured"} <= set(card.data.tags)
    # Loaders ignore the key: transformers keeps it as a plain attribute and builds the same model.
    folder = tmp_path / "pulled"
    folder.mkdir()
    for name, content in pushed.items():
        (folder / name).write_bytes(content)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.rose_hf == entry and getattr(loaded.config, "quantization_config", None) is None


def test_saved_config_json_carries_the_record_of_that_save(tmp_path):
    model, record = _pruned()
    out = save_pruned(model, tmp_path / "out", record)
    entry = json.loads((out / "config.json").read_text())["rose_hf"]
    assert (
        entry["fingerprint"]
        == record["fingerprint"]
        == json.loads((out / "rose_config.json").read_text())["fingerprint"]
    )


def test_the_local_revision_is_read_once_while_the_files_stay_the_same(tmp_path, monkeypatch):
    from rose_hf import output

    build("llama").save_pretrained(tmp_path / "base")
    first = output.local_revision(tmp_path / "base")
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(self.name) or real_open(self, *a, **k))
    assert output.local_revision(tmp_path / "base") == first and opened == []  # the cached hash
    weights = tmp_path / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # other bytes, same name
    assert output.local_revision(tmp_path / "base") != first and "model.safetensors" in opened
