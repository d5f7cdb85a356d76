import pytest

from spjax.cli import main
from spjax.config import CONFIGS_DIR, Config, load_config, to_dict, from_dict
from spjax.errors import ConfigError


def test_tiny_config_loads_with_preset_and_overrides():
    config = load_config(CONFIGS_DIR / "tiny.yaml",
                         ["train.steps=7", "optimizer.lr=1e-4", "run_dir=runs/x"])
    assert config.model.name == "tiny" and config.model.d_model == 128
    assert config.train.steps == 7 and config.optimizer.lr == pytest.approx(1e-4)
    assert isinstance(config.optimizer.lr, float)
    assert config.run_dir == "runs/x"


def test_model_preset_override_then_field_override_in_order():
    config = load_config(None, ["model=60m", "model.vocab_size=1000"])
    assert (config.model.name, config.model.d_model, config.model.vocab_size) == ("60m", 512, 1000)
    config = load_config(None, ["model.vocab_size=1000", "model=130m"])
    assert config.model.vocab_size == 32000  # a later preset replaces the whole section


def test_round_trip_through_dict():
    config = load_config(CONFIGS_DIR / "tiny.yaml")
    assert from_dict(Config, to_dict(config)) == config


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("trian.steps=3", "trian"),
    ("sparsity.rigl.drop=0.1", "sparsity.rigl.drop"),
])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("train.progress=maybe", "train.progress"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("model.attention=flash", "model.attention"),
    ("model.remat=yes", "model.remat"),
])
def test_ill_typed_value_is_named(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [
    ("train.steps=0", "train.steps"),
    ("model.n_heads=3", "model.n_heads"),
    ("optimizer.b2=1.5", "optimizer.b2"),
    ("data.batch_size=-2", "data.batch_size"),
])
def test_out_of_range_value_is_named(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 3\n  warmup: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.warmup'"):
        load_config(path)


def test_bad_yaml_and_missing_file_and_unknown_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="model preset 'huge' not found; available: .*60m"):
        load_config(None, ["model=huge"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["train.steps"])


def test_cli_reports_config_error_in_one_line(capsys, tmp_path):
    code = main(["train", str(CONFIGS_DIR / "tiny.yaml"), "train.stepz=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("spjax: error: unknown config key 'train.stepz'")
    assert err.count("\n") == 1 and "Traceback" not in err
