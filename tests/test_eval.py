import math

import pytest
import torch

from rose_hf import RoseConfig, RosePruner
from rose_hf.eval import inspect_checkpoint, perplexity, perplexity_windows, sparsity_census
from zoo import build, calibration


def test_perplexity_windows_split_and_bos():
    ids = torch.arange(10)
    assert perplexity_windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with_bos = perplexity_windows(ids, 4, bos_token_id=99)
    assert with_bos.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity_windows(torch.arange(3), 4)


def test_perplexity_is_exp_mean_nll():
    model = build("llama")
    windows = calibration(3, seqlen=10)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(nll.item()), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inspect_checkpoint_matches_the_model(tmp_path, arch):
    model = build(arch)
    RosePruner(model, RoseConfig(pattern="2:4", blocksize=32)).prune(calibration(), progress=False)
    model.save_pretrained(tmp_path)
    saved = inspect_checkpoint(tmp_path, "2:4")
    live = sparsity_census(model, 2, 4)
    assert saved["modules"].keys() == live["modules"].keys()
    assert all(entry["nm_valid"] for entry in saved["modules"].values())
    assert saved["overall_sparsity"] == pytest.approx(live["overall_sparsity"])
    assert not any(entry["nm_valid"] for entry in inspect_checkpoint(tmp_path, "1:4")["modules"].values())


class _Tok:
    def __init__(self, bos, prepends):
        self.bos_token_id, self.prepends = bos, prepends

    def __call__(self, text):
        return type("Enc", (), {"input_ids": ([self.bos_token_id] if self.prepends else []) + [7]})()


def test_bos_follows_the_tokenizer():
    from rose_hf.eval import bos_token_for

    assert bos_token_for(_Tok(1, True)) == 1
    assert bos_token_for(_Tok(1, False)) is None
    assert bos_token_for(_Tok(None, False)) is None
