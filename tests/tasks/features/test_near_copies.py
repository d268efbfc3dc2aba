"""Near-copies on feature rows: exact nearest neighbours in blocks, groups that follow the
copies (and chain when the threshold is loose), and the check every run makes of its test rows."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.features import near_copies
from tasks.features.near_copies import (
    LEAKY_SHARE,
    leak_check,
    near_copy_groups,
    nearest,
    resolve_threshold,
    unit_rows,
)


def _copies(photos: int = 30, copies: int = 5, width: int = 64, noise: float = 0.05, seed=0):
    """Rows of `photos` random 'photos' and `copies` jittered copies of each, and the photo of
    every row (rows of different photos have cosine ~0.75: positive, like ReLU features)."""
    rng = np.random.default_rng(seed)
    base = rng.random((photos, width), dtype=np.float32)
    photo = np.repeat(np.arange(photos), copies)
    rows = base[photo] + noise * rng.random((len(photo), width), dtype=np.float32)
    return rows, photo


def test_unit_rows_are_the_normalised_rows_and_zero_rows_stay_zero() -> None:
    rows, _ = _copies()
    rows[3] = 0.0
    unit = unit_rows(rows)
    expected = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
    np.testing.assert_allclose(unit, expected, atol=1e-6)
    assert not unit[3].any()


def test_wide_rows_are_sketched_keeping_the_cosine_of_near_copies() -> None:
    """A count sketch changes cosines by a little: 0.02 at most here for pairs near 0.95,
    far below the gap between copies (>= 0.99) and other images (~0.75)."""
    rows, photo = _copies(photos=20, copies=2, width=near_copies.SKETCH_WIDTH * 4, noise=0.3)
    exact = unit_rows(rows[:, : near_copies.SKETCH_WIDTH])  # not sketched: as wide as allowed
    assert exact.shape[1] == near_copies.SKETCH_WIDTH
    sketched = unit_rows(rows)
    assert sketched.shape == (len(rows), near_copies.SKETCH_WIDTH)
    full = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    pairs = (full[0::2] * full[1::2]).sum(axis=1)
    assert 0.9 < pairs.min() and pairs.max() < 0.99  # near-copies, not identical
    np.testing.assert_allclose((sketched[0::2] * sketched[1::2]).sum(axis=1), pairs, atol=0.02)


def test_nearest_matches_a_full_product_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = unit_rows(_copies()[0])
    # blocks of 7 query rows: several blocks and a ragged last one
    monkeypatch.setattr(near_copies, "BLOCK_BYTES", 7 * 4 * len(rows))
    full = rows @ rows.T
    np.fill_diagonal(full, -np.inf)
    index, similarity = nearest(rows, rows, 3, own=np.arange(len(rows)))
    np.testing.assert_array_equal(index[:, 0], full.argmax(axis=1))
    np.testing.assert_allclose(similarity[:, 0], full.max(axis=1), atol=1e-6)
    assert (np.diff(similarity, axis=1) <= 0).all()  # most similar first
    assert not (index == np.arange(len(rows))[:, None]).any()  # never itself


def test_groups_are_the_photos_and_a_loose_threshold_chains_them() -> None:
    rows, photo = _copies()
    found = near_copy_groups(unit_rows(rows), threshold=0.99)
    assert found.n_groups == 30 and found.largest_share == pytest.approx(5 / 150)
    # the same partition: one group per photo, whatever the numbering
    assert len(set(zip(found.groups, photo, strict=True))) == 30
    chained = near_copy_groups(unit_rows(rows), threshold=0.5)
    assert chained.n_groups == 1 and chained.largest_share == 1.0
    assert "1 groups for 150 images, the largest holding 100.0%" in chained.describe()


def test_leak_check_finds_copies_across_the_split_and_splits_accuracy() -> None:
    rows, photo = _copies()
    unit = unit_rows(rows)
    by_row = np.arange(len(rows))
    leaky_test = by_row[by_row % 5 == 0]  # one copy of every photo: the others are in training
    clean_test = by_row[photo >= 24]  # six whole photos
    leaky = leak_check(unit, np.setdiff1d(by_row, leaky_test), leaky_test, 0.99)
    clean = leak_check(unit, np.setdiff1d(by_row, clean_test), clean_test, 0.99)
    assert leaky.share == 1.0 and leaky.leaky and clean.share == 0.0 and not clean.leaky
    assert (photo[leaky.nearest_train] == photo[leaky_test]).all()
    assert "100% of the test images have a near-copy" in leaky.warning()
    assert "--group-by near-copies" in leaky.warning() and clean.warning() is None

    y_test = np.arange(len(clean_test)) % 2
    wrong_on_two = y_test.copy()
    wrong_on_two[:2] = 1 - wrong_on_two[:2]
    section = clean.section(y_test, {"svm": y_test, "knn": wrong_on_two})
    assert section["test_with_copy"] == 0 and section["n_test"] == len(clean_test)
    assert section["accuracy_with"] == {"svm": None, "knn": None}  # no such test image
    assert section["accuracy_without"] == {"svm": 1.0, "knn": 1 - 2 / len(clean_test)}


def test_mixed_split_is_leaky_only_above_the_documented_share() -> None:
    rows, photo = _copies()
    unit = unit_rows(rows)
    by_row = np.arange(len(rows))
    # photos 0-9 leak one copy each; photos 20-29 are whole in test: 10 of 60 leak
    test = np.concatenate([by_row[(photo < 10) & (by_row % 5 == 0)], by_row[photo >= 20]])
    check = leak_check(unit, np.setdiff1d(by_row, test), test, 0.99)
    assert check.share == pytest.approx(10 / 60) and check.share < LEAKY_SHARE
    assert check.warning() is None
    section = check.section(photo[test] % 2, {"svm": photo[test] % 2})
    assert section["accuracy_with"] == {"svm": 1.0} and section["test_with_copy"] == 10


def test_auto_threshold_is_the_quantile_of_the_reference_nearest_similarities() -> None:
    reference = np.linspace(0.8, 1.0, 101)
    assert resolve_threshold("auto", reference) == pytest.approx(0.85)
    assert resolve_threshold(0.9, reference) == 0.9


def test_auto_check_tells_a_leaky_split_from_a_split_by_photo() -> None:
    """Scale-free: the same rows shifted to another similarity range (a different backbone,
    say) give the same verdicts, where a fixed cosine would flag everything or nothing."""
    rows, photo = _copies()
    by_row = np.arange(len(rows))
    leaky_test = by_row[by_row % 5 == 0]
    clean_test = by_row[photo >= 22]
    for scale in (1.0, 4.0):  # a common offset makes every cosine higher
        unit = unit_rows(rows + scale)
        leaky = leak_check(unit, np.setdiff1d(by_row, leaky_test), leaky_test, "auto")
        clean = leak_check(unit, np.setdiff1d(by_row, clean_test), clean_test, "auto")
        assert leaky.rule == clean.rule == "auto"
        assert leaky.leak_estimate > 0.9 and leaky.leaky and "leak estimate" in leaky.warning()
        assert clean.leak_estimate < 0.1 and clean.warning() is None
        fixed = leak_check(unit, np.setdiff1d(by_row, clean_test), clean_test, 0.99)
        assert fixed.leaky == (scale > 1.0)  # a fixed cosine depends on the range
        section = leaky.section(photo[leaky_test] % 2, {"svm": photo[leaky_test] % 2})
        assert section["rule"] == "auto" and section["threshold"] == leaky.threshold
        assert section["leak_estimate"] == pytest.approx(min(1.0, leaky.share / 0.75))


def test_auto_groups_follow_the_photos() -> None:
    rows, photo = _copies()
    found = near_copy_groups(unit_rows(rows), "auto")
    assert found.rule == "auto" and 0.9 < found.threshold < 1.0
    assert len(set(zip(found.groups, photo, strict=True))) == found.n_groups  # none mixes photos
    assert found.largest_share == pytest.approx(5 / 150)
