"""How a Keras model type is trained: the resumable epoch loop (KerasTrainer), its seeding, the
order and batches of each epoch's rows, the training state a checkpoint holds, and the callbacks
of one epoch's `fit`. What a model is (layers, loss, optimizer, files) is imgpipe/keras_models.py.

Keras and TensorFlow are imported where they are used, not with this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from imgpipe.devices import DevicePlan, average_replica_copies, distribution, plan_devices
from imgpipe.precision import PRECISIONS, PrecisionChoice, bfloat16_hardware, choose_precision
from imgpipe.registry import HISTORY_KEYS, TrainResult
from imgpipe.stall import StallWatchdog, stall_seconds

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from imgpipe.checkpoints import CheckpointState, TrainingCheckpoint
    from imgpipe.keras_models import KerasModelType, KerasParams
    from imgpipe.registry import EpochCallback, TrainingData

log = logging.getLogger("imgpipe.keras_training")

# training batches whose batch-norm statistics replace the moving ones after the weights are
# averaged (with momentum 0.9, the last few dozen batches make them)
RECALIBRATION_BATCHES = 50


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and the Keras backend, and ask TensorFlow for deterministic ops."""
    random.seed(seed)
    np.random.seed(seed)
    import keras

    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of one epoch: depends only on (seed, epoch), not on what ran
    before in this process, so a run resumed at epoch k sees the same batches as one that never
    stopped."""
    return np.random.default_rng([seed, epoch]).permutation(n)  # (N,)


def in_memory_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, order: np.ndarray | None = None
) -> tf.data.Dataset:
    """Rows in memory as `fit` takes them: batches of batch_size rows taken in `order` (all rows
    in turn without one; the last batch may be smaller), each gathered from the arrays as it is
    needed, one ahead, on a single thread of its own.

    The same batches `fit(x[order], y[order], batch_size=..., shuffle=False)` makes, without
    its copies: a shuffled copy of the table and a tensor copy of that (a second and more an
    epoch for a 786 MB table of 128x128 images). And Keras' own pipeline for arrays maps
    batches on autotuned parallel threads and prefetches with an autotuned buffer: on two cores
    those threads take turns with the training step's, and steps of the 32-96-192-384 CNN took
    207 to 412 ms through it against 187 to 207 ms through a single thread (100 batches,
    interleaved rounds, avx512_bf16 machine).
    """
    import tensorflow as tf

    rows = np.arange(len(x)) if order is None else np.asarray(order, dtype=np.int64)
    x_shape, y_shape = (None, *x.shape[1:]), (None, *y.shape[1:])

    @tf.autograph.experimental.do_not_convert
    def gather(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pixels, targets = tf.numpy_function(
            lambda i: (x[i], y[i]), [index], (tf.as_dtype(x.dtype), tf.as_dtype(y.dtype))
        )
        return tf.ensure_shape(pixels, x_shape), tf.ensure_shape(targets, y_shape)

    dataset = tf.data.Dataset.from_tensor_slices(rows).batch(batch_size).map(gather).prefetch(1)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def training_state(model: keras.Model) -> dict[str, np.ndarray]:
    """Every variable training changes: weights, batch-norm statistics, the random-seed states of
    dropout and augmentation layers (model.variables) and the optimizer's slots and step count."""
    arrays = {f"model_{i}": np.asarray(v) for i, v in enumerate(model.variables)}
    arrays.update({f"opt_{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)})
    return arrays


def restore_training_state(model: keras.Model, arrays: dict[str, np.ndarray]) -> None:
    """Put back what training_state saved, into a model built and compiled the same way."""
    targets = {f"model_{i}": v for i, v in enumerate(model.variables)}
    targets.update({f"opt_{i}": v for i, v in enumerate(model.optimizer.variables)})
    if set(targets) != set(arrays):
        raise ValueError(
            f"checkpoint holds {len(arrays)} arrays but the model and optimizer have "
            f"{len(targets)} variables"
        )
    for name, variable in targets.items():  # every shape checked before any is assigned
        if tuple(variable.shape) != arrays[name].shape:
            raise ValueError(
                f"checkpoint array {name} has shape {arrays[name].shape}, the model's variable "
                f"{tuple(variable.shape)}"
            )
    for name, variable in targets.items():
        variable.assign(arrays[name])


@dataclass
class Progress:
    """Where a run starts: the epochs a checkpoint holds (none for a fresh run)."""

    history: dict[str, list[float]]  # per epoch, extended as epochs finish
    first_epoch: int  # the first epoch to train (epochs done before)
    earlier_seconds: float  # training time of the epochs done before


@dataclass(frozen=True)
class KerasTrainer:
    """One training run of a Keras model type: build, compile and fit the model, one `fit` call
    per epoch.

    With a checkpoint, each finished epoch is saved to it, and a matching checkpoint found at
    the start is restored: training continues after its last epoch and ends exactly where an
    uninterrupted run would (same batches, same dropout and augmentation draws, same optimizer
    state).

    On several devices (train.devices, see plan_devices) the model, its optimizer and their
    variables are made inside a MirroredStrategy: a copy on every device, each step training on
    params.batch_size / devices images per device and applying the mean gradient to all copies;
    batch normalisation's moving statistics, which each device keeps on its own, are averaged
    over the devices after each epoch. Precision `auto` is timed on one device. The model
    returned is the trained one copied onto one device.
    """

    model_type: KerasModelType
    params: KerasParams
    data: TrainingData
    _: KW_ONLY
    seed: int
    on_epoch_end: EpochCallback
    checkpoint: TrainingCheckpoint | None
    devices: Literal["auto"] | int  # train.devices

    def train(self) -> TrainResult:
        """The run, step by step (see the class)."""
        plan, strategy = self.device_plan()  # before any TensorFlow operation: a CPU split needs it
        state = self.load_checkpoint()
        choice = self.pick_precision(state)  # before seeding: the timing draws random numbers
        self.log_devices(plan, strategy)
        if self.checkpoint is not None:
            self.checkpoint.extra = {**self.checkpoint.extra, "precision": choice.precision}
        seed_everything(self.seed)
        # ready for the checkpoint's last epoch: its optimizer is that epoch's phase's
        last_done = state.epochs_done - 1 if state is not None else 0
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = self.fresh_model(choice.precision, max(last_done, 0))
        progress = self.restore_checkpoint(model, state)
        seconds = self.run_epochs(model, strategy, progress)
        if strategy is not None:
            model = self.copy_to_one_device(model, choice.precision)
        averaged = use_weight_average(self, model) if model.optimizer.use_ema else {}
        return self.result(model, progress, seconds, choice, plan, averaged)

    def device_plan(self) -> tuple[DevicePlan, tf.distribute.Strategy | None]:
        """train.devices on this machine, and the strategy over them (None on one device)."""
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
        plan = plan_devices(self.devices, gpus, self.params.batch_size)
        return plan, distribution(plan)

    def load_checkpoint(self) -> CheckpointState | None:
        """The checkpoint's state, unless there is none or it holds more epochs than this run."""
        state = self.checkpoint.load() if self.checkpoint is not None else None
        if state is not None and state.epochs_done > self.params.epochs:
            state = None
        return state

    def pick_precision(self, state: CheckpointState | None) -> PrecisionChoice:
        """The interrupted run's precision where it is resumed, else choose_precision's; logged."""
        if state is not None and state.extra.get("precision") in PRECISIONS:
            choice = PrecisionChoice(state.extra["precision"], "the interrupted run's choice", {})
        else:
            choice = choose_precision(self.model_type, self.params, self.data, bfloat16_hardware())
        log.info(
            "compute precision %s: %s%s",
            choice.precision,
            choice.reason,
            "".join(f"; {p} {t * 1000:.0f} ms a step" for p, t in choice.step_seconds.items()),
        )
        return choice

    def log_devices(self, plan: DevicePlan, strategy: tf.distribute.Strategy | None) -> None:
        """Say where the model trains, and why."""
        if strategy is None:
            log.info("training on one device, %s (%s)", plan.devices[0], plan.reason)
            return
        log.info(
            "training data-parallel on %d devices (%s) with MirroredStrategy: global batch "
            "%d, %d per device (%s)",
            plan.replicas,
            ", ".join(plan.devices),
            self.params.batch_size,
            self.params.batch_size // plan.replicas,
            plan.reason,
        )

    def fresh_model(self, precision: str, epoch: int) -> keras.Model:
        """The model compiled for this run and readied for epoch `epoch` (prepare_epoch), its
        optimizer's slots made before any restore."""
        model = self.model_type.compiled_model(
            self.params,
            self.data.image_shape,
            self.data.num_classes,
            train_size=self.data.train_size,
            precision=precision,
        )
        self.model_type.prepare_epoch(model, self.params, epoch, train_size=self.data.train_size)
        model.optimizer.build(model.trainable_variables)
        return model

    def restore_checkpoint(self, model: keras.Model, state: CheckpointState | None) -> Progress:
        """Put the checkpoint's state into the model, and say where training continues."""
        if state is None:
            return Progress({}, 0, 0.0)
        try:
            restore_training_state(model, state.arrays)
        except ValueError as error:  # nothing was assigned: the model is still a fresh one
            if self.checkpoint is not None:
                self.checkpoint.set_aside(str(error))
            return Progress({}, 0, 0.0)
        log.info(
            "resuming from checkpoint %s after epoch %d of %d",
            self.checkpoint.directory if self.checkpoint else "",
            state.epochs_done,
            self.params.epochs,
        )
        return Progress(state.history, state.epochs_done, state.seconds)

    def run_epochs(
        self, model: keras.Model, strategy: tf.distribute.Strategy | None, progress: Progress
    ) -> float:
        """Train the epochs left, one `fit` each, under the stall watchdog: each reported, then
        checkpointed. Returns the seconds they took."""
        params, data = self.params, self.data
        # (empty where a table is streamed: its batches get their targets one by one)
        y_train = self.model_type.targets(params, data.y_train, data.num_classes)
        y_val = self.model_type.targets(params, data.y_val, data.num_classes)
        steps = math.ceil(data.train_size / params.batch_size)
        done = [progress.first_epoch]  # epochs finished and checkpointed, for the stall advice
        watchdog = StallWatchdog(stall_seconds(), lambda: _resume_advice(self.checkpoint, done[0]))
        started = time.perf_counter()
        # several devices: batch-norm statistics averaged over them at the end of each epoch
        averaging = [_replica_averaging(steps)] if strategy is not None else []
        with watchdog:
            for epoch in range(progress.first_epoch, params.epochs):
                with strategy.scope() if strategy else contextlib.nullcontext():
                    self.model_type.prepare_epoch(model, params, epoch, train_size=data.train_size)
                arguments = self.epoch_arguments(epoch, (y_train, y_val), strategy)
                callbacks = [
                    _batch_progress(epoch, params.epochs, steps, watchdog.beat),
                    *averaging,
                ]
                logs = self.fit_epoch(model, epoch, arguments, callbacks)
                for key, value in logs.items():
                    progress.history.setdefault(key, []).append(value)
                # reported (and logged to MLflow) before the checkpoint: a run killed in between
                # trains and reports this epoch again, rather than never reporting it
                self.on_epoch_end(epoch, logs)
                if self.checkpoint is not None:
                    seconds = progress.earlier_seconds + time.perf_counter() - started
                    self.checkpoint.save(
                        epoch + 1, progress.history, training_state(model), seconds
                    )
                    done[0] = epoch + 1
                watchdog.beat()
        return time.perf_counter() - started

    def epoch_arguments(
        self,
        epoch: int,
        targets: tuple[np.ndarray, np.ndarray],
        strategy: tf.distribute.Strategy | None,
    ) -> dict[str, Any]:
        """`fit`'s data arguments for one epoch: the model type's epoch_input, with a streamed
        table's batches replayable where several devices read them (see _replayable)."""
        params, data = self.params, self.data
        arguments = self.model_type.epoch_input(params, data, targets, seed=self.seed, epoch=epoch)
        if strategy is not None and data.streamed:  # generators misread: see _replayable
            streams = _streams_for_devices(
                self.model_type, params, data, seed=self.seed, epoch=epoch
            )
            arguments.update(streams)
        return arguments

    def fit_epoch(
        self,
        model: keras.Model,
        epoch: int,
        arguments: dict[str, Any],
        callbacks: list[keras.callbacks.Callback],
    ) -> dict[str, float]:
        """Train one epoch with `fit`; its HISTORY_KEYS figures."""
        fitted = model.fit(
            **arguments,
            initial_epoch=epoch,
            epochs=epoch + 1,
            callbacks=callbacks,
            verbose=0,  # the stage reports each epoch itself, with a bar on a terminal
        )
        return {k: float(fitted.history[k][-1]) for k in HISTORY_KEYS if k in fitted.history}

    def copy_to_one_device(self, model: keras.Model, precision: str) -> keras.Model:
        """The trained model and optimizer copied onto one device (plain variables), as one
        device would have left them: a model made in a strategy's scope keeps using it, and its
        predict_on_batch runs the whole batch on every device, returning each row twice."""
        trained = training_state(model)
        model = self.fresh_model(precision, self.params.epochs - 1)
        restore_training_state(model, trained)
        return model

    def result(
        self,
        model: keras.Model,
        progress: Progress,
        seconds: float,
        choice: PrecisionChoice,
        plan: DevicePlan,
        averaged: dict[str, float],
    ) -> TrainResult:
        """What the run made: the model to save, its history, timings and choices (and the
        validation accuracies of use_weight_average)."""
        params, data = self.params, self.data
        return TrainResult(
            model=self.model_type.inference_model(model, params),
            history=progress.history,
            seconds=progress.earlier_seconds + seconds,
            images_per_second=data.train_size
            * (params.epochs - progress.first_epoch)
            / max(seconds, 1e-9),
            parameters=int(model.count_params()),
            resumed_from_epoch=progress.first_epoch,
            choices={
                "precision": choice.precision,
                "precision_reason": choice.reason,
                **{f"step_seconds_{p}": t for p, t in choice.step_seconds.items()},
                "devices": ", ".join(plan.devices),
                "devices_reason": plan.reason,
                "replicas": plan.replicas,
                **averaged,
            },
        )


def use_weight_average(trainer: KerasTrainer, model: keras.Model) -> dict[str, float]:
    """Give the trained model the optimizer's moving average of its weights, then measure its
    batch-norm statistics again for them (the moving statistics followed the last weights, not
    the average): RECALIBRATION_BATCHES training batches in training mode, in a fixed order, so a
    resumed run ends the same. Returns the validation accuracy before and after (logged as
    metrics)."""
    import itertools

    model_type, params, data = trainer.model_type, trainer.params, trainer.data
    targets = (
        model_type.targets(params, data.y_train, data.num_classes),
        model_type.targets(params, data.y_val, data.num_classes),
    )
    before = _val_accuracy(trainer, model, targets[1])
    model.optimizer._overwrite_model_variables_with_average_value(model.trainable_variables)
    batches = model_type.epoch_input(params, data, targets, seed=trainer.seed, epoch=params.epochs)
    for pixels, _ in itertools.islice(batches["x"], RECALIBRATION_BATCHES):
        model(pixels, training=True)
    after = _val_accuracy(trainer, model, targets[1])
    log.info(
        "weights averaged (momentum %g), batch-norm statistics measured again on %d batches: "
        "validation accuracy %.4f, against %.4f with the last step's weights",
        model.optimizer.ema_momentum,
        RECALIBRATION_BATCHES,
        after,
        before,
    )
    return {"val_accuracy_last_weights": before, "val_accuracy_averaged": after}


def _val_accuracy(trainer: KerasTrainer, model: keras.Model, y_val: np.ndarray) -> float:
    """The model's accuracy on the validation split (its targets y_val), as `fit` measures it
    after an epoch."""
    arguments = trainer.model_type.validation_input(trainer.params, trainer.data, y_val)
    if arguments["validation_data"] is None:
        return float("nan")
    scores = model.evaluate(
        arguments["validation_data"],
        steps=arguments.get("validation_steps"),
        verbose=0,
        return_dict=True,
    )
    return float(scores["accuracy"])


def _resume_advice(checkpoint: TrainingCheckpoint | None, epochs_done: int) -> str:
    """What to do after a stalled run: rerun the stage, which resumes from the checkpoint."""
    if checkpoint is None or not epochs_done:
        return "rerun the stage (dvc repro) to train again"
    return (
        f"rerun the stage (dvc repro) to resume after epoch {epochs_done} from the checkpoint "
        f"in {checkpoint.directory}"
    )


def _streams_for_devices(
    model_type: KerasModelType, params: KerasParams, data: TrainingData, *, seed: int, epoch: int
) -> dict[str, tf.data.Dataset]:
    """epoch_input's streamed tables for several devices: the same batches, as tf.data pipelines
    that read the stream afresh each time they are iterated and batch where TensorFlow sees it
    (see _replayable)."""
    arguments = {}
    if data.train_stream is not None:
        stream = data.train_stream
        arguments["x"] = _replayable(
            lambda: model_type.fed_batches(
                params,
                stream.shuffled_batches(params.batch_size, seed=seed, epoch=epoch),
                data.num_classes,
            ),
            params.batch_size,
        )
    if data.val_stream is not None:
        val_stream = data.val_stream
        arguments["validation_data"] = _replayable(
            lambda: model_type.fed_batches(
                params, val_stream.ordered_batches(params.batch_size), data.num_classes
            ),
            params.batch_size,
        )
    return arguments


def _replayable(
    batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]], batch_size: int
) -> tf.data.Dataset:
    """Streamed (pixels, targets) batches for a MirroredStrategy: a tf.data pipeline that calls
    `batches` for a fresh stream each time it is iterated, and re-forms its batches (all full but
    the last) with `batch`, whose size the strategy needs to split each one over the devices.

    A generator as such would be read wrongly on several devices: Keras reads a first batch of
    it to build the model and then starts again, losing what it read ahead, and the strategy
    gives each device whole batches of a pipeline whose batch size it cannot see (a global batch
    of batch_size x devices, and an epoch that runs out half-way).
    """
    import tensorflow as tf

    first = next(batches())
    signature = tuple(
        tf.TensorSpec((None, *part.shape[1:]), tf.as_dtype(part.dtype)) for part in first
    )
    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    return dataset.unbatch().batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _replica_averaging(steps: int) -> keras.callbacks.Callback:
    """Calls average_replica_copies after an epoch's last training batch (of `steps`), so that
    validation, the checkpoint and the saved model see one value; and again when `fit` ends."""
    import keras

    class ReplicaAveraging(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if batch + 1 == steps:
                average_replica_copies(self.model)

        def on_train_end(self, logs: dict | None = None) -> None:
            average_replica_copies(self.model)

    return ReplicaAveraging()


def _batch_progress(
    epoch: int, epochs: int, steps: int, beat: Callable[[], None]
) -> keras.callbacks.Callback:
    """A tqdm bar over one epoch's batches, shown only on a terminal (none in CI or DVC logs);
    `beat` is called after every training and validation batch (the stall watchdog)."""
    import keras
    from tqdm import tqdm

    class BatchProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            self.bar = tqdm(
                total=steps,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="batch",
                leave=False,
                disable=None,  # None: off unless stderr is a terminal
            )

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            beat()
            self.bar.update(1)
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

        def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
            beat()

        def on_train_end(self, logs: dict | None = None) -> None:
            self.bar.close()

    return BatchProgress()
