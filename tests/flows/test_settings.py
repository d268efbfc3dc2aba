"""Settings from flags and YAML/TOML files: merging, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.settings import SettingsError, load_settings


def test_yaml_config_with_flags_winning(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: images\nlayers: block3_pool, block4_pool\nvariance: 0.9\n"
        "classifier-options:\n  svm:\n    param_grid: {C: [1, 10]}\n"
    )
    settings = load_settings(config, variance=0.7, limit_per_class=None)
    assert settings.layers == ("block3_pool", "block4_pool")
    assert settings.variance == 0.7  # the flag wins; None means "not given"
    assert settings.classifier_options == {"svm": {"param_grid": {"C": [1, 10]}}}


def test_toml_config(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'data = "images"\nclassifiers = ["knn"]\nsplit = "grouped"\ngroup_regex = "_(\\\\d+)_"\n'
    )
    settings = load_settings(config)
    assert settings.classifiers == ["knn"] and settings.group_regex == "_(\\d+)_"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"variance": 1.5}, "variance"),
        ({"classifiers": "svm,forest"}, "forest"),
        ({"classifier_options": {"svm": {"grid": 1}}}, "unknown option"),
        ({"colour": "blue"}, "colour"),
        ({"split": "random"}, "split"),
        ({"group_by": "near-copies"}, "^invalid settings: --group-by near-copies needs --split"),
        (
            {"group_by": "near-copies", "split": "grouped", "group_regex": r"_(\d+)_"},
            "one source, but --group-regex and --group-by near-copies both give them$",
        ),
        ({"near_copy_threshold": 1.0}, "near_copy_threshold: Input should be less than 1"),
        ({"group_by": "photos"}, "group_by: Input should be 'auto' or 'near-copies'"),
    ],
)
def test_bad_values_are_named(values: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(**values)


def test_unreadable_or_invalid_config(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.toml"
    broken.write_text("data = [unclosed")
    with pytest.raises(SettingsError, match="not valid"):
        load_settings(broken)
