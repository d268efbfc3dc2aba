"""Every registered backbone: its minimum input size is exact, and too small an input is refused
with a message, at settings validation already (before Prefect or any image)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.settings import SettingsError, load_settings
from tasks.backbones.registry import (
    BACKBONES,
    BackboneError,
    build_base,
    build_feature_model,
    check_input_size,
    get_spec,
    resolve_weights,
)

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_min_size_keeps_every_layer_non_empty(name: str) -> None:
    spec = BACKBONES[name]
    base = build_base(spec, resolve_weights(spec, "none"), spec.min_size)
    empty = [layer.name for layer in base.layers if any(dim == 0 for dim in layer.output.shape[1:])]
    assert not empty  # so any layer is a valid cut at min_size (and at every larger size)
    model = build_feature_model(
        spec, resolve_weights(spec, "none"), spec.min_size, [spec.default_layer]
    )
    assert model.outputs[0].shape[-1] > 0


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_one_pixel_below_min_size_is_refused(name: str) -> None:
    spec = BACKBONES[name]
    message = f"too small for {name}: its layers need at least {spec.min_size} px"
    with pytest.raises(BackboneError, match=message):
        check_input_size(spec, spec.min_size - 1)
    with pytest.raises(BackboneError, match=message):
        build_feature_model(
            spec, resolve_weights(spec, "none"), spec.min_size - 1, [spec.default_layer]
        )
    with pytest.raises(SettingsError, match=message):
        load_settings(backbone=name, image_size=spec.min_size - 1)
    assert load_settings(backbone=name, image_size=spec.min_size).image_size == spec.min_size


def test_unknown_backbone_fails_at_validation_listing_the_known_ones() -> None:
    with pytest.raises(SettingsError, match="unknown backbone 'vgg17'; choose one of vgg16, "):
        load_settings(backbone="vgg17")
    assert get_spec("VGG16") is get_spec("vgg16")  # names are case-insensitive
    load_settings(backbone="VGG16")


def test_resolving_backbones_and_weights_does_not_import_tensorflow() -> None:
    """Names, sizes, weights identities and validated settings (all a cached run needs) come
    without the TensorFlow import; Lite0's offline ImageNet file included."""
    script = textwrap.dedent(
        """
        import sys
        from flows.settings import load_settings
        from tasks.backbones.registry import BACKBONES, resolve_weights
        for spec in BACKBONES.values():
            for weights in ("imagenet", "none", *spec.offline_weights):
                resolve_weights(spec, weights)
                load_settings(backbone=spec.name, weights=weights, image_size=spec.min_size)
        print(sorted(m for m in sys.modules if m.split(".")[0] in {"tensorflow", "keras"}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
