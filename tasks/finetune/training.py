"""Fine-tune a keras.applications backbone end to end: a frozen-base phase, then a partial unfreeze.

Images stream from disk through tf.data with the same Pillow decoding as extraction, so the
dataset is never held in memory. Every epoch writes a full "last" checkpoint and a small state
file, so a killed training resumes where it stopped; the best model by val_loss is evaluated on
the test rows and written as an ordinary run folder. TensorFlow is imported lazily.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.backbones.registry import (
    BackboneError,
    get_spec,
    load_preprocess,
    resolve_weights,
)
from tasks.backbones.settings import BackboneSettings
from tasks.classify.models import ClassifierResult, classification_metrics, validation_split
from tasks.data.scan import Manifest
from tasks.data.splits import rows_key
from tasks.errors import UserError
from tasks.runs.folder import atomic_write, load_model, read_report
from tasks.runs.report import write_run
from tasks.runs.schema import RunReport

MODEL_NAME = "finetune"  # the classifier name in report.json, beside svm, logreg, ...
CHECKPOINTS = "checkpoints"
BEST_FILE, LAST_FILE, STATE_FILE = "best.keras", "last.keras", "state.json"
OPTIMIZERS = ("adam", "adamw", "nadam", "rmsprop", "sgd")
FLIP_MODES = ("none", "horizontal", "vertical", "horizontal_and_vertical")

logger = logging.getLogger(__name__)


class FinetuneError(UserError):
    """Fine-tuning cannot start or resume with these settings; the message says why."""


class FinetuneSettings(BackboneSettings):
    """Everything that decides the fine-tuned model (data selection is the caller's)."""

    head: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (512, 64), description="Dense(relu) widths after global average pooling"
    )
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="After every hidden Dense layer")
    batch_norm: bool = Field(
        False,
        description="BatchNormalization after pooling: VGG-style pooled features are "
        "unnormalised (hed-vgg16 reaches ~190) and can stall the ReLU head",
    )
    optimizer: Literal[OPTIMIZERS] = "adam"
    phase1_epochs: int = Field(10, ge=0, description="Epochs with the base frozen")
    phase1_learning_rate: float = Field(1e-3, gt=0.0)
    phase2_epochs: int = Field(10, ge=0, description="Epochs with the top of the base trained")
    phase2_learning_rate: float = Field(1e-5, gt=0.0)
    unfreeze_last: int = Field(4, ge=0, description="Base layers trained in phase 2")
    unfreeze_from: str | None = Field(
        None, description="Or: train every layer from this one (wins if given)"
    )
    patience: int = Field(5, ge=1, description="Early stopping on val_loss, per phase")
    validation_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Of the training rows, when there is no valid/ tree"
    )
    flip: Literal[FLIP_MODES] = "horizontal"
    rotation: float = Field(0.05, ge=0.0, le=1.0, description="Fraction of a full turn; 0: off")
    zoom: float = Field(0.1, ge=0.0, lt=1.0)
    translation: float = Field(0.1, ge=0.0, lt=1.0)
    contrast: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _trains(self):
        if self.phase1_epochs + self.phase2_epochs == 0:
            raise ValueError("at least one epoch is needed (phase1_epochs + phase2_epochs)")
        return self


@dataclass
class TrainState:
    """What an interrupted training needs to continue: written after every epoch."""

    settings: dict
    keys: dict
    run_settings: dict
    phase: int = 1
    phase_epoch: int = 0  # epochs completed in `phase`
    epoch: int = 0  # epochs completed overall
    best_val_loss: float | None = None  # the model in best.keras
    best_epoch: int | None = None
    phase_best: float | None = None  # early stopping's reference in this phase
    wait: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    train_seconds: float = 0.0
    resumes: int = 0


@dataclass(frozen=True)
class EpochLog:
    """One finished epoch, handed to the caller's logger/progress sink."""

    phase: int
    epoch: int  # 1-based, counted over both phases
    epochs_planned: int
    metrics: dict[str, float]
    seconds: float


EpochCallback = Callable[[EpochLog], None]


def _log_epoch(entry: EpochLog) -> None:
    logger.info(
        "phase %d epoch %d/%d: %s (%.1f s)",
        entry.phase,
        entry.epoch,
        entry.epochs_planned,
        ", ".join(f"{k} {v:.4f}" for k, v in entry.metrics.items()),
        entry.seconds,
    )


def resolved(settings: FinetuneSettings) -> FinetuneSettings:
    """Settings with the image size filled in, as stored in state and report."""
    spec = get_spec(settings.backbone)
    size = settings.image_size or spec.default_size
    return settings.model_copy(update={"backbone": spec.name, "image_size": size})


def augmentation(settings: FinetuneSettings):
    """Keras preprocessing layers for the training batches, or None when all are off.

    They run inside tf.data on 0..255 images, before preprocess_input: RandomContrast clips
    to that range, so it must see the raw pixels, and validation/test pipelines skip it.
    """
    import keras

    seed = settings.seed
    layers = []
    if settings.flip != "none":
        layers.append(keras.layers.RandomFlip(settings.flip, seed=seed))
    if settings.rotation:
        layers.append(keras.layers.RandomRotation(settings.rotation, seed=seed + 1))
    if settings.zoom:
        layers.append(keras.layers.RandomZoom(settings.zoom, seed=seed + 2))
    if settings.translation:
        layers.append(
            keras.layers.RandomTranslation(
                settings.translation, settings.translation, seed=seed + 3
            )
        )
    if settings.contrast:
        layers.append(keras.layers.RandomContrast(settings.contrast, seed=seed + 4))
    return keras.Sequential(layers, name="augmentation") if layers else None


def image_dataset(
    paths: Sequence[str | Path],
    labels: Sequence[int] | None,
    image_size: int,
    preprocess: Callable,
    batch_size: int,
    *,
    augment=None,
    shuffle_seed: int | None = None,
):
    """A tf.data pipeline from files: (shuffle paths) -> parallel Pillow decode -> batch ->
    (augment) -> preprocess_input -> prefetch. Only paths sit in memory, never the images."""
    import tensorflow as tf

    from tasks.data.images import load_rgb

    columns = [tf.constant([str(p) for p in paths])]
    if labels is not None:
        columns.append(tf.constant(np.asarray(labels, dtype=np.int32)))
    dataset = tf.data.Dataset.from_tensor_slices(tuple(columns))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)

    def decode(path, *rest):
        image = tf.py_function(
            lambda p: load_rgb(p.numpy().decode(), image_size), [path], tf.float32
        )
        image.set_shape((image_size, image_size, 3))
        return (image, *rest)

    auto = tf.data.AUTOTUNE
    dataset = dataset.map(decode, num_parallel_calls=auto).batch(batch_size)
    if augment is not None:
        dataset = dataset.map(
            lambda x, *rest: (augment(x, training=True), *rest), num_parallel_calls=auto
        )
    dataset = dataset.map(lambda x, *rest: (preprocess(x), *rest), num_parallel_calls=auto)
    return dataset.prefetch(auto)


def build_finetune_model(settings: FinetuneSettings, n_classes: int):
    """Backbone (frozen, for phase 1) -> GlobalAveragePooling -> (BatchNormalization) ->
    [Dense relu, Dropout]* -> softmax.

    `settings` must be resolved(); an unknown unfreeze_from layer fails here, before training.
    """
    import keras

    from tasks.backbones.registry import build_base

    spec = get_spec(settings.backbone)
    keras.utils.set_random_seed(settings.seed)
    base = build_base(
        spec, resolve_weights(spec, settings.weights, settings.seed), settings.image_size
    )
    phase2_layers(base, settings)
    base.trainable = False
    inputs = keras.Input((settings.image_size, settings.image_size, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(base(inputs))
    if settings.batch_norm:
        x = keras.layers.BatchNormalization(name="head_norm")(x)
    for i, units in enumerate(settings.head, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense{i}")(x)
        x = keras.layers.Dropout(settings.dropout, seed=settings.seed + i, name=f"head_dropout{i}")(
            x
        )
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="head_softmax")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_finetune")


def phase2_layers(base, settings: FinetuneSettings) -> list:
    """The base layers phase 2 trains: from `unfreeze_from` on, else the last `unfreeze_last`.

    BatchNormalization layers are left out: trainable=False keeps them in inference mode, so
    small fine-tuning batches do not wreck their ImageNet statistics.
    """
    import keras

    layers = base.layers[1:]  # [0] is the input layer
    if settings.unfreeze_from:
        names = [layer.name for layer in layers]
        if settings.unfreeze_from not in names:
            raise BackboneError(
                f"unknown layer {settings.unfreeze_from!r} for "
                f"{settings.backbone}; layers: {', '.join(names)}"
            )
        chosen = layers[names.index(settings.unfreeze_from) :]
    else:
        chosen = layers[len(layers) - settings.unfreeze_last :] if settings.unfreeze_last else []
    return [layer for layer in chosen if not isinstance(layer, keras.layers.BatchNormalization)]


def _base(model):
    import keras

    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def _compile(model, settings: FinetuneSettings, learning_rate: float) -> None:
    import keras

    optimizer = keras.optimizers.get(
        {"class_name": settings.optimizer, "config": {"learning_rate": learning_rate}}
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def _unfreeze(model, settings: FinetuneSettings) -> int:
    """Switch the model to phase 2: train the chosen base layers; returns how many."""
    base = _base(model)
    chosen = phase2_layers(base, settings)
    base.trainable = True
    for layer in base.layers:
        layer.trainable = False
    for layer in chosen:
        layer.trainable = True
    _compile(model, settings, settings.phase2_learning_rate)
    return len(chosen)


def validation_rows(
    manifest: Manifest, train_rows: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit_rows, val_rows): the dataset's own valid/ rows if the training rows hold any,
    else a seeded split of the training rows, stratified when the classes allow it."""
    train_rows = np.asarray(train_rows)
    splits = np.asarray([manifest.records[i].split for i in train_rows])
    if (splits == "valid").any():
        return train_rows[splits != "valid"], train_rows[splits == "valid"]
    labels = np.asarray(manifest.labels)[train_rows]
    fit, val, _, _ = validation_split(train_rows, labels, fraction, seed)
    return np.sort(fit), np.sort(val)


def read_state(run_dir: Path) -> TrainState | None:
    """The saved training state of a run folder, or None if training never finished an epoch."""
    path = Path(run_dir) / CHECKPOINTS / STATE_FILE
    return TrainState(**json.loads(path.read_text())) if path.is_file() else None


def _zip_intact(path: Path) -> bool:
    """A .keras file is a zip: a checkpoint cut short by a kill fails this check."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def _resumed_state(run_dir: Path, settings: dict, keys: dict) -> TrainState | None:
    """The state to continue from, after checking it belongs to the same settings and rows."""
    state = read_state(run_dir)
    if state is None:
        return None
    changed = sorted(
        k
        for k in settings.keys() | state.settings.keys()
        if settings.get(k) != state.settings.get(k)
    )
    changed += sorted(k for k in keys if keys[k] != state.keys.get(k))
    if changed:
        raise FinetuneError(
            f"cannot resume {run_dir.name}: {', '.join(changed)} differ from the "
            "interrupted run; resume with its settings or start a new run"
        )
    if not _zip_intact(run_dir / CHECKPOINTS / LAST_FILE):
        raise FinetuneError(
            f"{run_dir / CHECKPOINTS / LAST_FILE} is missing or damaged; start a new run"
        )
    if not _zip_intact(run_dir / CHECKPOINTS / BEST_FILE):
        state.best_val_loss = None  # killed while saving it: the next epoch saves a new best
    state.resumes += 1
    return state


def _save_state(run_dir: Path, state: TrainState) -> None:
    atomic_write(
        run_dir / CHECKPOINTS / STATE_FILE,
        lambda p: p.write_text(json.dumps(asdict(state), indent=1)),
    )


def _callbacks(
    run_dir: Path,
    state: TrainState,
    settings: FinetuneSettings,
    planned: int,
    on_epoch: EpochCallback,
) -> list:
    """Best checkpoint, resumable early stopping, then last checkpoint + state, in that order:
    state.json is written last, so it never claims an epoch whose files are not on disk."""
    import keras

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """EarlyStopping that continues counting from the saved state after a resume."""

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self.best, self.wait = state.phase_best, state.wait

    class SaveState(keras.callbacks.Callback):
        """Per epoch: history, last checkpoint, state.json, then the caller's log/progress."""

        def on_epoch_begin(self, epoch, logs=None):
            self.began = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            for key, value in metrics.items():
                state.history.setdefault(key, []).append(value)
            if checkpoint.best is not None and checkpoint.best != state.best_val_loss:
                # Mirror what best.keras holds rather than re-deriving ModelCheckpoint's rule.
                state.best_val_loss, state.best_epoch = float(checkpoint.best), epoch + 1
            state.phase_best, state.wait = stopper.best, stopper.wait
            state.epoch, state.phase_epoch = epoch + 1, state.phase_epoch + 1
            seconds = time.perf_counter() - self.began
            state.train_seconds += seconds
            atomic_write(run_dir / CHECKPOINTS / LAST_FILE, self.model.save)
            _save_state(run_dir, state)
            on_epoch(EpochLog(state.phase, epoch + 1, planned, metrics, seconds))

    checkpoint = keras.callbacks.ModelCheckpoint(
        str(run_dir / CHECKPOINTS / BEST_FILE),
        monitor="val_loss",
        save_best_only=True,
        initial_value_threshold=state.best_val_loss,
    )
    stopper = ResumableEarlyStopping(monitor="val_loss", patience=settings.patience)
    return [checkpoint, stopper, SaveState()]


def _phase_done(state: TrainState, settings: FinetuneSettings) -> bool:
    epochs = settings.phase1_epochs if state.phase == 1 else settings.phase2_epochs
    return state.phase_epoch >= epochs or state.wait >= settings.patience


def train(
    model,
    datasets: Callable[[int], tuple],
    run_dir: Path,
    state: TrainState,
    settings: FinetuneSettings,
    on_epoch: EpochCallback = _log_epoch,
    callbacks: Sequence = (),
) -> None:
    """Run (or continue) phase 1 then phase 2, checkpointing every epoch into run_dir.

    `model` is the freshly built model, or the last checkpoint when resuming; `datasets(seed)`
    gives (train, validation) pipelines, reshuffled from a seed that moves on with the epoch
    so a resumed run does not replay the shuffles of its first epochs.
    """
    import keras

    planned = settings.phase1_epochs + settings.phase2_epochs
    while state.phase <= 2:
        if _phase_done(state, settings):
            state.phase += 1
            state.phase_epoch, state.phase_best, state.wait = 0, None, 0
            _save_state(run_dir, state)
            continue
        if state.phase == 2 and state.phase_epoch == 0:
            count = _unfreeze(model, settings)
            logger.info(
                "phase 2: %d base layers trainable, learning rate %g",
                count,
                settings.phase2_learning_rate,
            )
        epochs = settings.phase1_epochs if state.phase == 1 else settings.phase2_epochs
        keras.utils.set_random_seed(settings.seed + state.epoch)
        train_data, val_data = datasets(settings.seed + state.epoch)
        model.fit(
            train_data,
            validation_data=val_data,
            initial_epoch=state.epoch,
            epochs=state.epoch + epochs - state.phase_epoch,
            verbose=0,
            shuffle=False,
            callbacks=[*_callbacks(run_dir, state, settings, planned, on_epoch), *callbacks],
        )


def run_finetune(
    manifest: Manifest,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    settings: FinetuneSettings,
    run_dir: Path,
    *,
    run_settings: dict | None = None,
    extras: dict | None = None,
    on_epoch: EpochCallback = _log_epoch,
    callbacks: Sequence = (),
) -> RunReport:
    """Fine-tune on the training rows, evaluate the best checkpoint on the test rows, and
    write the run folder; returns its report.

    A run_dir holding an interrupted training (checkpoints/state.json) is resumed, provided
    the settings and rows are the same. `callbacks` are extra Keras callbacks, run after the
    checkpointing ones.
    """
    import keras

    settings = resolved(settings)
    run_dir = Path(run_dir)
    spec = get_spec(settings.backbone)
    weights = resolve_weights(spec, settings.weights, settings.seed)
    fit_rows, val_rows = validation_rows(
        manifest, train_rows, settings.validation_fraction, settings.seed
    )
    if not len(fit_rows) or not len(val_rows) or not len(test_rows):
        raise FinetuneError(
            f"need training, validation and test images; got {len(fit_rows)}, "
            f"{len(val_rows)} and {len(test_rows)}"
        )
    keys = {
        "manifest": manifest.key,
        "weights": weights.identity,
        "fit_rows": rows_key(fit_rows),
        "valid_rows": rows_key(val_rows),
        "test_rows": rows_key(test_rows),
    }
    report_settings = {
        "dataset": manifest.root,
        "layer": MODEL_NAME,
        **(run_settings or {}),
        **settings.model_dump(mode="json"),
    }
    stored = settings.model_dump(mode="json")  # tuples -> lists, as read back from JSON
    state = _resumed_state(run_dir, stored, keys)
    if state is None:
        state = TrainState(settings=stored, keys=keys, run_settings=report_settings)
        (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        model = build_finetune_model(settings, len(manifest.class_names))
        _compile(model, settings, settings.phase1_learning_rate)
    else:
        logger.info(
            "resuming %s at epoch %d (phase %d)", run_dir.name, state.epoch + 1, state.phase
        )
        model = keras.saving.load_model(run_dir / CHECKPOINTS / LAST_FILE)

    labels = np.asarray(manifest.labels)
    preprocess = load_preprocess(spec)

    def pipeline(rows: np.ndarray, augment=None, shuffle_seed: int | None = None):
        return image_dataset(
            manifest.paths(rows),
            labels[rows],
            settings.image_size,
            preprocess,
            settings.batch_size,
            augment=augment,
            shuffle_seed=shuffle_seed,
        )

    augment = augmentation(settings)
    train(
        model,
        lambda seed: (pipeline(fit_rows, augment, seed), pipeline(val_rows)),
        run_dir,
        state,
        settings,
        on_epoch,
        callbacks,
    )

    if state.best_val_loss is None or not math.isfinite(state.best_val_loss):
        raise FinetuneError(
            "the best checkpoint has no finite val_loss (training diverged); "
            "lower the learning rate or try batch_norm"
        )
    # Without its optimizer state the saved model is half the size and needs no compile.
    best = keras.saving.load_model(run_dir / CHECKPOINTS / BEST_FILE, compile=False)
    began = time.perf_counter()
    probabilities = best.predict(pipeline(test_rows), verbose=0)
    predict_seconds = time.perf_counter() - began
    y_test, y_pred = labels[test_rows], np.argmax(probabilities, axis=1)
    metrics, confusion = classification_metrics(y_test, y_pred, manifest.class_names)
    result = ClassifierResult(
        name=MODEL_NAME,
        model=best,
        y_pred=y_pred,
        scores=probabilities,
        metrics=metrics,
        confusion=confusion,
        fit_seconds=state.train_seconds,
        predict_seconds=predict_seconds,
        history=state.history,
        best_params={
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "best_val_loss": state.best_val_loss,
        },
    )
    info = {
        "n_train": len(fit_rows),
        "n_valid": len(val_rows),
        "n_test": len(test_rows),
        "resumes": state.resumes,
        "train_seconds": state.train_seconds,
        **(extras or {}),
    }
    report = write_run(
        run_dir,
        settings=state.run_settings,
        keys=keys,
        results=[result],
        class_names=manifest.class_names,
        test_files=[manifest.records[i].path for i in test_rows],
        y_test=y_test,
        image_root=manifest.root,
        extras=info,
    )
    for name in (BEST_FILE, LAST_FILE):  # models/ holds the best model now; resume is over
        (run_dir / CHECKPOINTS / name).unlink()
    return report


def predict_finetuned(
    run_dir: Path, paths: Sequence[str | Path], batch_size: int = 32
) -> tuple[list[str], np.ndarray]:
    """Class names and softmax probabilities of a fine-tuned run's model for image files,
    decoded and preprocessed exactly as in training (augmentation off)."""
    report = read_report(run_dir)
    if MODEL_NAME not in report.classifiers:
        raise FinetuneError(
            f"run {Path(run_dir).name} is not a fine-tuning run "
            f"(its models: {', '.join(report.classifiers)})"
        )
    settings = report.settings
    spec = get_spec(settings["backbone"])
    model = load_model(run_dir, MODEL_NAME)
    dataset = image_dataset(paths, None, settings["image_size"], load_preprocess(spec), batch_size)
    probabilities = np.asarray(model.predict(dataset, verbose=0))
    names = report.class_names
    return [names[i] for i in np.argmax(probabilities, axis=1)], probabilities
