"""ConvNeXt and EfficientNetV2 from keras.applications: they extract into the store like the
others (random weights, small images), and offline ImageNet weights fail with the registry's
message, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.backbones.registry import build_feature_model, get_spec, load_preprocess, resolve_weights
from tasks.data.images import load_rgb
from tasks.data.scan import scan
from tasks.features.extract import ExtractSettings, extract
from tasks.features.store import FeatureStore

MODERN = {"convnext-tiny": 768, "efficientnetv2b0": 1280}  # name -> channels at the default cut


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODERN))
def test_modern_backbone_extracts_at_a_small_size(
    name: str, image_tree: Path, tmp_path: Path
) -> None:
    spec = get_spec(name)
    settings = ExtractSettings(
        backbone=name, weights="none", image_size=spec.min_size, pooling="avg", batch_size=8
    )
    manifest = scan(image_tree)
    store = FeatureStore(str(tmp_path / "store"))
    result = extract(manifest, store, settings)
    assert (result.images_computed, result.images_cached) == (24, 0)
    stored = store.feature_array(result.feature_keys[spec.default_layer]).data[...]
    assert stored.shape == (24, MODERN[name]) and np.isfinite(stored).all()
    # every image its own features (random weights keep them small: ~1e-10 for these two)
    assert len(np.unique(stored, axis=0)) == 24

    # the store holds what the model gives for the images with the backbone's own preprocessing
    model = build_feature_model(
        spec, resolve_weights(spec, "none"), spec.min_size, [spec.default_layer], "avg"
    )
    images = np.stack([load_rgb(path, spec.min_size) for path in manifest.paths()])
    direct = np.asarray(model.predict(load_preprocess(spec)(images), verbose=0))
    np.testing.assert_allclose(stored, direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())
    assert extract(manifest, store, settings).images_computed == 0


OFFLINE = """
import sys
from tasks.backbones.registry import BackboneError, build_base, get_spec, resolve_weights
for name in sys.argv[1:]:
    spec = get_spec(name)
    try:
        build_base(spec, resolve_weights(spec, "imagenet"), spec.default_size)
    except BackboneError as error:
        print(error)
"""


@pytest.mark.slow
def test_offline_imagenet_weights_fail_with_the_registrys_message(tmp_path: Path) -> None:
    """No download is attempted for real: every request goes to a closed local port, and an
    empty KERAS_HOME holds no cached weights."""
    closed = "http://127.0.0.1:9"
    env = {**os.environ, "KERAS_HOME": str(tmp_path), "HTTPS_PROXY": closed, "HTTP_PROXY": closed}
    env.pop("NO_PROXY", None), env.pop("no_proxy", None)
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE, *sorted(MODERN)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[3],
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("ImageNet weights")]
    assert len(lines) == 2, done.stdout + done.stderr[-2000:]
    for name, line in zip(sorted(MODERN), lines, strict=True):
        assert line.startswith(f"ImageNet weights for {name} could not be downloaded (")
        assert "--weights none (random init)" in line
