"""How close floats computed in different processes must be, and why (one statement of it)."""

from __future__ import annotations

import numpy as np

# Features computed in another process may differ in rounding: oneDNN picks other convolution
# kernels for another batch size, thread count or instruction set (a Dask unit of one image vs
# batches of four, an AVX2 CPU vs AVX-512). Measured on VGG16 block1/block2_pool, AVX2, batch 1
# vs 4: at most 1.5e-6 of the array's largest activation (tests/tools/without_avx512.sh).
FEATURE_TOLERANCE = 1e-5


def _atol(expected: np.ndarray) -> float:
    """Every element within FEATURE_TOLERANCE of the largest activation: a relative bound per
    element fails near 0, where the rounding of a large sum leaves a small, noisy remainder."""
    return FEATURE_TOLERANCE * (float(np.abs(expected).max()) if expected.size else 0.0)


def features_close(actual: np.ndarray, expected: np.ndarray) -> bool:
    """Equal within float32 rounding (see FEATURE_TOLERANCE)."""
    return actual.shape == expected.shape and np.allclose(actual, expected, 0, _atol(expected))


def assert_features_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """As features_close, with numpy's report of the largest differences when it fails."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=_atol(expected))
