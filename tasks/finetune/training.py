"""Fine-tune a backbone end to end: a frozen-base phase, then a partial unfreeze; resumable.

Every epoch writes a full "last" checkpoint and a small state file, so a killed training
resumes where it stopped; the best model by val_loss is evaluated on the test rows and written
as an ordinary run folder, and predicts new images the way it was trained. Input pipelines
live in data.py, the model in model.py; TensorFlow is imported lazily.
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

import numpy as np

from tasks.backbones.registry import get_spec, load_preprocess, resolve_weights
from tasks.classify.models import ClassifierResult, classification_metrics
from tasks.data.scan import Manifest
from tasks.data.splits import rows_key
from tasks.finetune.cache import CACHE_DIR, cache_path, decoded_inputs
from tasks.finetune.data import (
    CachedImages,
    augmentation,
    class_weights,
    image_dataset,
    validation_rows,
)
from tasks.finetune.model import build_finetune_model, compile_model, precision_scope, unfreeze
from tasks.finetune.progress import epoch_progress
from tasks.finetune.settings import MODEL_NAME, FinetuneError, FinetuneSettings, resolved
from tasks.finetune.tta import VIEWS, mean_over_views
from tasks.runs.folder import atomic_write
from tasks.runs.report import write_run
from tasks.runs.schema import RunReport

CHECKPOINTS = "checkpoints"
BEST_FILE, LAST_FILE, STATE_FILE = "best.keras", "last.keras", "state.json"
# settings newer than some saved states, with the value those runs trained with
LATER_SETTINGS = {
    "precision": "float32",
    "brightness_jitter": 0.0,
    "contrast_jitter": 0.0,
    "saturation_jitter": 0.0,
    "hue_jitter": 0.0,
    "label_smoothing": 0.0,
    "tta": False,
}

logger = logging.getLogger(__name__)


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
    stopped_early: list[int] = field(default_factory=list)  # phases early stopping ended
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
    saved = {**LATER_SETTINGS, **state.settings}
    changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
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
    class_weight: dict[int, float] | None = None,
    progress: Callable[[Callable[[int], str]], object] | None = None,
) -> None:
    """Run (or continue) phase 1 then phase 2, checkpointing every epoch into run_dir.

    `model` is the freshly built model, or the last checkpoint when resuming; `datasets(seed)`
    gives (train, validation) pipelines, reshuffled from a seed that moves on with the epoch
    so a resumed run does not replay the shuffles of its first epochs. Phase 2 starts from the
    best weights so far, not from the epochs early stopping waited through. `progress(describe)`
    gives a Keras callback reporting inside each epoch (describe names an epoch).
    """
    import keras

    planned = settings.phase1_epochs + settings.phase2_epochs
    while state.phase <= 2:
        if _phase_done(state, settings):
            if state.wait >= settings.patience:
                state.stopped_early.append(state.phase)
            state.phase += 1
            state.phase_epoch, state.phase_best, state.wait = 0, None, 0
            _save_state(run_dir, state)
            continue
        if state.phase == 2 and state.phase_epoch == 0:
            if state.best_val_loss is not None:
                model.load_weights(run_dir / CHECKPOINTS / BEST_FILE)
            count = unfreeze(model, settings)
            logger.info(
                "phase 2: %d base layers trainable, learning rate %g",
                count,
                settings.phase2_learning_rate,
            )
        epochs = settings.phase1_epochs if state.phase == 1 else settings.phase2_epochs
        keras.utils.set_random_seed(settings.seed + state.epoch)
        train_data, val_data = datasets(settings.seed + state.epoch)
        phase = state.phase

        def describe(epoch: int, phase: int = phase) -> str:
            return f"phase {phase} epoch {epoch + 1}/{planned}"

        inside = [progress(describe)] if progress else []
        model.fit(
            train_data,
            validation_data=val_data,
            initial_epoch=state.epoch,
            epochs=state.epoch + epochs - state.phase_epoch,
            verbose=0,
            shuffle=False,
            class_weight=class_weight,
            callbacks=[
                *inside,
                *_callbacks(run_dir, state, settings, planned, on_epoch),
                *callbacks,
            ],
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
    group_regex: str | None = None,
    progress_interval: float = 30.0,
) -> RunReport:
    """Fine-tune on the training rows, evaluate the best checkpoint on the test rows, and
    write the run folder; returns its report.

    A run_dir holding an interrupted training (checkpoints/state.json) is resumed, provided
    the settings and rows are the same. `callbacks` are extra Keras callbacks, run after the
    checkpointing ones. `group_regex` groups the validation rows by source image, as the
    grouped train/test split does. Inside every epoch, progress is logged every
    `progress_interval` seconds (and shown live on a terminal).
    """
    import keras

    settings = resolved(settings)
    run_dir = Path(run_dir)
    spec = get_spec(settings.backbone)
    weights = resolve_weights(spec, settings.weights, settings.seed)
    fit_rows, val_rows = validation_rows(
        manifest, train_rows, settings.validation_fraction, settings.seed, group_regex
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
        compile_model(model, settings, settings.phase1_learning_rate)
    else:
        logger.info(
            "resuming %s at epoch %d (phase %d)", run_dir.name, state.epoch + 1, state.phase
        )
        with precision_scope(settings):  # the model's own policy decides float16's loss scaling
            model = keras.saving.load_model(run_dir / CHECKPOINTS / LAST_FILE)

    labels = np.asarray(manifest.labels)
    n_classes = len(manifest.class_names)
    # label smoothing's loss takes one-hot targets; the sparse loss takes class indices
    targets = np.eye(n_classes, dtype=np.float32)[labels] if settings.label_smoothing else labels
    preprocess = load_preprocess(spec)
    cache = (
        decoded_inputs(run_dir.parent / CACHE_DIR, manifest, settings.image_size)
        if settings.cache_inputs
        else None
    )
    weights_by_class = (
        class_weights(labels[fit_rows], n_classes) if settings.class_weight == "balanced" else None
    )

    def pipeline(rows: np.ndarray, augment=None, shuffle_seed: int | None = None, views=False):
        return image_dataset(
            manifest.paths(rows) if cache is None else CachedImages(cache, rows),
            None if views else targets[rows],
            settings.image_size,
            preprocess,
            tta_batch(settings.batch_size) if views else settings.batch_size,
            augment=augment,
            shuffle_seed=shuffle_seed,
            views=views,
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
        weights_by_class,
        lambda describe: epoch_progress(
            len(fit_rows), settings.batch_size, describe, progress_interval
        ),
    )

    if state.best_val_loss is None or not math.isfinite(state.best_val_loss):
        raise FinetuneError(
            "the best checkpoint has no finite val_loss (training diverged); "
            "lower the learning rate or try batch_norm"
        )
    # Without its optimizer state the saved model is half the size and needs no compile.
    best = keras.saving.load_model(run_dir / CHECKPOINTS / BEST_FILE, compile=False)
    began = time.perf_counter()
    probabilities = best.predict(pipeline(test_rows, views=settings.tta), verbose=0)
    if settings.tta:
        probabilities = mean_over_views(probabilities)
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
        "validation": _validation_kind(manifest, fit_rows, val_rows, group_regex),
        "test_time_augmentation": f"{VIEWS} dihedral views, softmax averaged"
        if settings.tta
        else None,
        "class_weight": (
            {manifest.class_names[c]: w for c, w in weights_by_class.items()}
            if weights_by_class
            else None
        ),
        "early_stopping": {
            "monitor": "val_loss",
            "patience": settings.patience,
            "best_epoch": state.best_epoch,
            "stopped_early_in_phases": state.stopped_early,
            "restored": "best weights at the end of phase 1 and for the test",
        },
        "input_cache": str(cache_path(run_dir.parent / CACHE_DIR, manifest, settings.image_size))
        if cache is not None
        else None,
        "resumes": state.resumes,
        "train_seconds": state.train_seconds,
        # training images through fit() per second of training, validation passes included
        "train_images_per_second": state.epoch * len(fit_rows) / state.train_seconds,
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


def _validation_kind(
    manifest: Manifest, fit_rows: np.ndarray, val_rows: np.ndarray, group_regex: str | None
) -> str:
    """How the validation rows were chosen, in words, for the report."""
    if manifest.records[val_rows[0]].split == "valid":
        return "the dataset's valid/ tree"
    if group_regex:
        return f"grouped by source image (file-name regex {group_regex!r})"
    return "stratified"


def tta_batch(batch_size: int) -> int:
    """Images per batch under test-time augmentation: the model still sees about batch_size
    inputs per step, not 8 times as many."""
    return max(1, batch_size // VIEWS)


def predict_finetuned(
    report: RunReport,
    model,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    tta: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[str], np.ndarray]:
    """Class names and softmax probabilities of a fine-tuning run's model (already loaded and
    checked by the caller) for image files, decoded and preprocessed exactly as in training
    (augmentation off); with `tta`, averaged over each image's 8 dihedral views.
    `progress(done, total)` counts images after every batch."""
    import keras

    settings = report.settings
    spec = get_spec(settings["backbone"])
    per_batch = tta_batch(batch_size) if tta else batch_size
    dataset = image_dataset(
        paths, None, settings["image_size"], load_preprocess(spec), per_batch, views=tta
    )
    total = len(paths)
    report_batch = keras.callbacks.LambdaCallback(
        on_predict_batch_end=lambda batch, logs: progress(
            min((batch + 1) * per_batch, total), total
        )
    )
    callbacks = [report_batch] if progress else []
    probabilities = np.asarray(model.predict(dataset, verbose=0, callbacks=callbacks))
    if tta:
        probabilities = mean_over_views(probabilities)
    names = report.class_names
    return [names[i] for i in np.argmax(probabilities, axis=1)], probabilities
