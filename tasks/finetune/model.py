"""The fine-tuning model: a backbone under a small dense head, and which base layers phase 2 trains.

TensorFlow is imported inside the functions that build or change a model.
"""

from __future__ import annotations

from tasks.backbones.registry import BackboneError, get_spec, resolve_weights
from tasks.finetune.settings import FinetuneSettings


def precision_scope(settings: FinetuneSettings):
    """The Keras dtype policy of settings.precision, for building or loading the model; the
    global policy is restored afterwards. A checkpoint loaded outside it would get a float32
    model around its 16-bit layers: float16 would lose its loss scaling and optimizer state."""
    from tasks.backbones.precision import keras_policy, resolve_precision

    return keras_policy(resolve_precision(settings.precision))


def build_finetune_model(settings: FinetuneSettings, n_classes: int):
    """Backbone (frozen, for phase 1) -> pooling -> (BatchNormalization) ->
    [Dense relu, Dropout]* -> softmax, built in settings.precision (every layer keeps it).

    `settings` must be resolved(); an unknown unfreeze_from layer fails here, before training.
    """
    import keras

    keras.utils.set_random_seed(settings.seed)
    with precision_scope(settings):
        return _build(settings, n_classes)


def _build(settings: FinetuneSettings, n_classes: int):
    """The model, its layers in the dtype policy current when it is called."""
    import keras

    from tasks.backbones.registry import build_base

    spec = get_spec(settings.backbone)
    base = build_base(
        spec, resolve_weights(spec, settings.weights, settings.seed), settings.image_size
    )
    phase2_layers(base, settings)
    base.trainable = False
    inputs = keras.Input((settings.image_size, settings.image_size, 3), name="image")
    x = pooled(base(inputs), spec.name)
    if settings.batch_norm:
        x = keras.layers.BatchNormalization(name="head_norm")(x)
    for i, units in enumerate(settings.head, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense{i}")(x)
        x = keras.layers.Dropout(settings.dropout, seed=settings.seed + i, name=f"head_dropout{i}")(
            x
        )
    # float32 whatever the compute policy: a bfloat16 softmax rounds the loss's probabilities
    outputs = keras.layers.Dense(
        n_classes, activation="softmax", dtype="float32", name="head_softmax"
    )(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_finetune")


def pooled(features, backbone: str):
    """One vector per image from whatever the base ends with: a feature map is averaged over
    its positions (head_pool); a base that already pools (Lite0 ends in `avg_pool`) is used
    as it is."""
    import keras

    pools = {3: keras.layers.GlobalAveragePooling1D, 4: keras.layers.GlobalAveragePooling2D}
    rank = len(features.shape)
    if rank == 2:
        return features
    if rank not in pools:
        raise BackboneError(f"{backbone} ends in shape {features.shape}: no head fits it")
    return pools[rank](name="head_pool")(features)


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


def base_of(model):
    """The backbone inside a fine-tuning model (built or loaded from a checkpoint)."""
    import keras

    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def compile_model(model, settings: FinetuneSettings, learning_rate: float) -> None:
    """Optimizer, loss and accuracy. Label smoothing needs one-hot targets (Keras's sparse
    loss has no smoothing): the pipelines give them when settings.label_smoothing is set."""
    import keras

    optimizer = keras.optimizers.get(
        {"class_name": settings.optimizer, "config": {"learning_rate": learning_rate}}
    )
    loss = (
        keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing)
        if settings.label_smoothing
        else "sparse_categorical_crossentropy"
    )
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])


def unfreeze(model, settings: FinetuneSettings) -> int:
    """Switch the model to phase 2: train the chosen base layers; returns how many."""
    base = base_of(model)
    chosen = phase2_layers(base, settings)
    base.trainable = True
    for layer in base.layers:
        layer.trainable = False
    for layer in chosen:
        layer.trainable = True
    compile_model(model, settings, settings.phase2_learning_rate)
    return len(chosen)
