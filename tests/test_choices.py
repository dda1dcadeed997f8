"""Every enumerated choice is declared once, in rmib.choices: the CLI offers exactly those."""

from __future__ import annotations

import dataclasses
import typing

import click
import pytest

from rmib import choices
from rmib.cli import cli
from rmib.config import TrainConfig
from rmib.methods.classifier.config import PretrainConfig
from rmib.methods.segment_config import Dual2NetConfig, SegmentConfig

# The choices tuple of each option, by option name; `(command, option)` where
# one name means different things in different commands.
BY_OPTION = {
    "on_bad": choices.ON_BAD,
    "optimizer": choices.OPTIMIZERS,
    "weight_decay_mode": choices.WEIGHT_DECAY_MODES,
    "lr_schedule": choices.LR_SCHEDULES,
    "strategy": choices.STRATEGIES,
    "backbone": choices.BACKBONES,
    "cbam_init": choices.CBAM_INITS,
    "lesion": choices.LESIONS,
    "model": choices.SEGMENT_MODELS,
    "loss": choices.SEGMENT_LOSSES,
    "variant": choices.DUAL2NET_VARIANTS,
    "output_stride": choices.OUTPUT_STRIDES,
    "grades": choices.GRADE_COUNTS,
    "global_net": choices.GLOBAL_NETS,
    "split": choices.EVALUATION_SPLITS,
    "export_format": choices.EXPORT_FORMATS,
    "tta": choices.TTA,
}
BY_COMMAND = {
    ("data inspect", "layout"): choices.DATASET_LAYOUTS,
    ("data synth", "layout"): choices.SYNTHETIC_LAYOUTS,
    ("pretrain", "precision"): choices.PRECISIONS,
    ("segment", "precision"): choices.PRECISIONS,
    ("grade train", "precision"): choices.PRECISIONS,
    ("predict", "precision"): choices.PREDICT_PRECISIONS,
    ("evaluate", "precision"): choices.PREDICT_PRECISIONS,
    ("export", "precision"): choices.PREDICT_PRECISIONS,
}


def _choice_options(command, path=()):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _choice_options(sub, (*path, name))
        return
    for param in command.params:
        if isinstance(param.type, click.Choice):
            yield " ".join(path), param


CHOICE_OPTIONS = list(_choice_options(cli))


def test_the_cli_has_choice_options():
    assert len(CHOICE_OPTIONS) >= 20  # a walk that found nothing would pass the test below


@pytest.mark.parametrize(
    ("command", "param"), CHOICE_OPTIONS, ids=[f"{c}:{p.name}" for c, p in CHOICE_OPTIONS]
)
def test_every_cli_choice_is_a_choices_tuple(command, param):
    expected = BY_COMMAND.get((command, param.name), BY_OPTION.get(param.name))
    assert expected is not None, (
        f"`rmib {command}` --{param.name} offers a click.Choice that no rmib.choices tuple "
        "declares: add it to rmib/choices.py and to this test"
    )
    assert list(param.type.choices) == [str(c) for c in expected]


def _literal_fields(config_class):
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if typing.get_origin(hints[field.name]) is typing.Literal:
            yield field.name, typing.get_args(hints[field.name])


@pytest.mark.parametrize(
    ("config_class", "field", "expected"),
    [
        (TrainConfig, "precision", choices.PRECISIONS),
        (TrainConfig, "strategy", choices.STRATEGIES),
        (PretrainConfig, "backbone", choices.BACKBONES),
        (PretrainConfig, "augment", choices.AUGMENT),
        (SegmentConfig, "lesion", choices.LESIONS),
        (SegmentConfig, "preprocessing", choices.PREPROCESSING),
        (SegmentConfig, "on_bad", choices.ON_BAD),
        (Dual2NetConfig, "head", choices.DUAL2NET_HEADS),
    ],
)
def test_config_literals_are_the_choices(config_class, field, expected):
    assert dict(_literal_fields(config_class))[field] == expected


def test_old_names_are_aliases_of_the_choices():
    import rmib
    from rmib.data import fundus, readers, synthetic
    from rmib.methods import segment_config
    from rmib.models import BACKBONES

    assert rmib.LESIONS is choices.LESIONS
    assert segment_config.LESION_CODES is choices.LESIONS
    assert readers.ON_BAD_CHOICES is choices.ON_BAD
    assert readers.LAYOUTS is choices.DATASET_LAYOUTS
    assert readers.MASK_TYPES is choices.MASK_TYPES
    assert synthetic.LAYOUTS is choices.SYNTHETIC_LAYOUTS
    assert fundus.PREPROCESSING_METHODS is choices.PREPROCESSING
    assert BACKBONES is choices.BACKBONES


def test_choices_module_imports_nothing():
    # `rmib --help` imports it: it must stay a list of constants.
    source = open(choices.__file__).read()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["from __future__ import annotations"]
