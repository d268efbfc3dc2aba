"""How well does a cosine rule on stored features find near-copies? Scored against a photo map.

Ground truth is a `path,label,group` CSV whose group is each image's source photo (or field of
overlapping photos), e.g. from benchmarks/photo_map.py. The rules are the product's own
(tasks/features/near_copies.py): the nearest-neighbour similarity used by every run's leak
check, and the connected components of the 10-nearest-neighbour graph at `cosine >= t` used by
`--group-by near-copies`; a mutual-kNN variant (an edge only when each row is among the other's
10 nearest) is scored too. Per threshold it prints:

* nn: share of images whose nearest image is at or above t (coverage) and, of those, the share
  whose nearest image is a copy of the same photo (precision);
* groups: number of components, largest share, pair recall (share of same-photo image pairs in
  one component), share of components mixing photos, and the leak left by a 75/25 split of the
  components: share of test images whose photo also has images in training;
* check: share of test images the leak check flags on a leak-free split by photo (false alarms)
  and on a random split (where every photo leaks).

Then a data-relative leak check for several splits and seeds: t = the `--relative-quantile`
of the training rows' leave-one-out nearest-training cosine, and the share of test rows at or
above t divided by (1 - quantile): about 1 when test rows are like training rows (leaky), near
0 when no test photo has copies in training. `--group-regex` adds the split by that file-name
group, as `--split grouped --group-regex` makes it.

    nice -n 10 .venv/bin/python -m benchmarks.near_copy_rule --store STORE --key KEY \\
        --photos photos.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np

from tasks.features.near_copies import NEIGHBOURS, near_copy_groups, nearest, unit_rows
from tasks.features.store import FeatureStore


def photo_ids(store: FeatureStore, key: str, photos_csv: Path) -> np.ndarray:
    """The photo (group) of every stored row, as integer ids, from the manifest's paths."""
    with photos_csv.open(newline="") as f:
        group = {r["path"]: r["group"] for r in csv.DictReader(f)}
    records = store.manifest_for(key).records
    names = sorted(set(group.values()))
    ids = {name: i for i, name in enumerate(names)}
    return np.array([ids[group[r.path]] for r in records])


def pairs(counts: np.ndarray) -> float:
    return float((counts * (counts - 1) / 2).sum())


def component_scores(groups: np.ndarray, photo: np.ndarray, rng: np.random.Generator) -> dict:
    """Pair recall, mixing and the leak of a 75/25 split of these components."""
    both = np.unique(np.stack([groups, photo]), axis=1, return_counts=True)
    together = pairs(both[1])
    recall = together / pairs(np.bincount(photo))
    photos_per_group = np.bincount(both[0][0])
    order = rng.permutation(groups.max() + 1)
    test_groups = order[: len(order) // 4]
    test = np.isin(groups, test_groups)
    leaked = np.isin(photo[test], np.unique(photo[~test]))
    return {
        "groups": int(groups.max() + 1),
        "largest": round(float(np.bincount(groups).max() / len(groups)), 4),
        "pair_recall": round(recall, 4),
        "mixed_groups": round(float((photos_per_group > 1).mean()), 4),
        "split_leak": round(float(leaked.mean()), 4) if test.any() else None,
    }


def mutual_groups(index: np.ndarray, sims: np.ndarray, threshold: float) -> np.ndarray:
    """Components of the graph with an edge only between mutual k-nearest rows at >= t."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(index)
    src, slot = np.nonzero(sims >= threshold)
    dst = index[src, slot]
    neighbours = {(int(a), int(b)) for a, b in zip(src, dst, strict=True)}
    keep = np.array([(int(b), int(a)) in neighbours for a, b in zip(src, dst, strict=True)])
    keep = keep if len(keep) else np.zeros(0, bool)
    graph = coo_matrix((np.ones(keep.sum()), (src[keep], dst[keep])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def check_shares(rows: np.ndarray, photo: np.ndarray, rng: np.random.Generator) -> tuple:
    """Nearest-training similarities of test rows: on a split by photo, and a random split."""
    photos = rng.permutation(photo.max() + 1)
    by_photo = np.isin(photo, photos[: len(photos) // 4])
    by_image = rng.random(len(photo)) < 0.25
    out = []
    for test in (by_photo, by_image):
        _, sim = nearest(rows[test], rows[~test], 1)
        out.append(sim[:, 0])
    return tuple(out)


def relative_leak(rows: np.ndarray, test: np.ndarray, quantile: float) -> float:
    """Share of test rows whose nearest training row is at least the quantile of the training
    rows' own nearest-neighbour cosine, over the share a leaky test set would give."""
    train = rows[~test]
    _, own = nearest(train, train, 1, own=np.arange(len(train)))
    _, theirs = nearest(rows[test], train, 1)
    threshold = np.quantile(own[:, 0], quantile)
    return float((theirs[:, 0] >= threshold).mean() / (1 - quantile))


def relative_table(
    rows: np.ndarray, photo: np.ndarray, regex_group: np.ndarray | None, seeds: int, q: float
) -> dict:
    """relative_leak per seed for splits by photo, half-leaky, by regex group and random."""
    table: dict[str, list[float]] = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        photos = rng.permutation(photo.max() + 1)
        by_photo = np.isin(photo, photos[: len(photos) // 4])
        half = by_photo.copy()  # half the test photos: their copies spread over both sides
        leaking = np.isin(photo, photos[: len(photos) // 8])
        half[leaking] = rng.random(leaking.sum()) < 0.5
        splits = {"by photo": by_photo, "half the test photos leak": half}
        if regex_group is not None:
            groups = rng.permutation(regex_group.max() + 1)
            splits["by regex group"] = np.isin(regex_group, groups[: len(groups) // 4])
        splits["random"] = rng.random(len(photo)) < 0.25
        for name, test in splits.items():
            table.setdefault(name, []).append(round(relative_leak(rows, test, q), 3))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="feature store")
    parser.add_argument("--key", required=True, help="feature key (or unique prefix)")
    parser.add_argument("--photos", type=Path, required=True, help="path,label,group CSV")
    parser.add_argument(
        "--thresholds",
        default="0.8,0.85,0.9,0.92,0.94,0.95,0.96,0.97,0.98",
        help="comma list of cosine thresholds",
    )
    parser.add_argument(
        "--quantiles",
        default="0.05,0.1,0.25,0.5",
        help="data-relative thresholds: these quantiles of the nearest-neighbour similarities",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relative-quantile", type=float, default=0.25)
    parser.add_argument("--relative-seeds", type=int, default=3, help="splits per kind")
    parser.add_argument("--group-regex", help="also score the split by this file-name group")
    args = parser.parse_args()

    store = FeatureStore(args.store, mode="r")
    key = store.find(args.key)[1]
    photo = photo_ids(store, key, args.photos)
    rows = unit_rows(store.feature_array(key).data)
    index, sims = nearest(rows, rows, NEIGHBOURS, own=np.arange(len(rows)))
    same_nn = photo[index[:, 0]] == photo
    nn = sims[:, 0]
    quantiles = [float(q) for q in args.quantiles.split(",") if q]
    print(
        json.dumps(
            {
                "rows": len(rows),
                "width": rows.shape[1],
                "photos": int(photo.max() + 1),
                "nn_same_photo": round(float(same_nn.mean()), 4),
                "nn_similarity_quantiles": {
                    q: round(float(np.quantile(nn, q)), 4)
                    for q in (0.01, 0.05, 0.1, 0.25, 0.5, 0.9)
                },
            }
        )
    )
    photo_split, random_split = check_shares(rows, photo, np.random.default_rng(args.seed))
    rules = [(float(t), f"{t}") for t in args.thresholds.split(",") if t]
    rules += [(float(np.quantile(nn, q)), f"q{q}") for q in quantiles]
    for threshold, name in rules:
        above = nn >= threshold
        rng = np.random.default_rng(args.seed)
        result = {
            "rule": name,
            "t": round(threshold, 4),
            "nn_coverage": round(float(above.mean()), 4),
            "nn_precision": round(float(same_nn[above].mean()), 4) if above.any() else None,
            "knn": component_scores(near_copy_groups(rows, threshold).groups, photo, rng),
            "mutual": component_scores(mutual_groups(index, sims, threshold), photo, rng),
            "check_false_alarm": round(float((photo_split >= threshold).mean()), 4),
            "check_random_split": round(float((random_split >= threshold).mean()), 4),
        }
        print(json.dumps(result), flush=True)
    regex_group = None
    if args.group_regex:
        records = store.manifest_for(key).records
        names = [f"{r.label}/{re.search(args.group_regex, r.path).group(1)}" for r in records]
        regex_group = np.unique(names, return_inverse=True)[1]
    table = relative_table(rows, photo, regex_group, args.relative_seeds, args.relative_quantile)
    print(json.dumps({"relative_quantile": args.relative_quantile, "relative_leak": table}))


if __name__ == "__main__":
    main()
