"""Fine-tuning in 16-bit mixed precision: the model trains in it, the report records it, the
global Keras policy is left as it was, predict works on the saved model, and a resumed run
keeps the precision it started with."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.finetune import FinetuneFlowSettings, resolve_run
from flows.settings import SettingsError
from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.finetune.model import base_of
from tasks.finetune.settings import FinetuneError, FinetuneSettings
from tasks.finetune.training import read_state, run_finetune
from tasks.runs.folder import new_run_id, read_report
from tasks.runs.predict import plan_prediction, predict_folder

# Random-init VGG16 at 32px with a tiny head and no augmentation: seconds per epoch.
TINY = dict(
    backbone="vgg16",
    weights="none",
    image_size=32,
    head=(4,),
    phase1_epochs=1,
    phase2_epochs=0,
    batch_size=8,
    augment="none",
)


def _crash(epoch: int, logs: dict) -> None:
    """Simulate a crash at the end of an epoch, after the checkpoints have been written."""
    raise RuntimeError("simulated crash")


def _conv_dtypes(model) -> set[str]:
    """The compute dtypes of the backbone's convolutions inside a fine-tuning model."""
    import keras

    return {
        layer.dtype_policy.compute_dtype
        for layer in base_of(model).layers
        if isinstance(layer, keras.layers.Conv2D)
    }


def _probe(seen: dict):
    """A callback noting, as training begins, how the model being trained computes."""
    import keras

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["conv"] = _conv_dtypes(self.model)
            seen["softmax"] = self.model.get_layer("head_softmax").dtype_policy.compute_dtype
            seen["model"] = self.model.dtype_policy.name
            seen["optimizer"] = type(self.model.optimizer).__name__

    return Probe()


@pytest.mark.slow
def test_a_bfloat16_run_trains_in_bfloat16_records_it_and_predicts(
    image_tree: Path, tmp_path: Path
) -> None:
    import keras

    manifest = scan(image_tree)
    train, test = split_rows(manifest, "stratified", 0.25, seed=0)
    run_dir = tmp_path / "runs" / new_run_id()
    seen: dict = {}
    settings = FinetuneSettings(**TINY, precision="bfloat16")
    report = run_finetune(manifest, train, test, settings, run_dir, callbacks=[_probe(seen)])

    assert seen["conv"] == {"bfloat16"}  # the base's convolutions computed in bfloat16
    assert seen["softmax"] == "float32"
    assert keras.config.dtype_policy().name == "float32"  # a later extraction is unaffected
    assert report.settings["precision"] == "bfloat16"
    assert read_report(run_dir).settings["precision"] == "bfloat16"

    plan = plan_prediction(run_dir)  # loads the saved model, as `featurepipe predict` does
    assert _conv_dtypes(plan.model) == {"bfloat16"}
    rows, _, info = predict_folder(plan, image_tree)
    assert len(rows) == info["images_computed"] == len(manifest.records)
    assert {row["predicted_class"] for row in rows} <= set(manifest.class_names)
    for row in rows:
        assert sum(row[f"score_{c}"] for c in manifest.class_names) == pytest.approx(1.0, 1e-5)


@pytest.mark.slow
def test_a_resumed_run_keeps_the_precision_it_started_with(
    image_tree: Path, tmp_path: Path
) -> None:
    """float16 shows it most: a model loaded outside its policy would lose its loss scaling."""
    import keras

    manifest = scan(image_tree)
    train, test = split_rows(manifest, "stratified", 0.25, seed=0)
    run_dir = tmp_path / "runs" / new_run_id()
    settings = FinetuneSettings(**{**TINY, "phase1_epochs": 2}, precision="float16")
    recorded = FinetuneFlowSettings(data=image_tree, runs=run_dir.parent, **settings.model_dump())
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_finetune(
            manifest,
            train,
            test,
            settings,
            run_dir,
            run_settings=recorded.run_settings(),
            callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=_crash)],
        )
    assert read_state(run_dir).epoch == 1

    float32 = settings.model_copy(update={"precision": "float32"})
    with pytest.raises(FinetuneError, match="precision differ"):
        run_finetune(manifest, train, test, float32, run_dir)
    with pytest.raises(SettingsError, match="different precision"):
        resolve_run(
            FinetuneFlowSettings(runs=run_dir.parent, resume=run_dir.name, precision="float32")
        )
    resumed, _ = resolve_run(FinetuneFlowSettings(runs=run_dir.parent, resume=run_dir.name))
    assert resumed.precision == "float16"

    seen: dict = {}
    report = run_finetune(
        manifest, train, test, resumed.finetune_settings(), run_dir, callbacks=[_probe(seen)]
    )
    assert seen["conv"] == {"float16"}
    assert (seen["model"], seen["optimizer"]) == ("mixed_float16", "LossScaleOptimizer")
    assert report.extras["resumes"] == 1
    assert report.settings["precision"] == "float16"
    assert keras.config.dtype_policy().name == "float32"
