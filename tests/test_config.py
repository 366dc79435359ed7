import json

import pytest

from rose_hf import RoseConfig


def test_defaults_are_the_papers_plus_admm():
    config = RoseConfig()
    assert (config.method, config.blocksize, config.percdamp, config.reorder_threshold) == ("rose", 128, 0.01, 0.5)
    assert config.sparsity == 0.5 and config.nm == (0, 0)
    assert config.reorder == "auto"  # the paper's gate: never worse than SparseGPT on two models, docs/recipes.md
    assert config.refine == "admm"  # the default recipe's second step, docs/recipes.md


@pytest.mark.parametrize(
    ("kwargs", "refine"),
    [
        ({}, "admm"),
        ({"pattern": "2:4"}, "admm"),
        ({"reorder": "never"}, "admm"),
        ({"method": "sparsegpt"}, "none"),  # a baseline stays the baseline its name says
        ({"method": "wanda"}, "none"),
        ({"method": "magnitude"}, "none"),
        ({"objective": "dense"}, "none"),  # ADMM needs the layer objective
        ({"method": "sparsegpt", "refine": "admm"}, "admm"),  # asked for: kept
        ({"refine": "none"}, "none"),
        ({"refine": "refit"}, "refit"),
    ],
)
def test_refine_left_unset_is_resolved_once_and_saved_explicitly(kwargs, refine):
    config = RoseConfig(**kwargs)
    assert config.refine == refine
    assert config.to_dict()["refine"] == refine  # the saved recipe says what ran
    assert RoseConfig.from_dict(config.to_dict()) == config


def test_nm_pattern_implies_sparsity():
    assert RoseConfig(pattern="2:4").sparsity == pytest.approx(0.5)
    assert RoseConfig(pattern="4:8", sparsity=0.5).nm == (4, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity=1.0 is outside \[0, 1\)"),
        ({"sparsity": -0.1}, "outside"),
        ({"sparsity": "0.5"}, "must be a number"),
        ({"pattern": "2-4"}, "pattern='2-4' is not understood"),
        ({"pattern": "4:4"}, "0 < N < M"),
        ({"pattern": "2:4", "sparsity": 0.6}, "contradicts pattern='2:4'"),
        ({"method": "obs"}, r"method='obs' is not one of \['rose', 'sparsegpt', 'wanda', 'magnitude'\]"),
        ({"reorder": "sometimes"}, "reorder='sometimes'"),
        ({"blocksize": 0}, "blocksize=0 must be positive"),
        ({"blocksize": 130, "pattern": "2:4"}, "not a multiple of M=4"),
        ({"percdamp": 0.0}, r"percdamp=0.0 must be in \(0, 1\]"),
        ({"reorder_threshold": 1.5}, "reorder_threshold=1.5"),
        ({"targets": "q_proj"}, r"must be a list of regexes"),
        ({"ignore": ["("]}, "not a valid regex"),
        ({"score": "x"}, "score='x'"),
        ({"seed": "abc"}, "seed='abc' must be an int"),
        ({"percdamp": "0.01"}, "percdamp='0.01' must be a number"),
        ({"reorder_threshold": None}, "reorder_threshold=None must be a number"),
    ],
)
def test_bad_values_raise_with_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoseConfig(**kwargs)


def test_risky_values_warn_at_the_callers_line():
    with pytest.warns(UserWarning, match="very high") as caught:
        RoseConfig(sparsity=0.95)
    assert caught[0].filename == __file__  # not the dataclass's generated __init__


def test_errors_name_their_field():
    from rose_hf.config import ConfigError

    with pytest.raises(ConfigError) as info:
        RoseConfig(pattern="2:4", blocksize=130)
    assert info.value.field == "blocksize" and isinstance(info.value, ValueError)


def test_round_trip_and_version_stamp(tmp_path):
    config = RoseConfig(sparsity=0.7, method="sparsegpt", targets=["mlp"], seed=3)
    path = config.save_pretrained(tmp_path)
    data = json.loads(path.read_text())
    assert data["rose_hf_version"] and list(data) == sorted(data)
    assert RoseConfig.from_pretrained(tmp_path) == config
    assert RoseConfig.from_dict(config.to_dict()) == config


def test_unknown_keys_are_dropped_with_a_warning():
    data = RoseConfig().to_dict() | {"future_knob": 1}
    with pytest.warns(UserWarning, match="future_knob"):
        assert RoseConfig.from_dict(data) == RoseConfig()


def test_from_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rose_config.json"):
        RoseConfig.from_pretrained(tmp_path)


def test_true_sequential_is_checked():
    assert RoseConfig(true_sequential=True, method="wanda").true_sequential is True
    with pytest.raises(ValueError, match="true_sequential='yes' must be True or False"):
        RoseConfig(true_sequential="yes")
    with pytest.raises(ValueError, match="method='magnitude': magnitude pruning reads no calibration inputs"):
        RoseConfig(true_sequential=True, method="magnitude")
    with pytest.raises(ValueError, match="objective='dense': the dense objective needs the dense block's inputs"):
        RoseConfig(true_sequential=True, objective="dense")
    assert RoseConfig.from_dict(RoseConfig(true_sequential=True).to_dict()).true_sequential is True


def test_the_default_rotation_is_a_rule_and_an_older_recipe_keeps_none():
    assert RoseConfig().rotation is None and RoseConfig.from_dict(RoseConfig().to_dict()).rotation is None
    assert RoseConfig(method="wanda").rotation == "none" and RoseConfig(rotation="heads").rotation == "heads"
    older = {k: v for k, v in RoseConfig(sparsity=0.6).to_dict().items() if k != "rotation"}  # before the field
    assert RoseConfig.from_dict(older) == RoseConfig(sparsity=0.6, rotation="none")
    with pytest.raises(ValueError, match="rotation='sideways' is not one of"):
        RoseConfig(rotation="sideways")
