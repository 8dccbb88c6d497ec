"""What every Keras model type shares: its params, optimizer and compiling, the input `fit` takes
each epoch, saving, loading and predicting. A Keras model type (imgpipe/models/dense.py, cnn.py)
only says how its network is built; how it is trained (devices, precision, the resumable epoch
loop) is imgpipe/keras_training.py.

Builders return uncompiled models that take raw uint8 pixels (N, H, W, C) and scale them inside
the graph, batch by batch: no float copy of the data set is ever made, and a saved model needs no
separate preprocessing to predict. Keras is imported where it is used, not with this module.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from imgpipe.keras_training import KerasTrainer, epoch_order, in_memory_batches
from imgpipe.precision import PRECISIONS
from imgpipe.registry import EpochCallback, ModelType, TrainingData, TrainResult
from imgpipe.runtime import StageError
from imgpipe.sections import ScheduledTraining

if TYPE_CHECKING:
    import keras

    from imgpipe.checkpoints import TrainingCheckpoint

# params.yaml name -> keras.optimizers class; the params' Literal is built from these keys
OPTIMIZERS = {
    "adam": "Adam",
    "adamw": "AdamW",
    "adamax": "Adamax",
    "rmsprop": "RMSprop",
    "sgd": "SGD",
}


class KerasParams(ScheduledTraining):
    """Knobs every Keras model section has."""

    optimizer: Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]
    # decoupled weight decay (Keras' `weight_decay`, what makes adam AdamW): each step multiplies
    # every weight by 1 - learning_rate * weight_decay; 0 = none
    weight_decay: float = Field(ge=0, lt=1)
    # schedule cosine: epochs of linear warm-up from 0 to learning_rate before the decay starts
    # (may be a fraction); 0 = none
    warmup_epochs: float = Field(ge=0)
    # targets of 1 - s for the true class and s / classes for every class; 0 = plain cross-entropy
    label_smoothing: float = Field(ge=0, lt=1)
    # float32, mixed_bfloat16 (bfloat16 compute, float32 weights: faster only on CPUs with
    # AVX-512 BF16 or AMX, and on GPUs), or auto: the faster of the two for this model on this
    # machine, timed at the start where bfloat16 is native (float32 elsewhere, untimed)
    precision: Literal["auto", *PRECISIONS]  # type: ignore[valid-type]

    @property
    def one_hot_targets(self) -> bool:
        """Whether the loss trains on one-hot rows (N, K) rather than class indices (N,): Keras
        smooths one-hot targets only, and a model type that mixes targets needs them too."""
        return self.label_smoothing > 0

    @model_validator(mode="after")
    def _warmup_within_run(self) -> KerasParams:
        if self.warmup_epochs and self.schedule != "cosine":
            raise ValueError("warmup_epochs needs schedule: cosine (set warmup_epochs: 0)")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs})"
            )
        return self


def build_optimizer(
    params: KerasParams, total_steps: int, *, average: float = 0.0
) -> keras.optimizers.Optimizer:
    """The section's optimizer with its learning-rate schedule and weight decay, and with
    `average` > 0 an exponential moving average of the weights (that momentum) kept in its
    variables, updated after every step.

    exponential: lr * decay_rate ** (step / decay_steps) (decay_rate 1.0 = constant);
    cosine: a linear warm-up from 0 to lr over warmup_epochs (as a share of total_steps), then
    from lr down to 0 over the remaining updates of the run, then 0.
    """
    import keras

    warmup = round(total_steps * params.warmup_epochs / params.epochs)
    rate: float | keras.optimizers.schedules.LearningRateSchedule = params.learning_rate
    if params.schedule == "cosine":
        if warmup:
            rate = keras.optimizers.schedules.CosineDecay(
                0.0,
                max(total_steps - warmup, 1),
                warmup_target=params.learning_rate,
                warmup_steps=warmup,
            )
        else:
            rate = keras.optimizers.schedules.CosineDecay(params.learning_rate, total_steps)
    elif params.decay_rate < 1.0:
        rate = keras.optimizers.schedules.ExponentialDecay(
            params.learning_rate, decay_steps=params.decay_steps, decay_rate=params.decay_rate
        )
    # (explicit for adamw too: Keras' AdamW decays by 0.004 unless told otherwise)
    decay = params.weight_decay or params.optimizer == "adamw"
    options: dict[str, Any] = {"weight_decay": params.weight_decay} if decay else {}
    if average:
        options.update(use_ema=True, ema_momentum=average)
    optimizer = getattr(keras.optimizers, OPTIMIZERS[params.optimizer])(
        learning_rate=rate, **options
    )
    if average:
        # each `fit` ends by copying the averages into the weights; training runs one `fit` per
        # epoch, so that waits for the end of the run (keras_training.use_weight_average)
        optimizer.finalize_variable_values = lambda var_list: None
    return optimizer


def training_loss(params: KerasParams) -> str | keras.losses.Loss:
    """The compiled loss: cross-entropy on class indices, or on one-hot rows where the params
    ask for them (one_hot_targets: see KerasModelType.targets), smoothed or not."""
    if not params.one_hot_targets:
        return "sparse_categorical_crossentropy"
    import keras

    return keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)


class KerasModelType(ModelType):
    """A Keras network: subclasses say how it is built; training, files and prediction are here."""

    weights_file: ClassVar[str] = "model.keras"
    resumable: ClassVar[bool] = True
    streams: ClassVar[bool] = True  # a table over train.stream_over_mb feeds fit as a generator

    @abstractmethod
    def build(
        self, input_shape: tuple[int, int, int], num_classes: int, params: Any
    ) -> keras.Model:
        """An uncompiled model: uint8 pixels (N, H, W, C) in, (N, num_classes) softmax out."""

    def compiled_model(
        self,
        params: KerasParams,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        train_size: int,
        precision: str,
    ) -> keras.Model:
        """The model built in `precision` (one of PRECISIONS) and compiled as training does.

        train_size (the number of training images) sets the length of a cosine schedule.
        """
        import keras

        keras.mixed_precision.set_dtype_policy(precision)
        try:
            model = self.build(input_shape, num_classes, params)  # type: ignore[arg-type]
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        steps = params.epochs * math.ceil(train_size / params.batch_size)
        model.compile(
            optimizer=build_optimizer(
                params, total_steps=steps, average=self.weight_average(params)
            ),
            loss=training_loss(params),
            metrics=["accuracy"],
        )
        return model

    def weight_average(self, params: Any) -> float:
        """Momentum of the exponential moving average of the weights that training ends with
        (see keras_training.use_weight_average); 0: the last step's weights."""
        return 0.0

    def section_problem(self, params: Any, shape: tuple[int, int, int]) -> str | None:
        """Why the model type's section cannot train on a view of images (H, W, C), or None:
        checked when training starts, before any work (not when params.yaml is read, since
        stages that do not train this model read the same params)."""
        return None

    def prepare_epoch(
        self, model: keras.Model, params: Any, epoch: int, *, train_size: int
    ) -> None:
        """Ready the model to train epoch `epoch` (from 0), before it starts or is restored into:
        nothing for a model trained in one phase; a model type whose training has phases
        (pretrained: frozen, then fine-tuned) sets what trains and compiles the phase's
        optimizer here."""

    @staticmethod
    def targets(params: KerasParams, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """What the compiled loss trains on: class indices (N,), or one-hot rows (N, K) where
        params.one_hot_targets."""
        if not params.one_hot_targets:
            return labels
        return np.eye(num_classes, dtype=np.float32)[labels]

    def train(
        self,
        params: KerasParams,
        data: TrainingData,
        *,
        seed: int,
        on_epoch_end: EpochCallback,
        checkpoint: TrainingCheckpoint | None,
        devices: Literal["auto"] | int,
    ) -> TrainResult:
        """Build, compile and fit the model, resumably and on train.devices: a KerasTrainer's run
        (imgpipe/keras_training.py), once the view is checked (a model type's view_problem and
        section_problem)."""
        problem = self.view_problem(data.image_shape) or self.section_problem(
            params, data.image_shape
        )
        if problem:
            raise StageError(problem)
        trainer = KerasTrainer(
            self,
            params,
            data,
            seed=seed,
            on_epoch_end=on_epoch_end,
            checkpoint=checkpoint,
            devices=devices,
        )
        return trainer.train()

    def epoch_input(
        self,
        params: KerasParams,
        data: TrainingData,
        targets: tuple[np.ndarray, np.ndarray],
        *,
        seed: int,
        epoch: int,
    ) -> dict[str, Any]:
        """`fit`'s data arguments for one epoch, training and validation; targets are
        targets() of data.y_train and data.y_val.

        A table in memory: the rows of training_pixels in epoch_order (uint8, never floats),
        batched by in_memory_batches, as is the val table in memory, in its own order. A
        streamed table: its batches through the shuffle buffer, whose order also depends only
        on (seed, epoch). A streamed val table: its batches in file order.
        """
        y_train, y_val = targets
        if data.train_stream is None:
            pixels = self.training_pixels(params, data, epoch)
            order = epoch_order(len(pixels), seed, epoch)  # reproducibly per epoch
            arguments = {
                "x": in_memory_batches(pixels, y_train, params.batch_size, order),
                "shuffle": False,  # epoch_order shuffled it
            }
        else:
            batches = data.train_stream.shuffled_batches(params.batch_size, seed=seed, epoch=epoch)
            arguments = {
                "x": self.fed_batches(params, batches, data.num_classes),
                "steps_per_epoch": data.train_stream.batch_count(params.batch_size),
                "shuffle": False,  # the stream shuffled it
            }
        return {**arguments, **self.validation_input(params, data, y_val)}

    def training_pixels(self, params: KerasParams, data: TrainingData, epoch: int) -> np.ndarray:
        """The training images epoch `epoch` takes its batches from, when the table is in
        memory: the table itself (a model type may train some epochs on images it derives from
        it once, as the CNN's progressive resizing does)."""
        return data.x_train

    def validation_input(
        self, params: KerasParams, data: TrainingData, y_val: np.ndarray
    ) -> dict[str, Any]:
        """`fit`'s (and `evaluate`'s) validation arguments: a streamed val table's batches in
        file order, or the table in memory (its targets y_val) batched as it is; None where
        there are no val rows."""
        if data.val_stream is not None:
            batches = data.val_stream.ordered_batches(params.batch_size)
            return {
                "validation_data": self.fed_batches(params, batches, data.num_classes),
                "validation_steps": data.val_stream.batch_count(params.batch_size),
            }
        if not len(data.x_val):
            return {"validation_data": None}
        return {"validation_data": in_memory_batches(data.x_val, y_val, params.batch_size)}

    def fed_batches(
        self,
        params: KerasParams,
        batches: Iterator[tuple[np.ndarray, np.ndarray]],
        num_classes: int,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Streamed (pixels, labels) batches as `fit` takes them: (pixels, targets()) each.

        Keras runs a generator in a tf.data pipeline that prefetches: the next row group is
        read and decompressed while the current batches train.
        """
        for pixels, labels in batches:
            yield pixels, self.targets(params, labels, num_classes)

    def inference_model(self, model: keras.Model, params: Any) -> keras.Model:
        """What is saved, evaluated and served once training ends: the trained model itself,
        unless a model type adds test-time work around it (the CNN's flip averaging)."""
        return model

    def save(self, model: keras.Model, path: Path) -> None:
        """The native Keras file: architecture, weights, compile config."""
        model.save(path)

    def load(self, path: Path) -> keras.Model:
        """Load a .keras file (safe mode: no arbitrary code from the file)."""
        import keras

        return keras.saving.load_model(path, safe_mode=True)

    def predict_proba(self, model: keras.Model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Probabilities from the softmax output, batch by batch.

        predict_on_batch, not predict: the same compiled forward pass without predict's
        per-call set-up of a data iterator, which costs more than the forward pass itself for
        the few images of a served request (measured 3.8 against 53 ms for one image, 31
        against 101 ms for 32, with identical probabilities).
        """
        if len(pixels) == 0:
            return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
        return np.concatenate(
            [
                np.asarray(model.predict_on_batch(pixels[start : start + batch_size]))
                for start in range(0, len(pixels), batch_size)
            ]
        )
