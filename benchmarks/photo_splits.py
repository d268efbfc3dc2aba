"""Labels CSVs with a train/valid/test `split` column drawn by photo (or field), for the
photo-level accuracy of the blood cells.

Whole groups (the `group` column of a photo-map CSV, e.g. fields of overlapping photos from
benchmarks/photo_map.py) go to one side: per class, a seeded 25 % of its groups to test and
20 % of the rest to valid (early stopping of `finetune`; classical classifiers train on it too).
A group whose images carry two labels goes where the label of most of its images sends it.
`--train-per-class N` keeps at most N train+valid images per class, spread evenly over the
class's photos (copies of one photo are redundant; this makes a fine-tuning epoch cheap); test
keeps every image, so runs with and without the cap are scored on the same images.

    .venv/bin/python -m benchmarks.photo_splits --photos fields.csv --seeds 0,1,2 \\
        --out-dir OUT [--train-per-class 400]
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

TEST_SHARE = 0.25
VALID_SHARE = 0.2


def group_sides(rows: list[dict], seed: int) -> dict[str, str]:
    """group -> train/valid/test, drawn per class of the group's majority label."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        votes[row["group"]][row["label"]] += 1
    by_class: dict[str, list[str]] = defaultdict(list)
    for group in sorted(votes):
        by_class[votes[group].most_common(1)[0][0]].append(group)
    rng = np.random.default_rng(seed)
    side = {}
    for label in sorted(by_class):
        groups = list(rng.permutation(by_class[label]))
        n_test = max(1, round(TEST_SHARE * len(groups)))
        n_valid = max(1, round(VALID_SHARE * (len(groups) - n_test)))
        for i, group in enumerate(groups):
            side[group] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return side


def capped(rows: list[dict], per_class: int, seed: int) -> list[dict]:
    """At most per_class rows per class, taken round-robin over the class's photos."""
    rng = np.random.default_rng(seed)
    kept = []
    for label in sorted({r["label"] for r in rows}):
        photos: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            if row["label"] == label:
                photos[row["photo"]].append(row)
        queues = [list(rng.permutation(len(p))) for p in photos.values()]
        lists = list(photos.values())
        taken = 0
        while taken < per_class and any(queues):
            for queue, members in zip(queues, lists, strict=True):
                if queue and taken < per_class:
                    kept.append(members[queue.pop()])
                    taken += 1
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True, help="path,label,group CSV")
    parser.add_argument(
        "--photo-of", type=Path, help="path,label,group CSV of single photos, for the cap's spread"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--train-per-class", type=int, default=0, help="cap (0: none)")
    args = parser.parse_args()

    with args.photos.open(newline="") as f:
        rows = list(csv.DictReader(f))
    photo = {r["path"]: r["group"] for r in rows}
    if args.photo_of:
        with args.photo_of.open(newline="") as f:
            photo = {r["path"]: r["group"] for r in csv.DictReader(f)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        side = group_sides(rows, seed)
        table = [{**r, "split": side[r["group"]], "photo": photo[r["path"]]} for r in rows]
        test = [r for r in table if r["split"] == "test"]
        fit = [r for r in table if r["split"] != "test"]
        if args.train_per_class:
            fit = capped(fit, args.train_per_class, seed)
        both = {r["photo"] for r in test} & {r["photo"] for r in fit}
        both_groups = {r["group"] for r in test} & {r["group"] for r in fit}
        cap = f"-cap{args.train_per_class}" if args.train_per_class else ""
        out = args.out_dir / f"photo-split-seed{seed}{cap}.csv"
        with out.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split"])
            writer.writerows([r["path"], r["label"], r["split"]] for r in fit + test)
        count = Counter(r["split"] for r in fit + test)
        print(
            f"{out.name}: {dict(sorted(count.items()))} images, test photos "
            f"{len({r['photo'] for r in test})}, photos on both sides {len(both)}, "
            f"groups on both sides {len(both_groups)}"
        )


if __name__ == "__main__":
    main()
