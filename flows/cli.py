"""The `featurepipe` command: parse flags, call a flow, print a summary (or --json).

Heavy imports (Prefect, TensorFlow, Dask) happen inside commands so `--help` stays instant.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from tasks.errors import UserError, disk_full_message, is_disk_full

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's default 20 s time-out for starting its local API is too tight on a busy machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Our own progress lines (e.g. long PCA passes) go to the run's log and the console.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "featurepipe")

app = typer.Typer(
    help="featurepipe: CNN features -> Zarr store -> Dask PCA -> classifiers, "
    "orchestrated by Prefect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Inspect and maintain the feature store.", no_args_is_help=True)
runs_app = typer.Typer(help="List and compare classifier runs.", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(runs_app, name="runs")
backbones_app = typer.Typer(
    help="List backbones and check their ImageNet weights offline.", no_args_is_help=True
)
app.add_typer(backbones_app, name="backbones")

Data = Annotated[
    str | None,
    typer.Option(
        help="Image folder: one sub-folder per class, optionally inside train/ valid/ test/; "
        "or s3://bucket/prefix (any fsspec URL) with the same layout."
    ),
]
Labels = Annotated[
    Path | None,
    typer.Option(
        help="CSV of path,label (optional split: train/test; optional group: images that "
        "belong together, e.g. copies of one photo, kept on one side by --split grouped) "
        "naming the images of --data, instead of class folders; paths are relative to --data."
    ),
]
Store = Annotated[str | None, typer.Option(help="Feature store path (default featurepipe-store).")]
Runs = Annotated[Path | None, typer.Option(help="Folder for run reports (default runs).")]
Backbone = Annotated[
    str | None,
    typer.Option(
        help="vgg16, vgg19, resnet50, densenet169, "
        "inceptionv3, xception, mobilenetv2, "
        "efficientnetb0, efficientnetv2b0, convnext-tiny, "
        "efficientnet-lite0 (default vgg16)."
    ),
]
Layers = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated cut layers, all extracted in "
        "one pass (default: the backbone's, e.g. "
        "block5_pool)."
    ),
]
Weights = Annotated[
    str | None,
    typer.Option(
        help="imagenet (download, cached), hed-vgg16 "
        "(offline), none, or a weights file path "
        "(default imagenet)."
    ),
]
ImageSize = Annotated[int | None, typer.Option(help="Square input size (default: the backbone's).")]
Pooling = Annotated[str | None, typer.Option(help="Global pooling of the cut: avg or max.")]
Dtype = Annotated[str | None, typer.Option(help="float32 or float16 features (default float32).")]
Precision = Annotated[
    str | None,
    typer.Option(
        help="Backbone compute precision: auto (default), float32, bfloat16 or float16 "
        "(mixed: float32 weights, 16-bit math, features still stored as --dtype says). auto "
        "picks bfloat16/float16 where the CPU (AVX512_BF16, AMX) or GPU runs it natively, "
        "else float32; on a CPU it keeps depthwise backbones (MobileNet, EfficientNet) in "
        "float32, which gain nothing there. bfloat16 ran VGG16 about 1.7-2x faster on an "
        "AVX512_BF16 CPU with accuracies within 0.01 on the full blood-cell set "
        "(benchmarks/README.md). The run report records the precision used.",
    ),
]
BatchSize = Annotated[int | None, typer.Option(help="Images per forward pass (default 16).")]
Classifiers = Annotated[
    str | None,
    typer.Option(
        help="Comma list: svm, logreg, knn, dense256, dense64bn, sgd (default svm,logreg). "
        "sgd is a linear model trained out of core (partial_fit over the stored rows, a "
        "buffer at a time); in-memory classifiers whose planned memory exceeds "
        "--memory-limit hand over to it."
    ),
]
SvmMaxRows = Annotated[
    int | None,
    typer.Option(
        help="Above this many training rows the RBF SVM grid hands over to sgd, with a log "
        "line and a note in the report (default 20000: the grid's time grows about as n^2, "
        "measured in benchmarks/README.md)."
    ),
]
Limit = Annotated[int | None, typer.Option(help="Use at most N images per class.")]
Variance = Annotated[
    float | None, typer.Option(help="PCA variance target in (0, 1] (default 0.8).")
]
Components = Annotated[
    int | None, typer.Option(help="Fixed number of PCA components, instead of the variance target.")
]
PcaMethod = Annotated[
    str | None,
    typer.Option(
        help="auto (default: gram when its memory fits, else incremental, else stop with "
        "advice), gram (exact), randomized, incremental."
    ),
]
MemoryLimit = Annotated[
    float | None,
    typer.Option(
        help="GiB the PCA and the classifiers may plan for (default: 80% of RAM or the "
        "cgroup limit)."
    ),
]
Split = Annotated[
    str | None, typer.Option(help="auto, stratified, grouped, folder (default auto).")
]
TestSize = Annotated[float | None, typer.Option(help="Test fraction (default 0.25).")]
GroupRegex = Annotated[
    str | None,
    typer.Option(
        help="Regex on file names giving the group for --split grouped, e.g. '_(\\d+)_' "
        "(not with a --labels file that has a group column: it gives the groups)."
    ),
]
GroupBy = Annotated[
    str | None,
    typer.Option(
        help="Where --split grouped takes its groups: auto (default: the --labels file's group "
        "column, else --group-regex) or near-copies (images whose stored features are near-copies, "
        "joined into groups; for augmented copies of photos when no table names the photo)."
    ),
]
NearCopyThreshold = Annotated[
    float | None,
    typer.Option(
        help="Cosine similarity of two images' stored features at or above which they are "
        "near-copies, for --group-by near-copies and every run's check of its test images "
        "(default 0.95)."
    ),
]
Seed = Annotated[
    int | None, typer.Option(help="Seed for splits, init and classifiers (default 0).")
]
DaskAddress = Annotated[str | None, typer.Option(help="Existing Dask scheduler tcp://host:port.")]
Workers = Annotated[
    int | None,
    typer.Option(
        help="Local Dask worker processes for extraction "
        "and PCA (default 1: no cluster, threads in "
        "this process)."
    ),
]
Config = Annotated[Path | None, typer.Option(help="YAML or TOML file of settings; flags win.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")]
Features = Annotated[
    str,
    typer.Option(
        help="Comma list of feature keys (or unique prefixes), see `featurepipe store ls`."
    ),
]
Cron = Annotated[str, typer.Option(help="When the pipeline runs: cron, UTC (default 0 2 * * *).")]

# Settings options, each given only when set (None = the config file's value or the default).
REDUCE_OPTIONS = {
    "store": Store,
    "variance": Variance,
    "components": Components,
    "pca_method": PcaMethod,
    "memory_limit": MemoryLimit,
    "split": Split,
    "test_size": TestSize,
    "group_regex": GroupRegex,
    "group_by": GroupBy,
    "near_copy_threshold": NearCopyThreshold,
    "seed": Seed,
    "dask_address": DaskAddress,
    "workers": Workers,
    "config": Config,
}
CLASSIFY_OPTIONS = {
    "runs": Runs,
    "classifiers": Classifiers,
    "svm_max_rows": SvmMaxRows,
    **REDUCE_OPTIONS,
}
PIPELINE_OPTIONS = {
    "data": Data,
    "labels": Labels,
    "backbone": Backbone,
    "layers": Layers,
    "weights": Weights,
    "image_size": ImageSize,
    "pooling": Pooling,
    "dtype": Dtype,
    "precision": Precision,
    "batch_size": BatchSize,
    "limit_per_class": Limit,
    **CLASSIFY_OPTIONS,
}


def _options(settings: dict[str, Any], **extra: tuple[Any, Any]) -> Callable[[Callable], Callable]:
    """Declare the options of a `**flags` command: `settings` (default None) then `extra`
    (name=(annotation, default)). One table feeds run, extract, sweep, serve, classify and
    reduce, so their flags and --help cannot drift apart."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter(name, keyword, annotation=kind, default=None)
        for name, kind in settings.items()
    ]
    params += [
        inspect.Parameter(name, keyword, annotation=kind, default=default)
        for name, (kind, default) in extra.items()
    ]

    def declare(command: Callable) -> Callable:
        command.__signature__ = inspect.Signature(params)
        return command

    return declare


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _guarded(action: Callable[[], None]) -> None:
    """Run a command body; user mistakes become one line on stderr, never a traceback."""
    try:
        action()
    except UserError as error:
        _fail(str(error), 2)
    except FileNotFoundError as error:
        _fail(str(error), 2)
    except OSError as error:
        if not is_disk_full(error):
            raise
        _fail(disk_full_message(error), 2)
    except KeyboardInterrupt:
        _fail(
            "interrupted. Everything finished before it is kept (feature chunks marked done, "
            "reductions, runs with a report.json): run the same command again to resume.",
            130,
        )


def _store_path(store: str | None) -> str:
    from tasks.features.store import DEFAULT_STORE

    return store or DEFAULT_STORE


def _runs_folder(runs: Path | None) -> Path:
    from flows.settings import DEFAULT_RUNS

    return runs or DEFAULT_RUNS


def _run_dir(runs: Path | None, run_id: str) -> Path:
    from tasks.runs.folder import find_run

    return find_run(_runs_folder(runs), run_id)


def _settings(**flags):
    from flows.settings import load_settings

    config = flags.pop("config", None)
    return load_settings(config, **flags)


def _print(summary: dict, as_json: bool, human: Callable[[dict], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    else:
        human(summary)


def _print_run(summary: dict) -> None:
    typer.echo(
        f"images: {summary['images_total']} used, {summary['images_computed']} computed, "
        f"{summary['images_cached']} from cache, {summary['images_skipped']} skipped"
    )
    typer.echo(f"feature store: {summary['store']}")
    for layer, info in summary["layers"].items():
        scores = ", ".join(f"{name} {acc:.3f}" for name, acc in info["accuracy"].items())
        typer.echo(
            f"{layer}: {info['n_components']} PCA components ({info['pca_method']}); "
            f"test accuracy: {scores}; {info['near_copy_share']:.0%} of test images have a "
            "near-copy in training"
        )
        typer.echo(f"  report: {Path(info['run_dir']) / 'report.md'}")
    typer.echo(
        f"Prefect flow run: {summary['flow_run_id']} (see it with `prefect server start`,"
        " then the Runs page)"
    )


def _print_sweep(summary: dict) -> None:
    _print_run(summary)
    for row in summary["sweep"]:
        typer.echo(
            f"{row['layer']:>16} {row['classifier']:>10}  accuracy {row['accuracy']:.3f}"
            f"  macro-F1 {row['macro_f1']:.3f}  {row['n_components']} components"
        )
    typer.echo(f"table: {summary['sweep_files']['md']}")


def _check_labels(settings: Any) -> None:
    """Read and check a labels CSV before Prefect starts: its mistakes answer in a second."""
    if settings.labels is None:
        return
    from tasks.data.images import is_url
    from tasks.data.labels import read_labels

    if is_url(settings.data):
        raise UserError("--labels needs a local --data folder, not a URL")
    rows = read_labels(settings.labels, settings.data)
    if settings.split == "grouped":
        from tasks.data.splits import group_source

        near_copies = getattr(settings, "group_by", None) == "near-copies"  # not in finetune
        group_source(any(row.group is not None for row in rows), settings.group_regex, near_copies)


def _pipeline_command(flow_name: str) -> Callable:
    """Build the `run`/`extract` command: same flags, different flow."""

    @_options(PIPELINE_OPTIONS, json_out=(JsonOut, False))
    def command(**flags: Any) -> None:
        json_out = flags.pop("json_out")

        def body() -> None:
            settings = _settings(**flags)
            if settings.data is None:
                raise UserError("--data is required (or `data:` in --config)")
            from tasks.data.images import is_url

            if not is_url(settings.data) and not settings.data.is_dir():  # before Prefect
                raise UserError(f"dataset folder not found: {settings.data}")
            _check_labels(settings)
            from flows import pipeline

            if flow_name == "run":
                _print(pipeline.pipeline_flow(settings), json_out, _print_run)
            elif flow_name == "sweep":
                _print(pipeline.sweep_flow(settings), json_out, _print_sweep)
            else:
                _print(
                    pipeline.extract_flow(settings),
                    json_out,
                    lambda s: typer.echo(json.dumps(s, indent=2, default=str)),
                )

        _guarded(body)

    return command


app.command(
    "run",
    help="Scan, extract, reduce and classify: the whole pipeline. Cached "
    "features and reductions are reused.",
)(_pipeline_command("run"))
app.command("extract", help="Scan the folder and fill the feature store only.")(
    _pipeline_command("extract")
)
app.command(
    "sweep",
    help="Extract several layers in one backbone pass, reduce and classify "
    "each, and write one comparison table (Markdown, CSV, bar chart).",
)(_pipeline_command("sweep"))


@app.command(
    help="Re-run only scaling/PCA and the classifiers on stored features: never "
    "touches images or builds the backbone."
)
@_options(CLASSIFY_OPTIONS, features=(Features, inspect.Parameter.empty), json_out=(JsonOut, False))
def classify(**flags: Any) -> None:
    features, json_out = flags.pop("features"), flags.pop("json_out")

    def body() -> None:
        from flows.pipeline import classify_flow

        keys = [part.strip() for part in features.split(",") if part.strip()]
        _print(classify_flow(_settings(**flags), keys), json_out, _print_run)

    _guarded(body)


@app.command(help="Fit scaling + PCA on stored features (train rows only) and cache it.")
@_options(REDUCE_OPTIONS, features=(Features, inspect.Parameter.empty), json_out=(JsonOut, False))
def reduce(**flags: Any) -> None:
    features, json_out = flags.pop("features"), flags.pop("json_out")

    def body() -> None:
        from flows.pipeline import reduce_flow

        settings = _settings(**flags)
        key = features.split(",")[0].strip()
        from tasks.features.store import FeatureStore

        full_key = FeatureStore(settings.store, mode="r").find(key)[1]
        _print(
            reduce_flow(settings, full_key),
            json_out,
            lambda s: typer.echo(json.dumps(s, indent=2, default=str)),
        )

    _guarded(body)


@app.command(
    help="Predict new images with a finished run: same backbone, layer, scaling, "
    "PCA and model. Writes a CSV of file, predicted class and per-class scores."
)
def predict(
    run: Annotated[str, typer.Option(help="Run id (see `featurepipe runs ls`).")],
    data: Annotated[
        str,
        typer.Option(
            help="Folder of images (flat, or class sub-folders whose names are kept); or "
            "s3://bucket/prefix (any fsspec URL) with class sub-folders."
        ),
    ],
    labels: Annotated[
        Path | None,
        typer.Option(help="CSV of path,label[,split]: predict the images it lists, labels kept."),
    ] = None,
    out: Annotated[Path, typer.Option(help="CSV to write.")] = Path("predictions.csv"),
    classifier: Annotated[
        str | None, typer.Option(help="Classifier of the run (default: its best).")
    ] = None,
    store: Annotated[
        str | None, typer.Option(help="Feature store (default: the one the run was made with).")
    ] = None,
    runs: Runs = None,
    json_out: JsonOut = False,
) -> None:
    def body() -> None:
        from tasks.data.images import is_url
        from tasks.runs.predict import plan_prediction

        run_dir = _run_dir(runs, run)
        images = data if is_url(data) else Path(data)
        if not is_url(data) and not images.is_dir():
            raise UserError(f"folder not found: {data}")
        if labels is not None:
            from tasks.data.labels import read_labels

            read_labels(labels, images)
        plan = plan_prediction(run_dir, store, classifier)  # before Prefect: fails in seconds
        from flows.pipeline import predict_flow

        summary = predict_flow(run_dir, images, out, plan.store, plan.classifier, labels)
        _print(
            summary,
            json_out,
            lambda s: typer.echo(
                f"{s['predictions']} predictions ({s['classifier']}) written to {s['csv']}"
            ),
        )

    _guarded(body)


@app.command(
    help="Fine-tune a backbone end to end: new head with the base frozen, then the "
    "last layers unfrozen at a low learning rate, with augmentation, checkpoints "
    "and resume. Writes a run comparable in `featurepipe runs ls`."
)
def finetune(
    data: Data = None,
    labels: Labels = None,
    runs: Runs = None,
    resume: Annotated[
        str | None, typer.Option(help="Run id of an interrupted fine-tuning to continue.")
    ] = None,
    limit_per_class: Limit = None,
    split: Split = None,
    test_size: TestSize = None,
    group_regex: GroupRegex = None,
    backbone: Backbone = None,
    weights: Weights = None,
    image_size: ImageSize = None,
    head: Annotated[str | None, typer.Option(help="Dense widths (default 512,64).")] = None,
    dropout: Annotated[
        float | None, typer.Option(help="Dropout after every hidden Dense layer (default 0.3).")
    ] = None,
    batch_norm: Annotated[
        bool | None, typer.Option("--batch-norm/--no-batch-norm", help="BatchNorm after pooling.")
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="adam, adamw, nadam, rmsprop, sgd (default adam).")
    ] = None,
    phase1_epochs: Annotated[
        int | None, typer.Option(help="Epochs training the head on the frozen base (default 10).")
    ] = None,
    phase1_learning_rate: Annotated[
        float | None, typer.Option(help="Learning rate of phase 1 (default 0.001).")
    ] = None,
    phase2_epochs: Annotated[
        int | None,
        typer.Option(help="Epochs training the head and the unfrozen base layers (default 10)."),
    ] = None,
    phase2_learning_rate: Annotated[
        float | None,
        typer.Option(
            help="Learning rate of phase 2 (default 0.0001: the rate of every measured "
            "full-data run in README)."
        ),
    ] = None,
    unfreeze_last: Annotated[
        int | None, typer.Option(help="Base layers trained in phase 2 (default 4).")
    ] = None,
    unfreeze_from: Annotated[
        str | None, typer.Option(help="Or: train every layer from this one.")
    ] = None,
    batch_size: BatchSize = None,
    patience: Annotated[
        int | None, typer.Option(help="Early-stopping patience per phase (default 5).")
    ] = None,
    validation_fraction: Annotated[
        float | None,
        typer.Option(
            help="Share of the training rows held out for early stopping when the data has "
            "no valid/ tree; grouped like --split (default 0.2)."
        ),
    ] = None,
    class_weight: Annotated[
        str | None,
        typer.Option(help="balanced (default: classes weigh equally in the loss) or none."),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Training compute precision: float32 (default), bfloat16 or float16 (mixed: "
            "float32 weights, 16-bit math, float32 softmax; float16 adds loss scaling). "
            "float32 by default because the accuracy of 16-bit training is not measured yet; "
            "its speed depends on the backbone (benchmarks/README.md, Fine-tuning speed). A "
            "resumed run keeps its precision; the report records it.",
        ),
    ] = None,
    cache_inputs: Annotated[
        bool | None,
        typer.Option(
            "--cache-inputs/--no-cache-inputs",
            help="Decode each image once into a uint8 cache beside the runs (default on).",
        ),
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            help="dihedral (default: random 90-degree turns and mirrors), affine "
            "(--flip, --rotation, --zoom, --translation, --contrast) or none."
        ),
    ] = None,
    flip: Annotated[
        str | None, typer.Option(help="none, horizontal, vertical, horizontal_and_vertical.")
    ] = None,
    rotation: Annotated[
        float | None,
        typer.Option(help="--augment affine: random turn, fraction of a full turn (default 0.05)."),
    ] = None,
    zoom: Annotated[
        float | None, typer.Option(help="--augment affine: random zoom fraction (default 0.1).")
    ] = None,
    translation: Annotated[
        float | None,
        typer.Option(help="--augment affine: random shift, fraction of the size (default 0.1)."),
    ] = None,
    contrast: Annotated[
        float | None, typer.Option(help="--augment affine: random contrast factor (default 0.1).")
    ] = None,
    seed: Seed = None,
    config: Config = None,
    json_out: JsonOut = False,
) -> None:
    flags = {k: v for k, v in locals().items() if k != "json_out"}

    def body() -> None:
        from flows.finetune import FinetuneFlowSettings, finetune_flow
        from flows.settings import load_settings

        config_file = flags.pop("config")
        settings = load_settings(config_file, model=FinetuneFlowSettings, **flags)
        if settings.data is not None:
            _check_labels(settings)
        _print(
            finetune_flow(settings),
            json_out,
            lambda s: typer.echo(
                f"fine-tuned {s['epochs_run']} epochs (best {s['best_epoch']}): test accuracy "
                f"{s['accuracy']:.3f}; report: {Path(s['run_dir']) / 'report.md'}"
            ),
        )

    _guarded(body)


@app.command(
    help="Write the digits demo set to data/demo and run the pipeline on it "
    "(VGG16, offline hed-vgg16 weights, 48px)."
)
def demo(store: Store = None, runs: Runs = None, json_out: JsonOut = False) -> None:
    def body() -> None:
        from flows.pipeline import pipeline_flow
        from tasks.data.demo import write_digits

        folder = write_digits(Path("data/demo/digits"))
        settings = _settings(
            data=folder,
            store=store or "data/stores/demo",
            runs=runs,
            backbone="vgg16",
            weights="hed-vgg16",
            image_size=48,
            layers=["block4_pool"],
            pooling=None,
        )
        _print(pipeline_flow(settings), json_out, _print_run)

    _guarded(body)


@app.command(
    help="Serve the pipeline on a cron schedule and the classify flow on demand from "
    "this process (no work pool or worker); Ctrl-C stops and pauses them."
)
@_options(PIPELINE_OPTIONS, cron=(Cron, "0 2 * * *"))
def serve(**flags: Any) -> None:
    cron = flags.pop("cron")

    def body() -> None:
        from flows.serve import serve_settings

        serve_settings(_settings(**flags), cron)

    _guarded(body)


def _open_store(store: str | None, mode: str):
    """The feature store for a maintenance command; it must exist (see FeatureStore modes)."""
    from tasks.features.store import FeatureStore

    return FeatureStore(_store_path(store), mode=mode)


@store_app.command("ls", help="Feature arrays and reductions: shapes, sizes, keys, completeness.")
def store_ls(store: Store = None, json_out: JsonOut = False) -> None:
    def body() -> None:
        feature_store = _open_store(store, "r")
        rows = feature_store.summaries()
        if json_out:
            _print({"store": feature_store.location, "arrays": rows}, True, print)
            return
        for row in rows:
            if row["kind"] == "features":
                typer.echo(
                    f"features {row['key']}  {row['backbone']}/{row['layer']} "
                    f"{row['image_size']}px {row['weights']}  shape {row['shape']} "
                    f"{row['dtype']}  {row['stored_bytes'] / 1e6:.1f} MB  "
                    f"chunks {row['chunks_done']}/{row['chunks_total']}"
                )
            else:
                typer.echo(
                    f"reduced  {row['key']}  from {row['feature_key']}  "
                    f"{row['n_components']} components ({row['method']})"
                )
        if not rows:
            typer.echo(f"{feature_store.location}: empty")

    _guarded(body)


@store_app.command("info", help="Every attribute of one array (key or unique prefix).")
def store_info(key: str, store: Store = None) -> None:
    def body() -> None:
        info = _open_store(store, "r").describe(key)
        typer.echo(json.dumps(info, indent=2, default=str))

    _guarded(body)


@store_app.command(
    "verify",
    help="Read every chunk back; report missing or unreadable ones. "
    "--repair forgets bad chunks so the next extract redoes them.",
)
def store_verify(store: Store = None, repair: bool = False, json_out: JsonOut = False) -> None:
    def body() -> None:
        feature_store = _open_store(store, "r+" if repair else "r")
        report = {array.key: array.verify() for array in feature_store.feature_arrays()}
        if repair:
            for key, problems in report.items():
                feature_store.feature_array(key).repair(problems)
        bad = {key: problems for key, problems in report.items() if problems}
        if json_out:
            problems = {
                key: [{**asdict(p), "message": str(p)} for p in found] for key, found in bad.items()
            }
            _print({"ok": not bad, "problems": problems}, True, print)
        else:
            for key, problems in report.items():
                typer.echo(f"{key}: {'; '.join(map(str, problems)) or 'ok'}")
        if bad and not repair:
            raise typer.Exit(1)

    _guarded(body)


@store_app.command("rm", help="Remove one array or reduction (key or unique prefix).")
def store_rm(key: str, store: Store = None) -> None:
    def body() -> None:
        typer.echo(f"removed {_open_store(store, 'r+').remove(key)}")

    _guarded(body)


@store_app.command("gc", help="Remove orphaned reductions and manifests.")
def store_gc(store: Store = None) -> None:
    def body() -> None:
        removed = _open_store(store, "r+").gc()
        typer.echo("\n".join(f"removed {item}" for item in removed) or "nothing to remove")

    _guarded(body)


@runs_app.command("ls", help="Runs, newest first, with accuracy per classifier.")
def runs_ls(runs: Runs = None, json_out: JsonOut = False) -> None:
    def body() -> None:
        from tasks.runs.folder import list_runs

        rows = list_runs(_runs_folder(runs))
        if json_out:
            _print({"runs": rows}, True, print)
            return
        for row in rows:
            scores = ", ".join(f"{name} {acc:.3f}" for name, acc in row["accuracy"].items())
            dataset = Path(str(row["dataset"])).name
            typer.echo(f"{row['id']}  {dataset}  {row['backbone']}/{row['layer']}  {scores}")
        if not rows:
            typer.echo(f"no finished runs in {_runs_folder(runs)}")

    _guarded(body)


@runs_app.command("show", help="The Markdown report of one run.")
def runs_show(run_id: str, runs: Runs = None) -> None:
    def body() -> None:
        from tasks.runs.folder import read_markdown

        typer.echo(read_markdown(_run_dir(runs, run_id)))

    _guarded(body)


@backbones_app.command(
    "ls",
    help="Backbones with default size, default cut layer and weight "
    "options; --cut-points NAME lists every cut layer of one.",
)
def backbones_ls(
    cut_points: Annotated[
        str | None,
        typer.Option(help="Backbone whose cut layers to list (builds it with random weights)."),
    ] = None,
    json_out: JsonOut = False,
) -> None:
    def body() -> None:
        from tasks.backbones.registry import BACKBONES, build_base, get_spec, resolve_weights
        from tasks.backbones.registry import cut_points as cuts

        rows = [
            {
                "name": spec.name,
                "default_size": spec.default_size,
                "default_layer": spec.default_layer,
                "weights": [
                    "imagenet" + (" (offline)" if spec.imagenet_file else ""),
                    *spec.offline_weights,
                    "none",
                    "PATH",
                ],
            }
            for spec in BACKBONES.values()
        ]
        if cut_points:
            spec = get_spec(cut_points)
            model = build_base(spec, resolve_weights(spec, "none"), spec.default_size)
            rows = [{"name": spec.name, "cut_points": cuts(model)}]
        if json_out:
            _print({"backbones": rows}, True, print)
            return
        width = max(len(row.get("default_layer", "")) for row in rows)
        for row in rows:
            if "cut_points" in row:
                typer.echo(f"{row['name']} cut points: {', '.join(row['cut_points'])}")
            else:
                typer.echo(
                    f"{row['name']:<18} {row['default_size']:>4}px  layer "
                    f"{row['default_layer']:<{width}} weights: {', '.join(row['weights'])}"
                )

    _guarded(body)


@backbones_app.command(
    "check",
    help="Run the backbone's ImageNet head on photos shipped with "
    "scikit-image and print the top-5 classes by name.",
)
def backbones_check(name: str, weights: Weights = None, json_out: JsonOut = False) -> None:
    def body() -> None:
        from tasks.backbones.check import top5_on_photos
        from tasks.backbones.registry import build_base, get_spec, load_preprocess, resolve_weights

        spec = get_spec(name)
        choice = resolve_weights(spec, weights or "imagenet")
        if choice.option not in ("imagenet", "file"):
            raise UserError("checking needs ImageNet weights (--weights imagenet or a file)")
        model = build_base(spec, choice, spec.default_size, include_top=True)
        results = top5_on_photos(model, load_preprocess(spec), spec.default_size)
        if json_out:
            _print(
                {
                    "backbone": spec.name,
                    "weights": choice.identity,
                    "photos": {photo: top for photo, top in results},
                },
                True,
                print,
            )
            return
        for photo, top in results:
            typer.echo(f"{photo}: " + ", ".join(f"{label} {p:.2f}" for label, p in top))

    _guarded(body)


class _NoUserErrorTraceback(logging.Filter):
    """Prefect logs every failed run with its traceback; for a user mistake or a full disk the
    one-line message is the whole story, so drop the traceback (bugs keep theirs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, UserError) or is_disk_full(error):
            record.exc_info, record.exc_text = None, None
        return True


def main() -> None:
    """Console-script entry point."""
    # Dask's scheduler and nanny narrate every connection at INFO; keep only problems.
    for name in (
        "distributed",
        "distributed.scheduler",
        "distributed.nanny",
        "distributed.core",
        "distributed.http.proxy",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.engine"):
        logging.getLogger(name).addFilter(_NoUserErrorTraceback())
    app()
