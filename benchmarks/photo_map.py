"""Benchmark data: the source photo of every augmented blood-cell TRAIN image.

TRAIN's images are augmented copies (rotation, shift, shear, flips, resize) of the photos in
ORIGINALS, and their file names carry no photo, so a split by file leaks near-copies. This
finds each image's photo by geometry, not by looks: SIFT keypoints on the contrast-equalised
green channel (where the stain contrast is), a kNN vote against all photos of the image's
class (each photo also mirrored, since SIFT is rotation- but not mirror-invariant) to shortlist
a few candidates, then a RANSAC affine fit per candidate; the photo with most inliers wins.
The margin to the runner-up tells how sure a match is.

Writes `--out` as the `path,label,group` labels CSV that `--labels` reads (group = photo stem)
and `--evidence` with the inlier counts of the best and second-best photo per image.

    nice -n 10 .venv/bin/python -m benchmarks.photo_map --train DATA/TRAIN \\
        --originals DATA/ORIGINALS --out photos.csv --evidence photos-evidence.csv --workers 2
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SIZE = (320, 240)  # TRAIN's size; photos are shrunk to it so keypoint scales agree
RATIO = 0.8  # Lowe's ratio test
SHORTLIST = 3  # photos verified by RANSAC per image


@dataclass
class Keypoints:
    """Keypoint positions (n x 2) and SIFT descriptors (n x 128) of one image."""

    xy: np.ndarray
    desc: np.ndarray


def keypoints(image: np.ndarray, sift: cv2.SIFT) -> Keypoints:
    """SIFT on the CLAHE-equalised green channel of a BGR image at TRAIN's size."""
    green = cv2.resize(image, SIZE, interpolation=cv2.INTER_AREA)[:, :, 1]
    green = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(green)
    kps, desc = sift.detectAndCompute(green, None)
    if desc is None:
        return Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
    return Keypoints(np.float32([k.pt for k in kps]), desc.astype(np.float32))


class ClassIndex:
    """All photos of one class (plain and mirrored) in one FLANN index, for the vote."""

    def __init__(self, photos: list[Path], sift: cv2.SIFT) -> None:
        self.stems = [p.stem for p in photos]
        self.variants: list[tuple[int, Keypoints]] = []  # (photo index, keypoints)
        for i, path in enumerate(photos):
            image = cv2.imread(str(path))
            for flipped in (image, cv2.flip(image, 1)):
                self.variants.append((i, keypoints(flipped, sift)))
        self.owner = np.concatenate(
            [np.full(len(k.desc), v, np.int32) for v, (_, k) in enumerate(self.variants)]
        )
        self.flann = cv2.FlannBasedMatcher({"algorithm": 1, "trees": 4}, {"checks": 32})
        self.flann.add([np.concatenate([k.desc for _, k in self.variants])])
        self.flann.train()
        self.brute = cv2.BFMatcher(cv2.NORM_L2)

    def shortlist(self, query: Keypoints, exclude: int = -1) -> list[int]:
        """Variants of the SHORTLIST photos with most ratio-test matches, best variant each;
        photo `exclude` (the query itself, when photos are matched to each other) is skipped."""
        votes: Counter[int] = Counter()
        for found in self.flann.knnMatch(query.desc, k=2 if exclude < 0 else 6):
            pair = [m for m in found if self.variants[self.owner[m.trainIdx]][0] != exclude]
            if len(pair) >= 2 and pair[0].distance < RATIO * pair[1].distance:
                votes[int(self.owner[pair[0].trainIdx])] += 1
        best: dict[int, int] = {}
        for variant, _ in votes.most_common():
            best.setdefault(self.variants[variant][0], variant)
        return list(best.values())[:SHORTLIST]

    def inliers(self, query: Keypoints, variant: int) -> int:
        """Matches consistent with one affine map from the image to that photo variant."""
        target = self.variants[variant][1]
        if len(target.desc) < 2:
            return 0
        pairs = [
            p[0]
            for p in self.brute.knnMatch(query.desc, target.desc, k=2)
            if len(p) == 2 and p[0].distance < RATIO * p[1].distance
        ]
        if len(pairs) < 3:
            return 0
        src = query.xy[[m.queryIdx for m in pairs]]
        dst = target.xy[[m.trainIdx for m in pairs]]
        _, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0)
        return 0 if mask is None else int(mask.sum())

    def match(self, image: np.ndarray, sift: cv2.SIFT) -> tuple[str, int, str, int]:
        """(best photo, its inliers, runner-up photo, its inliers) for one TRAIN image."""
        query = keypoints(image, sift)
        if len(query.desc) < 3:
            return "", 0, "", 0
        scored = sorted(
            ((self.inliers(query, v), self.variants[v][0]) for v in self.shortlist(query)),
            reverse=True,
        )
        scored += [(0, -1)] * (2 - len(scored))
        (n1, p1), (n2, p2) = scored[:2]
        return self.stems[p1] if p1 >= 0 else "", n1, self.stems[p2] if p2 >= 0 else "", n2


def photo_overlaps(photos: list[Path], sift: cv2.SIFT) -> dict[tuple[str, str], int]:
    """Inliers between photos (all classes) whose fields of view overlap: some BCCD photos are
    shifted views of one slide area, so their copies are near-copies of each other too."""
    index = ClassIndex(photos, sift)
    pairs: dict[tuple[str, str], int] = {}
    for i, path in enumerate(photos):
        query = index.variants[2 * i][1]
        for variant in index.shortlist(query, exclude=i):
            other = photos[index.variants[variant][0]].stem
            key = tuple(sorted((path.stem, other)))
            pairs[key] = max(pairs.get(key, 0), index.inliers(query, variant))
    return pairs


def fields(stems: list[str], overlaps: dict[tuple[str, str], int], min_inliers: int) -> dict:
    """Photo stem -> its field: the photos linked by overlaps of >= min_inliers, joined by '+'."""
    parent = {s: s for s in stems}

    def root(s: str) -> str:
        while parent[s] != s:
            s = parent[s]
        return s

    for (a, b), n in overlaps.items():
        if n >= min_inliers:
            parent[root(a)] = root(b)
    members: dict[str, list[str]] = {}
    for s in stems:
        members.setdefault(root(s), []).append(s)
    return {s: "+".join(sorted(members[root(s)])) for s in stems}


def summary(rows: list[tuple], field: dict[str, str], margin: float, min_inliers: int) -> str:
    """Share of confident matches and copies per photo, per class, as lines of text."""
    lines = []
    for label in sorted({r[1] for r in rows}):
        mine = [r for r in rows if r[1] == label]
        sure = [r for r in mine if r[3] >= min_inliers and r[3] >= margin * r[5]]
        # a close runner-up from the same field (an overlapping photo) leaves the field sure
        field_sure = [
            r
            for r in mine
            if r[3] >= min_inliers and (r[3] >= margin * r[5] or field.get(r[4]) == field[r[2]])
        ]
        copies = sorted(Counter(r[2] for r in mine).values())
        lines.append(
            f"{label}: {len(mine)} images, {len(copies)} photos, copies per photo "
            f"{copies[0]}-{copies[-1]} (median {copies[len(copies) // 2]}); "
            f"confident {len(sure) / len(mine):.4f}, field-confident "
            f"{len(field_sure) / len(mine):.4f}; best inliers min {min(r[3] for r in mine)}, "
            f"runner-up max {max(r[5] for r in mine)}"
        )
    return "\n".join(lines)


_INDEX: dict[str, ClassIndex] = {}
_SIFT: list[cv2.SIFT] = []


def _worker_init(originals: str) -> None:
    """Each worker builds every class index once (FLANN indexes do not pickle)."""
    cv2.setNumThreads(1)
    _SIFT.append(cv2.SIFT_create())
    for folder in sorted(p for p in Path(originals).iterdir() if p.is_dir()):
        _INDEX[folder.name] = ClassIndex(sorted(folder.glob("*.jpg")), _SIFT[0])


def _match_one(job: tuple[str, str]) -> tuple[str, str, str, int, str, int]:
    path, label = job
    best, n1, second, n2 = _INDEX[label].match(cv2.imread(path), _SIFT[0])
    return path, label, best, n1, second, n2


def match_all(args: argparse.Namespace) -> list[tuple]:
    """(path, label, photo, inliers, runner-up, its inliers) per TRAIN image, in a pool."""
    jobs = []
    for folder in sorted(p for p in args.train.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.jp*g"))
        jobs += [(str(f), folder.name) for f in files[: args.limit or None]]
    start = time.perf_counter()
    rows = []
    init = (str(args.originals),)
    with ProcessPoolExecutor(args.workers, initializer=_worker_init, initargs=init) as pool:
        for i, (path, *rest) in enumerate(pool.map(_match_one, jobs, chunksize=16), 1):
            rows.append((Path(path).relative_to(args.train).as_posix(), *rest))
            if i % 500 == 0 or i == len(jobs):
                rate = i / (time.perf_counter() - start)
                print(f"{i}/{len(jobs)} images, {rate:.1f}/s", file=sys.stderr, flush=True)
    print(f"{len(rows)} images matched in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def read_evidence(path: Path) -> list[tuple]:
    """The rows of an earlier --evidence file (for --reuse)."""
    with path.open(newline="") as f:
        return [
            (
                r["path"],
                r["label"],
                r["group"],
                int(r["inliers"]),
                r["second_group"],
                int(r["second_inliers"]),
            )
            for r in csv.DictReader(f)
        ]


def write_csv(path: Path, header: list[str], rows: list) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="TRAIN folder (class folders)")
    parser.add_argument("--originals", type=Path, required=True, help="ORIGINALS/<CLASS>/*.jpg")
    parser.add_argument("--out", type=Path, required=True, help="labels CSV: path,label,group")
    parser.add_argument("--evidence", type=Path, required=True, help="per-image inlier counts")
    parser.add_argument(
        "--fields-out", type=Path, help="labels CSV whose group is the field (overlapping photos)"
    )
    parser.add_argument("--overlaps", type=Path, help="CSV of photo pairs and their inliers")
    parser.add_argument(
        "--overlap-inliers",
        type=int,
        default=10,
        help="inliers that make two photos one field (default 10: unrelated pairs reached 9)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=3.0,
        help="a match is confident when best >= margin x runner-up inliers (default 3)",
    )
    parser.add_argument("--min-inliers", type=int, default=20, help="and best >= this (20)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--limit", type=int, default=0, help="first N images per class (0: all)")
    parser.add_argument(
        "--reuse", action="store_true", help="read the matches from --evidence, do not match"
    )
    args = parser.parse_args(argv)

    rows = read_evidence(args.evidence) if args.reuse else match_all(args)
    if not args.reuse:
        header = ["path", "label", "group", "inliers", "second_group", "second_inliers"]
        write_csv(args.evidence, header, rows)
    write_csv(args.out, ["path", "label", "group"], [r[:3] for r in rows])

    photos = sorted(args.originals.glob("*/*.jpg"))
    overlaps = photo_overlaps(photos, cv2.SIFT_create())
    field = fields([p.stem for p in photos], overlaps, args.overlap_inliers)
    if args.overlaps:
        label = {p.stem: p.parent.name for p in photos}
        write_csv(
            args.overlaps,
            ["photo_a", "label_a", "photo_b", "label_b", "inliers"],
            [(a, label[a], b, label[b], n) for (a, b), n in sorted(overlaps.items())],
        )
    if args.fields_out:
        write_csv(
            args.fields_out, ["path", "label", "group"], [(r[0], r[1], field[r[2]]) for r in rows]
        )
    linked = sorted({f for f in field.values() if "+" in f})
    n_linked = sum(n >= args.overlap_inliers for n in overlaps.values())
    print(summary(rows, field, args.margin, args.min_inliers))
    print(
        f"{len(photos)} photos in {len(set(field.values()))} fields; overlapping photo pairs "
        f"(>= {args.overlap_inliers} inliers): {n_linked}; "
        f"fields of several photos: {', '.join(linked)}"
    )
    weak = sorted(n for n in overlaps.values() if n < args.overlap_inliers)
    print(f"strongest unlinked pair: {weak[-1] if weak else 0} inliers")


if __name__ == "__main__":
    main()
