"""Where a fine-tuning epoch's time goes: JPEG decoding vs the model, files vs the decoded-input
cache, float32 vs mixed bfloat16, the frozen-base phase vs the unfrozen one. One process, one
run, so the ratios share the machine's state.

    .venv/bin/python -m benchmarks.finetune_speed --images 400 --image-size 224

Each training figure is the second of two epochs (the first traces the graph); files and cache
are alternated twice and the faster of each kept, so their order does not decide; "input only"
iterates the pipeline with no model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import image_folder


def _epoch_seconds(model, data, settings, class_weight) -> float:
    import keras

    times: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, _: times.append(-time.perf_counter()),
        on_epoch_end=lambda e, _: times.__setitem__(-1, times[-1] + time.perf_counter()),
    )
    model.fit(data, epochs=2, verbose=0, callbacks=[timer], class_weight=class_weight)
    return times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--unfreeze-from", default="block6a_expand_conv")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import keras

    from tasks.backbones.registry import get_spec, load_preprocess
    from tasks.data.scan import scan
    from tasks.finetune.cache import decoded_inputs
    from tasks.finetune.data import CachedImages, class_weights, dihedral, image_dataset
    from tasks.finetune.model import build_finetune_model, compile_model, unfreeze
    from tasks.finetune.settings import FinetuneSettings, resolved

    work = Path(tempfile.mkdtemp(prefix="fp-bench-ft-"))
    manifest = scan(image_folder(args.images, work))
    rows = np.arange(len(manifest.records))
    labels = np.asarray(manifest.labels)
    size, batch = args.image_size, args.batch_size
    preprocess = load_preprocess(get_spec(args.backbone))

    def dataset(cache=None):
        source = manifest.paths() if cache is None else CachedImages(cache, rows)
        return image_dataset(
            source, labels, size, preprocess, batch, augment=dihedral, shuffle_seed=0
        )

    def input_only(data) -> float:
        began = time.perf_counter()
        for _ in data:
            pass
        return time.perf_counter() - began

    n = len(rows)
    results: list[tuple[str, float]] = []
    results.append(("input only: decode files", input_only(dataset())))
    began = time.perf_counter()
    cache = decoded_inputs(work / "cache", manifest, size)
    results.append(("fill the cache (once)", time.perf_counter() - began))
    results.append(("input only: read cache", input_only(dataset(cache))))

    weights = class_weights(labels, len(manifest.class_names))
    for precision in ("float32", "bfloat16"):
        settings = resolved(
            FinetuneSettings(
                backbone=args.backbone,
                weights=args.weights,
                image_size=size,
                batch_size=batch,
                unfreeze_from=args.unfreeze_from,
                precision=precision,  # the model is built in it, as `finetune --precision`
            )
        )
        model = build_finetune_model(settings, len(manifest.class_names))
        compile_model(model, settings, 1e-3)
        if precision == "float32":  # files and cache alternated, best of two each
            pairs = [
                (
                    _epoch_seconds(model, dataset(), settings, weights),
                    _epoch_seconds(model, dataset(cache), settings, weights),
                )
                for _ in range(2)
            ]
            results.append(("phase 1 epoch, float32, from files", min(f for f, _ in pairs)))
            seconds = min(c for _, c in pairs)
        else:
            seconds = _epoch_seconds(model, dataset(cache), settings, weights)
        results.append((f"phase 1 epoch, {precision}, from cache", seconds))
        unfreeze(model, settings)
        seconds = _epoch_seconds(model, dataset(cache), settings, weights)
        results.append((f"phase 2 epoch ({args.unfreeze_from} on), {precision}, cache", seconds))
        keras.backend.clear_session()

    print(f"\n{n} images at {size} px, {args.backbone} ({args.weights}), batch {batch}\n")
    print("| step | seconds | images/s |\n|---|---:|---:|")
    for name, seconds in results:
        print(f"| {name} | {seconds:.1f} | {n / seconds:.1f} |")


if __name__ == "__main__":
    main()
