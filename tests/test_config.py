"""Config parsing, overrides and one-line errors."""

from __future__ import annotations

import pytest

from frozen_prefix.config import Config, SourceConfig, load_config, save_config
from frozen_prefix.errors import ConfigError

from .conftest import ROOT, TINY


def test_defaults_and_yaml_round_trip(tmp_path):
    config = load_config(TINY)
    assert config.model.lm == "tiny-gpt2"
    assert config.data.train == SourceConfig(kind="shapes", split="train", size=256)
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_dotted_overrides_parse_types():
    overrides = ["train.lr=3e-4", "model.prefix_length=7", "train.progress=true", "model.mlp_hidden=null"]
    config = load_config(TINY, overrides)
    assert config.train.lr == pytest.approx(3e-4) and isinstance(config.train.lr, float)
    assert config.model.prefix_length == 7
    assert config.train.progress is True


def test_short_source_forms():
    config = load_config(None, ["data.train=data/train.jsonl", "data.val=shapes:val", "data.val.size=10"])
    assert config.data.train == SourceConfig(kind="jsonl", path="data/train.jsonl")
    assert config.data.val == SourceConfig(kind="shapes", split="val", size=10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.encdoer=resnet18"], "unknown config key 'model.encdoer'"),
        (["trian.lr=1"], "unknown config key 'trian'"),
        (["train.batch_size=big"], "train.batch_size: expected int"),
        (["train.batch_size=2.5"], "train.batch_size: expected int"),
        (["train.progress=maybe"], "train.progress: expected true or false"),
        (["model.projection=conv"], "model.projection: 'conv' is not one of"),
        (["model.prefix_length=0"], "model.prefix_length: must be > 0"),
        (["train.lr=-1"], "train.lr: must be > 0"),
        (["train.warmup_steps=-1"], "train.warmup_steps: must be >= 0"),
        (["data.train=images.csv"], "data.train: cannot tell the kind"),
        (["data.train.kind=coco"], "data.train.path: a coco source needs a path"),
        (["model.image_mean=[0.5]"], "model.image_mean: give 3 values"),
        (["eval.splits=[nope]"], "eval.splits: unknown split 'nope'"),
        (["lr"], "not of the form section.key=value"),
    ],
)
def test_bad_values_give_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("model.prefx_length=3", "did you mean model.prefix_length"),
        ("trian.lr=1", "did you mean train?"),
        ("data.train.sise=5", "did you mean data.train.size?"),
        ("eval.vqa.shot=[1]", "did you mean eval.vqa.shots?"),
        ("model.zzzzzz=1", "`frozen-prefix config` lists the keys of model"),
    ],
)
def test_unknown_keys_name_the_nearest_known_ones(override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    message = str(err.value)
    assert message.startswith("unknown config key '") and suggestion in message
    assert "\n" not in message and len(message) < 160, message  # not every key of the section


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_object_passes_through():
    config = Config()
    assert load_config(config, ["train.seed=3"]).train.seed == 3
    assert config.train.seed == 0  # the original is not modified


def test_configs_saved_with_the_retired_keys_still_load():
    """Every config.yaml an earlier version saved names model.cell_embeddings etc. (false): such models still load."""
    old = {"model": {"cell_embeddings": False, "cell_positions": False, "prefix_norm": False, "prefix_length": 3}}
    assert load_config(old).model.prefix_length == 3
    with pytest.raises(ConfigError, match=r"model.cell_positions=True was retired .*; remove the key"):
        load_config({"model": {"cell_positions": True}})


def test_the_pretrained_recipe_is_the_default_with_its_encoder_swapped():
    """configs/shapes_pretrained.yaml differs from configs/shapes.yaml only where docs/pretrained_encoders.md says."""
    default = load_config(ROOT / "configs" / "shapes.yaml").to_dict()
    pretrained = load_config(ROOT / "configs" / "shapes_pretrained.yaml").to_dict()
    changed = {
        f"{section}.{key}": value
        for section, values in pretrained.items()
        for key, value in (values.items() if isinstance(values, dict) else [])
        if default[section].get(key) != value
    }
    assert changed == {
        "model.encoder": "efficientnet-lite0",
        "model.image_std": [0.5, 0.5, 0.5],
        "train.encoder_lr": 1e-3,
        "train.output_dir": "runs/shapes_pretrained",
    }
