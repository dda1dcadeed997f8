"""rmib.config: TOML configs with flag overrides, and the TOML writer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import tomllib

from rmib.config import (
    TrainConfig,
    dump_config,
    dump_toml,
    load_config,
)
from rmib.errors import RmibError


@dataclasses.dataclass
class DataSection:
    root: str = "data"
    image_size: int = 480
    lesions: list[str] = dataclasses.field(default_factory=lambda: ["EX"])
    crop: tuple[int, int] | None = None
    seed: int = 0


@dataclasses.dataclass
class Recipe:
    name: str = "demo"
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)


def write(tmp_path, text, name="recipe.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- loading


def test_defaults_without_file_or_overrides():
    assert load_config(TrainConfig) == TrainConfig()
    assert TrainConfig().momentum == 0.9 and TrainConfig().weight_decay == 0.0


def test_file_values_then_overrides_and_none_ignored(tmp_path):
    path = write(tmp_path, 'epochs = 7\noptimizer = "sgd"\nlearning_rate = 0.03\n')
    cfg = load_config(TrainConfig, path, {"epochs": 3, "learning_rate": None, "seed": None})
    assert cfg.epochs == 3  # the flag wins
    assert cfg.learning_rate == 0.03  # None: flag not given, the file's value stays
    assert cfg.optimizer == "sgd"
    assert cfg.seed == 42  # default


def test_nested_sections_and_override_keys(tmp_path):
    path = write(
        tmp_path,
        'name = "ex"\n[train]\nepochs = 2\nlr_schedule = "poly"\n'
        '[data]\nimage_size = 160\nlesions = ["EX", "MA"]\ncrop = [10, 20]\n',
    )
    cfg = load_config(
        Recipe, path, {"batch_size": 4, "data.root": "/d", "train.epochs": 5, "name": None}
    )
    assert cfg.name == "ex"
    assert cfg.train.epochs == 5 and cfg.train.batch_size == 4
    assert cfg.train.lr_schedule == "poly"
    assert cfg.data == DataSection(root="/d", image_size=160, lesions=["EX", "MA"], crop=(10, 20))


def test_ambiguous_or_unknown_override_is_a_programming_error():
    with pytest.raises(ValueError, match="ambiguous"):
        load_config(Recipe, None, {"seed": 1})  # train.seed and data.seed
    with pytest.raises(ValueError, match="not a field"):
        load_config(TrainConfig, None, {"epochz": 1})


def test_unknown_key_names_file_key_and_valid_keys(tmp_path):
    path = write(tmp_path, "epochs = 2\nlearnin_rate = 0.1\n")
    with pytest.raises(RmibError) as err:
        load_config(TrainConfig, path)
    message = str(err.value)
    assert str(path) in message and "learnin_rate" in message
    assert "learning_rate" in message and "batch_size" in message  # valid keys listed


def test_unknown_key_in_a_section_and_unknown_section(tmp_path):
    path = write(tmp_path, "[train]\nepoch = 2\n")
    with pytest.raises(RmibError, match=r"train\.epoch.*\[train\].*epochs"):
        load_config(Recipe, path)
    path = write(tmp_path, "[model]\nbackbone = 'vgg16'\n", "other.toml")
    with pytest.raises(RmibError, match=r"other\.toml: unknown key 'model'.*data, name, train"):
        load_config(Recipe, path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('epochs = "ten"', r"epochs must be an integer, got 'ten'"),
        ("epochs = true", r"epochs must be an integer, got True"),
        ("epochs = 2.5", r"epochs must be an integer, got 2.5"),
        ('optimizer = "rmsprop"', r"optimizer must be one of 'adam', 'sgd', got 'rmsprop'"),
        ('precision = "fp16"', r"precision must be one of 'auto', 'float32', 'mixed_float16'"),
        ("deterministic = 3", r"deterministic must be true or false, got 3"),
        ("learning_rate = [1]", r"learning_rate must be a number"),
        ("epochs = 0", r"epochs must be at least 1, got 0"),
        ("plateau_factor = 1.5", r"plateau_factor must be in \(0, 1\), got 1.5"),
        ("steps_per_epoch = 0", r"steps_per_epoch must be at least 1"),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path, text, pattern):
    path = write(tmp_path, text + "\n")
    with pytest.raises(RmibError, match=pattern) as err:
        load_config(TrainConfig, path)
    assert str(err.value).startswith(str(path))


def test_bad_value_in_section_and_from_flags(tmp_path):
    path = write(tmp_path, "[data]\nimage_size = 'big'\n")
    with pytest.raises(RmibError, match=r"data\.image_size must be an integer, got 'big'"):
        load_config(Recipe, path)
    with pytest.raises(RmibError, match=r"train\.epochs must be at least 1.*command line"):
        load_config(Recipe, None, {"epochs": -1})
    with pytest.raises(RmibError, match=r"must be a list of 2 values"):
        load_config(Recipe, None, {"crop": [1, 2, 3]})


def test_coercions():
    cfg = load_config(
        TrainConfig,
        None,
        {"learning_rate": 1, "epochs": "4", "tensorboard": "no", "batch_size": 16.0},
    )
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.epochs == 4 and cfg.batch_size == 16 and isinstance(cfg.batch_size, int)
    assert cfg.tensorboard is False


def test_direct_construction_is_checked_too():
    with pytest.raises(RmibError, match="optimizer must be one of"):
        TrainConfig(optimizer="adamw")
    with pytest.raises(RmibError, match="momentum must be in"):
        TrainConfig(momentum=1.0)


def test_monitor_mode_auto():
    assert TrainConfig(monitor="val_loss").resolved_monitor_mode == "min"
    assert TrainConfig(monitor="val_auc").resolved_monitor_mode == "max"
    assert TrainConfig(monitor="val_auc", monitor_mode="min").resolved_monitor_mode == "min"


def test_missing_and_invalid_toml(tmp_path):
    with pytest.raises(RmibError, match="nope.toml: config file not found"):
        load_config(TrainConfig, tmp_path / "nope.toml")
    path = write(tmp_path, "epochs = = 2\n")
    with pytest.raises(RmibError, match=r"recipe\.toml: not valid TOML"):
        load_config(TrainConfig, path)


# --------------------------------------------------------------------------- writing


def test_dump_toml_round_trips_through_tomllib():
    data = {
        "name": 'quote " backslash \\ newline \n tab \t ctrl \x01 del \x7f ünï 😀',
        "count": -12345678901234,
        "zero": 0,
        "ratio": 0.1,
        "tiny": 1e-300,
        "huge": 1.5e300,
        "negative_zero": -0.0,
        "whole": 3.0,
        "infinite": math.inf,
        "minus_infinite": -math.inf,
        "yes": True,
        "no": False,
        "empty": [],
        "numbers": [1, 2, 3],
        "nested_list": [[1, 2], ["a"], []],
        "tuple": (1.5, "x"),
        "records": [{"a": 1, "b": "two"}, {"c": [True]}],
        "a b": "key with a space",
        "dotted.key": 1,
        "ключ": "unicode key",
        "skipped": None,
        "train": {
            "epochs": 3,
            "inner": {"deep": {"value": "x"}, "list": [0.5]},
            "after_table": "scalar written before sub-tables",
        },
        "empty_table": {},
    }
    text = dump_toml(data)
    parsed = tomllib.loads(text)
    expected = dict(data)
    del expected["skipped"]
    expected["tuple"] = [1.5, "x"]
    assert parsed == expected
    assert math.copysign(1.0, parsed["negative_zero"]) == -1.0


def test_dump_toml_nan_and_errors():
    assert math.isnan(tomllib.loads(dump_toml({"x": math.nan}))["x"])
    with pytest.raises(TypeError, match="None"):
        dump_toml({"x": [1, None]})
    with pytest.raises(TypeError, match="object"):
        dump_toml({"x": object()})


def test_dump_config_round_trip(tmp_path):
    cfg = Recipe(
        name="r",
        train=TrainConfig(epochs=3, optimizer="sgd", steps_per_epoch=5),
        data=DataSection(lesions=["HE"], crop=(1, 2)),
    )
    path = write(tmp_path, dump_config(cfg), "config.toml")
    assert load_config(Recipe, path) == cfg
    assert "validation_steps" not in path.read_text()  # None values are left out


# --------------------------------------------------------------------------- colour_jitter


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_colour_jitter_out_of_range_is_refused_naming_the_key(tmp_path, value):
    from rmib.methods.classifier.config import PretrainConfig
    from rmib.methods.segment_config import SegmentConfig

    path = write(tmp_path, f"colour_jitter = {value}\n")
    for cls in (SegmentConfig, PretrainConfig):
        with pytest.raises(RmibError, match=rf"colour_jitter must be in \[0, 1\).*got {value}"):
            load_config(cls, path)
    with pytest.raises(RmibError, match=r"colour_jitter must be .*command line"):
        load_config(SegmentConfig, None, {"colour_jitter": float(value)})


def test_colour_jitter_loads_and_is_off_by_default(tmp_path):
    from rmib.methods.classifier.config import PretrainConfig
    from rmib.methods.segment_config import SegmentConfig

    assert SegmentConfig().colour_jitter == 0.0 and PretrainConfig().colour_jitter == 0.0
    cfg = load_config(SegmentConfig, write(tmp_path, "colour_jitter = 0.1\n"))
    assert cfg.colour_jitter == 0.1
    assert load_config(SegmentConfig, None, {"colour_jitter": 0}).colour_jitter == 0.0
    # The other segmenters' pipelines have no jitter: refused, not ignored.
    path = write(tmp_path, 'model = "dual2net"\ncolour_jitter = 0.1\n', "dual2net.toml")
    with pytest.raises(RmibError, match=r"colour_jitter must be 0 with --model dual2net"):
        load_config(SegmentConfig, path)
