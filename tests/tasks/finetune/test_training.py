"""Fine-tuning on generated images: resume after an interruption, run folder, prediction, flow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from flows.finetune import FinetuneFlowSettings, finetune_flow, resolve_run
from flows.settings import SettingsError
from tasks.backbones.registry import BackboneError
from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.finetune.settings import FinetuneSettings
from tasks.finetune.training import (
    BEST_FILE,
    CHECKPOINTS,
    LAST_FILE,
    MODEL_NAME,
    STATE_FILE,
    FinetuneError,
    predict_finetuned,
    read_state,
    run_finetune,
)
from tasks.runs.folder import list_runs, load_model, new_run_id, read_report

# Random-init VGG16 at 32px with a tiny head: seconds per epoch on a shared CPU.
TINY = FinetuneSettings(
    backbone="vgg16",
    weights="none",
    image_size=32,
    head=(8,),
    batch_norm=True,
    phase1_epochs=2,
    phase2_epochs=1,
    unfreeze_last=2,
    batch_size=8,
    augment="affine",  # the Keras layers' path (the dihedral default is tested in test_data)
    rotation=0.1,
    zoom=0.1,
    translation=0.1,
    contrast=0.2,
)


def _with(**changes) -> FinetuneSettings:
    """TINY with some values changed, validated like any settings."""
    return FinetuneSettings(**{**TINY.model_dump(), **changes})


def _crash(epoch: int, logs: dict) -> None:
    """Simulate a crash at the end of an epoch, after the checkpoints have been written."""
    raise RuntimeError("simulated crash")


@pytest.mark.slow
def test_interrupted_training_resumes_and_writes_a_run(image_tree: Path, tmp_path: Path) -> None:
    import keras

    manifest = scan(image_tree)
    train, test = split_rows(manifest, "stratified", 0.25, seed=0)
    run_dir = tmp_path / "runs" / new_run_id()

    # Recorded as the flow records them, so that the flow could resume this run too.
    recorded = FinetuneFlowSettings(data=image_tree, runs=run_dir.parent, **TINY.model_dump())
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_finetune(
            manifest,
            train,
            test,
            TINY,
            run_dir,
            run_settings=recorded.run_settings(),
            callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=_crash)],
        )
    state = read_state(run_dir)
    assert (state.phase, state.epoch, state.phase_epoch) == (1, 1, 1)
    assert (run_dir / CHECKPOINTS / LAST_FILE).is_file()
    assert (run_dir / CHECKPOINTS / BEST_FILE).is_file()
    assert not (run_dir / "report.json").exists()

    with pytest.raises(FinetuneError, match="dropout"):
        run_finetune(manifest, train, test, _with(dropout=0.5), run_dir)
    # as a state written before `precision` existed (those runs trained in float32): resumable
    state_file = run_dir / CHECKPOINTS / STATE_FILE
    saved = json.loads(state_file.read_text())
    del saved["settings"]["precision"], saved["run_settings"]["precision"]
    state_file.write_text(json.dumps(saved))
    resumed, resumed_dir = resolve_run(
        FinetuneFlowSettings(runs=run_dir.parent, resume=run_dir.name)
    )
    assert (resumed.finetune_settings(), resumed.data, resumed_dir) == (TINY, image_tree, run_dir)
    with pytest.raises(SettingsError, match="different dropout"):
        resolve_run(FinetuneFlowSettings(runs=run_dir.parent, resume=run_dir.name, dropout=0.5))

    started: list[int] = []  # 0-based epochs counted over both phases
    record = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, _: started.append(epoch))
    report = run_finetune(manifest, train, test, TINY, run_dir, callbacks=[record])
    assert started == [1, 2]  # epoch 2 of phase 1, then the one epoch of phase 2
    entry = report.classifiers["finetune"]
    confusion = np.asarray(entry.confusion)  # the reported accuracy is the test confusion's
    assert confusion.sum() == len(test) and entry.accuracy == np.trace(confusion) / len(test)
    assert entry.best_params["epochs_run"] == 3
    assert len(entry.history["val_loss"]) == 3
    assert report.extras["resumes"] == 1
    assert report.extras["class_weight"].keys() == {"cats", "dogs"}
    assert report.extras["n_train"] + report.extras["n_valid"] == len(train)
    assert report.extras["early_stopping"]["patience"] == TINY.patience
    assert report.extras["validation"] == "stratified"
    assert Path(report.extras["input_cache"]).parent == run_dir.parent / ".input-cache"
    assert report.settings["image_size"] == 32
    assert json.loads((run_dir / "report.json").read_text())["best_classifier"] == "finetune"
    assert (run_dir / "learning_curves_finetune.png").is_file()
    assert not (run_dir / CHECKPOINTS / LAST_FILE).exists()  # the model now lives in models/
    assert list_runs(run_dir.parent)[0]["accuracy"] == {"finetune": entry.accuracy}

    test_files = [Path(manifest.root) / manifest.records[i].path for i in test]
    model = load_model(run_dir, MODEL_NAME)
    labels, probabilities = predict_finetuned(read_report(run_dir), model, test_files)
    assert probabilities.shape == (len(test), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    truth = [manifest.records[i].label for i in test]
    accuracy = np.mean([a == b for a, b in zip(labels, truth, strict=True)])
    assert accuracy == pytest.approx(entry.accuracy)  # same decode + preprocess


def test_bad_settings_fail_before_training(image_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="optimizer"):
        _with(optimizer="adagrad2")
    with pytest.raises(ValidationError, match="at least one epoch"):
        _with(phase1_epochs=0, phase2_epochs=0)
    with pytest.raises(ValidationError, match="head"):
        _with(head=(8, 0))
    manifest = scan(image_tree)
    train, test = split_rows(manifest, "stratified", 0.25, seed=0)
    with pytest.raises(BackboneError, match="unknown layer 'block9_conv1'"):
        run_finetune(manifest, train, test, _with(unfreeze_from="block9_conv1"), tmp_path / "run")


@pytest.fixture
def prefect_server():
    """A temporary Prefect server stopped inside the test, not at interpreter exit (where its
    shutdown message would hit pytest's already-closed capture stream)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_flow_writes_a_run_and_refuses_to_resume_a_finished_one(
    image_tree: Path, tmp_path: Path
) -> None:
    settings = FinetuneFlowSettings(
        data=image_tree,
        runs=tmp_path / "runs",
        backbone="vgg16",
        weights="none",
        image_size=32,
        head="8",
        phase1_epochs=1,
        phase2_epochs=0,
        batch_size=8,
        split="grouped",
        group_regex=r"img_\d(\d)",  # img_03 and img_13 are "copies" of source 3
    )
    summary = finetune_flow(settings)
    assert summary["epochs_run"] == 1 and summary["tta"] is False
    assert (Path(summary["run_dir"]) / "report.md").is_file()
    report = read_report(Path(summary["run_dir"]))
    assert report.extras["validation"].startswith("grouped by source image")
    confusion = np.asarray(report.classifiers["finetune"].confusion)
    assert summary["accuracy"] == np.trace(confusion) / confusion.sum()
    with pytest.raises(SettingsError, match="it has finished"):
        finetune_flow(FinetuneFlowSettings(runs=tmp_path / "runs", resume=summary["run_id"]))


@pytest.mark.slow
def test_early_stopping_ends_a_phase_and_phase_two_starts_from_the_best_weights(
    image_tree: Path, tmp_path: Path
) -> None:
    """Phase 1's second epoch is wrecked (the output always says class 0, sure of it): its
    val_loss is far worse, so with patience 1 phase 1 stops there, and phase 2 must start
    from epoch 1's weights."""
    import keras

    manifest = scan(image_tree)
    train, test = split_rows(manifest, "stratified", 0.25, seed=0)
    run_dir = tmp_path / "runs" / new_run_id()
    seen: dict[str, list] = {"fits": []}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["fits"].append(self.model.get_layer("head_softmax").get_weights()[0].copy())
            if len(seen["fits"]) == 2:  # phase 2 begins: what best.keras holds now
                best = keras.saving.load_model(run_dir / CHECKPOINTS / BEST_FILE, compile=False)
                seen["best"] = best.get_layer("head_softmax").get_weights()[0]

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                layer = self.model.get_layer("head_softmax")
                kernel, _ = layer.get_weights()
                layer.set_weights([np.zeros_like(kernel), np.array([100.0, -100.0])])

    settings = _with(phase1_epochs=4, phase2_epochs=1, patience=1, augment="none")
    report = run_finetune(manifest, train, test, settings, run_dir, callbacks=[Probe()])
    early = report.extras["early_stopping"]
    assert early["stopped_early_in_phases"] == [1] and early["best_epoch"] in (1, 3)
    assert report.classifiers["finetune"].best_params["epochs_run"] == 3  # 2 + 1
    np.testing.assert_array_equal(seen["fits"][1], seen["best"])
    assert np.abs(seen["fits"][1]).max() > 0  # not the wrecked weights
