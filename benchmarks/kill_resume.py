"""kill -9 at random moments during extraction, reduction and classification, then resume.

Each round starts a fresh pipeline process on a fresh store, kills it with SIGKILL after a
random delay (anywhere from decoding to writing the report), runs it again to completion and
compares the store and results with an uninterrupted reference run: features bit-identical,
reduction identical, same accuracies, no half-written model accepted.

    .venv/bin/python -m benchmarks.kill_resume --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PIPELINE = """
import json, sys
from pathlib import Path
from tasks.dataset import scan
from tasks.extract import ExtractSettings, extract
from tasks.splits import split_rows
from tasks.stages import classify_run, reduce_cached
from tasks.store import FeatureStore
data, store_path, run_dir = sys.argv[1:4]
print("stage:extract", flush=True)
manifest = scan(data)
store = FeatureStore(store_path)
settings = ExtractSettings(backbone="vgg16", weights="none", layers=("block2_pool",),
                           image_size=32, batch_size=4, chunk_mb=0.1)
key = extract(manifest, store, settings).feature_keys["block2_pool"]
train, test = split_rows(manifest, "stratified", 0.25, 0)
print("stage:reduce", flush=True)
reduction = reduce_cached(store, key, train)
print("stage:classify", flush=True)
report = classify_run(store, manifest, reduction, train, test, ["logreg", "svm"], Path(run_dir),
                      {"layer": "block2_pool"})
print(json.dumps({"feature_key": key, "reduce_key": reduction.key,
                  "accuracy": {n: c["metrics"]["accuracy"]
                               for n, c in report["classifiers"].items()}}))
"""


def _start(data: Path, store: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-c", PIPELINE, str(data), str(store), str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])


def _finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(err[-3000:])
    return json.loads(out.strip().splitlines()[-1])


def _stage(output: str) -> str:
    """The last stage the pipeline had reached (imports come before any stage marker)."""
    stages = [line.split(":", 1)[1] for line in output.splitlines() if line.startswith("stage:")]
    return stages[-1] if stages else "imports"


def _state(store: Path, result: dict) -> tuple[np.ndarray, np.ndarray]:
    from tasks.stages import load_projected
    from tasks.store import FeatureStore

    feature_store = FeatureStore(str(store))
    features = feature_store.feature_array(result["feature_key"]).data[...]
    return features, load_projected(feature_store, result["reduce_key"])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import write_image

    work = Path(tempfile.mkdtemp(prefix="fp-kill-"))
    data = work / "images"
    for i in range(64):
        write_image(data / ("a" if i % 2 else "b") / f"{i}.png", seed=i, tint=120 * (i % 2))
    began = time.perf_counter()
    process = _start(data, work / "reference", work / "runs" / "reference")
    process.stdout.readline()  # "stage:extract": imports are done from here on
    work_starts = time.perf_counter() - began
    reference = _finish(process)
    duration = time.perf_counter() - began
    ref_features, ref_projected = _state(work / "reference", reference)
    print(f"reference run: {duration:.1f} s ({work_starts:.1f} s of imports), "
          f"accuracy {reference['accuracy']}")
    rng = random.Random(args.seed)
    passed = 0
    for round_ in range(args.rounds):
        store, run_dir = work / f"store-{round_}", work / "runs" / f"round-{round_}"
        process = _start(data, store, run_dir)
        process.stdout.readline()  # wait for the imports, then kill somewhere in the work
        delay = rng.uniform(0.0, duration - work_starts)
        time.sleep(delay)
        killed = process.poll() is None
        if killed:
            process.send_signal(signal.SIGKILL)
        stage = _stage("stage:extract\n" + process.communicate()[0])
        resumed = _finish(_start(data, store, work / "runs" / f"round-{round_}-resumed"))
        features, projected = _state(store, resumed)
        same = (resumed["accuracy"] == reference["accuracy"]
                and np.array_equal(features, ref_features)
                and np.allclose(projected, ref_projected, atol=1e-5))
        passed += same
        print(f"round {round_ + 1:2d}: kill {delay:5.1f} s into the work, during {stage:8s} "
              f"({'killed' if killed else 'had finished'}) -> "
              f"{'identical' if same else 'DIFFERENT'}", flush=True)
    print(f"{passed}/{args.rounds} resumed runs identical to the uninterrupted one")


if __name__ == "__main__":
    main()
