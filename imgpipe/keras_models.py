"""What every Keras model type shares: params, optimizer, compiling, the devices it trains on
(data-parallel over several), the resumable training loop, saving, loading and predicting. A Keras
model type (imgpipe/models/dense.py, cnn.py) only says how its network is built.

Builders return uncompiled models that take raw uint8 pixels (N, H, W, C) and scale them inside
the graph, batch by batch: no float copy of the data set is ever made, and a saved model needs no
separate preprocessing to predict. Keras is imported where it is used, not with this module.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from imgpipe.registry import (
    HISTORY_KEYS,
    EpochCallback,
    ModelType,
    TrainingData,
    TrainResult,
)
from imgpipe.runtime import StageError
from imgpipe.sections import ScheduledTraining
from imgpipe.stall import StallWatchdog, stall_seconds

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from imgpipe.checkpoints import TrainingCheckpoint

log = logging.getLogger("imgpipe.keras_models")

# params.yaml name -> keras.optimizers class; the params' Literal is built from these keys
OPTIMIZERS = {
    "adam": "Adam",
    "adamw": "AdamW",
    "adamax": "Adamax",
    "rmsprop": "RMSprop",
    "sgd": "SGD",
}
# Keras dtype policies a model trains in (the first is the reference)
PRECISIONS = ("float32", "mixed_bfloat16")
# x86 CPU flags of native bfloat16 arithmetic (AVX-512 BF16, Intel AMX)
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# precision auto: training steps run untimed (graph tracing, caches) and then timed, per
# precision, in TIMED_ROUNDS interleaved rounds (float32, bfloat16, float32, ...): the machine
# may change speed for minutes at a time, and one slow stretch must not decide the choice
WARMUP_STEPS = 3
TIMED_STEPS = 20
TIMED_ROUNDS = 4


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

    @model_validator(mode="after")
    def _warmup_within_run(self) -> KerasParams:
        if self.warmup_epochs and self.schedule != "cosine":
            raise ValueError("warmup_epochs needs schedule: cosine (set warmup_epochs: 0)")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs})"
            )
        return self


@dataclass(frozen=True)
class PrecisionChoice:
    """The compute precision a training run uses, why, and what was timed to choose it."""

    precision: str  # one of PRECISIONS
    reason: str
    step_seconds: dict[str, float]  # seconds per training step of each precision timed


@dataclass(frozen=True)
class DevicePlan:
    """The devices a Keras model trains on (train.devices on this machine), and why."""

    devices: tuple[str, ...]  # TensorFlow device names: ("/cpu:0",), ("/gpu:0", "/gpu:1"), ...
    cpu_split: int  # logical devices to make of the CPU before TensorFlow starts; 0 = none
    reason: str

    @property
    def replicas(self) -> int:
        """Copies of the model that train side by side, one per device."""
        return len(self.devices)


def plan_devices(devices: Literal["auto"] | int, gpus: int, batch_size: int) -> DevicePlan:
    """The devices train.devices names on a machine with `gpus` GPUs, for a global batch of
    batch_size images.

    auto: every GPU, or the one device there is (a GPU, or the CPU); N: the first N GPUs, or on
    a machine without GPUs the CPU split into N logical devices. Asking for more GPUs than there
    are, or a batch that does not split evenly over the devices, is an error.
    """
    if devices == "auto":
        if gpus > 1:
            names = tuple(f"/gpu:{i}" for i in range(gpus))
            plan = DevicePlan(names, 0, f"train.devices auto: all {gpus} GPUs here")
        elif gpus:
            plan = DevicePlan(("/gpu:0",), 0, "train.devices auto: the one GPU here")
        else:
            plan = DevicePlan(("/cpu:0",), 0, "train.devices auto, and no GPU here")
    elif gpus:
        if devices > gpus:
            raise StageError(
                f"train.devices is {devices} but this machine has {gpus} GPU"
                f"{'s' if gpus > 1 else ''}: set train.devices to {gpus} or fewer in params.yaml, "
                "or to auto (every GPU)"
            )
        names = tuple(f"/gpu:{i}" for i in range(devices))
        plan = DevicePlan(names, 0, f"train.devices {devices}: the first {devices} of {gpus} GPUs")
    elif devices == 1:
        plan = DevicePlan(("/cpu:0",), 0, "train.devices 1, and no GPU here")
    else:
        plan = DevicePlan(
            tuple(f"/cpu:{i}" for i in range(devices)),
            devices,
            f"train.devices {devices}, and no GPU here: the CPU split into {devices} logical "
            "devices",
        )
    if batch_size % plan.replicas:  # Keras' fit fails on a batch split unevenly over replicas
        lower = batch_size // plan.replicas * plan.replicas
        nearest = [n for n in (lower, lower + plan.replicas) if n]
        raise StageError(
            f"batch_size {batch_size} does not split evenly over {plan.replicas} devices "
            f"({plan.reason}): batch_size is the global batch, shared equally by the devices; "
            f"set the model's batch_size in params.yaml to a multiple of {plan.replicas} "
            f"({' or '.join(map(str, nearest))}), or change train.devices"
        )
    return plan


def split_cpu(count: int) -> None:
    """Make `count` logical devices of the CPU, which TensorFlow allows only before its first
    operation in a process (a process that already has them keeps them)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    made = tf.config.get_logical_device_configuration(cpu)
    if made is not None and len(made) == count:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        has = len(tf.config.list_logical_devices("CPU"))
        raise StageError(
            f"train.devices {count} splits the CPU into {count} logical devices, which "
            "TensorFlow allows only before its first operation, and this process has already "
            f"run TensorFlow on {has} CPU device{'s' if has > 1 else ''}: train in a fresh "
            "process (the train stage does)"
        ) from None


def distribution(plan: DevicePlan) -> tf.distribute.Strategy | None:
    """A MirroredStrategy over the plan's devices (the CPU split first where it says so), or
    None for a single device: no strategy at all, training exactly as without this option."""
    if plan.cpu_split:
        split_cpu(plan.cpu_split)
    if plan.replicas == 1:
        return None
    return _mirrored_strategy(plan.devices)


@functools.cache
def _mirrored_strategy(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per set of devices and process: a second one would number its
    cross-device reductions from the same keys as the first and collide with them (TensorFlow
    stops with 'Shape mismatch in the collective instance')."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(devices))


def average_replica_copies(model: keras.Model) -> None:
    """Give each variable that every device updates on its own (batch normalisation's moving
    statistics) the mean of its copies on all devices: the copies are equal again, as a model
    trained on one device has one value."""
    for variable in model.non_trainable_variables:
        copies = getattr(variable.value, "values", ())  # a MirroredVariable's per-device copies
        if len(copies) > 1 and np.issubdtype(copies[0].dtype.as_numpy_dtype, np.floating):
            variable.assign(np.mean([np.asarray(copy) for copy in copies], axis=0))


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def bfloat16_hardware() -> str | None:
    """What computes bfloat16 natively here (GPUs, or the CPU flags), or None: then bfloat16 is
    emulated and far slower than float32."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"{len(gpus)} GPU(s)"
    native = sorted(cpu_flags() & set(BFLOAT16_CPU_FLAGS))
    return f"CPU flags {', '.join(native)}" if native else None


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


def in_memory_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Rows in memory as `fit` takes them: batches of batch_size in the given order (the last one
    may be smaller), assembled one ahead on a single thread of their own.

    The same batches `fit(x, y, batch_size=..., shuffle=False)` makes, but Keras' own pipeline
    for arrays maps batches on autotuned parallel threads and prefetches with an autotuned
    buffer: on two cores those threads take turns with the training step's, and steps of the
    32-96-192-384 CNN took 207 to 412 ms through it against 187 to 207 ms through this one (100
    batches, interleaved rounds, avx512_bf16 machine).
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).prefetch(1)
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
    for name, variable in targets.items():
        if tuple(variable.shape) != arrays[name].shape:
            raise ValueError(f"checkpoint array {name} has shape {arrays[name].shape}")
        variable.assign(arrays[name])


def build_optimizer(params: KerasParams, total_steps: int) -> keras.optimizers.Optimizer:
    """The section's optimizer with its learning-rate schedule and weight decay.

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
    options = {"weight_decay": params.weight_decay} if decay else {}
    return getattr(keras.optimizers, OPTIMIZERS[params.optimizer])(learning_rate=rate, **options)


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
        loss: str | keras.losses.Loss = "sparse_categorical_crossentropy"
        if params.label_smoothing:  # Keras smooths one-hot targets only: see targets()
            loss = keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
        model.compile(
            optimizer=build_optimizer(params, total_steps=steps), loss=loss, metrics=["accuracy"]
        )
        return model

    @staticmethod
    def targets(params: KerasParams, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """What the compiled loss trains on: class indices (N,), or one-hot rows (N, K) where
        labels are smoothed."""
        if not params.label_smoothing:
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
        """Build, compile and fit the model, one `fit` call per epoch.

        With a checkpoint, each finished epoch is saved to it, and a matching checkpoint found at
        the start is restored: training continues after its last epoch and ends exactly where an
        uninterrupted run would (same batches, same dropout and augmentation draws, same
        optimizer state).

        On several devices (train.devices, see plan_devices) the model, its optimizer and their
        variables are made inside a MirroredStrategy: a copy on every device, each step training
        on params.batch_size / devices images per device and applying the mean gradient to all
        copies; batch normalisation's moving statistics, which each device keeps on its own, are
        averaged over the devices after each epoch. Precision `auto` is timed on one device. The
        model returned is the trained one copied onto one device.
        """
        import tensorflow as tf

        plan = plan_devices(devices, len(tf.config.list_physical_devices("GPU")), params.batch_size)
        strategy = distribution(plan)  # before any TensorFlow operation: a CPU split needs it
        state = checkpoint.load() if checkpoint is not None else None
        if state is not None and state.epochs_done > params.epochs:
            state = None
        if state is not None and state.extra.get("precision") in PRECISIONS:
            choice = PrecisionChoice(state.extra["precision"], "the interrupted run's choice", {})
        else:  # before seeding: the timing runs draw random numbers of their own
            choice = self.choose_precision(params, data, bfloat16_hardware())
        log.info(
            "compute precision %s: %s%s",
            choice.precision,
            choice.reason,
            "".join(f"; {p} {t * 1000:.0f} ms a step" for p, t in choice.step_seconds.items()),
        )
        if strategy is None:
            log.info("training on one device, %s (%s)", plan.devices[0], plan.reason)
        else:
            log.info(
                "training data-parallel on %d devices (%s) with MirroredStrategy: global batch "
                "%d, %d per device (%s)",
                plan.replicas,
                ", ".join(plan.devices),
                params.batch_size,
                params.batch_size // plan.replicas,
                plan.reason,
            )
        if checkpoint is not None:
            checkpoint.extra = {**checkpoint.extra, "precision": choice.precision}
        seed_everything(seed)

        def fresh_model() -> keras.Model:
            """The model compiled for this run, its optimizer's slots made before any restore."""
            model = self.compiled_model(
                params,
                data.image_shape,
                data.num_classes,
                train_size=data.train_size,
                precision=choice.precision,
            )
            model.optimizer.build(model.trainable_variables)
            return model

        with strategy.scope() if strategy else contextlib.nullcontext():
            model = fresh_model()
        history: dict[str, list[float]] = {}
        first_epoch, earlier_seconds = 0, 0.0
        if state is not None:
            restore_training_state(model, state.arrays)
            history, first_epoch, earlier_seconds = state.history, state.epochs_done, state.seconds
            log.info(
                "resuming from checkpoint %s after epoch %d of %d",
                checkpoint.directory if checkpoint else "",
                first_epoch,
                params.epochs,
            )
        # (empty where a table is streamed: its batches get their targets one by one)
        y_train = self.targets(params, data.y_train, data.num_classes)
        y_val = self.targets(params, data.y_val, data.num_classes)
        steps = math.ceil(data.train_size / params.batch_size)
        done = [first_epoch]  # epochs finished and checkpointed, for the stall advice
        watchdog = StallWatchdog(stall_seconds(), lambda: _resume_advice(checkpoint, done[0]))
        started = time.perf_counter()
        # several devices: batch-norm statistics averaged over them at the end of each epoch
        averaging = [_replica_averaging(steps)] if strategy is not None else []
        with watchdog:
            for epoch in range(first_epoch, params.epochs):
                arguments = self.epoch_input(params, data, (y_train, y_val), seed=seed, epoch=epoch)
                if strategy is not None and data.streamed:  # generators misread: see _replayable
                    streams = self._streams_for_devices(params, data, seed=seed, epoch=epoch)
                    arguments.update(streams)
                fitted = model.fit(
                    **arguments,
                    initial_epoch=epoch,
                    epochs=epoch + 1,
                    callbacks=[
                        _batch_progress(epoch, params.epochs, steps, watchdog.beat),
                        *averaging,
                    ],
                    verbose=0,  # the stage reports each epoch itself, with a bar on a terminal
                )
                logs = {
                    k: float(fitted.history[k][-1]) for k in HISTORY_KEYS if k in fitted.history
                }
                for key, value in logs.items():
                    history.setdefault(key, []).append(value)
                # reported (and logged to MLflow) before the checkpoint: a run killed in between
                # trains and reports this epoch again, rather than never reporting it
                on_epoch_end(epoch, logs)
                if checkpoint is not None:
                    seconds = earlier_seconds + time.perf_counter() - started
                    checkpoint.save(epoch + 1, history, training_state(model), seconds)
                    done[0] = epoch + 1
                watchdog.beat()
        seconds = time.perf_counter() - started
        if strategy is not None:
            # the trained model and optimizer copied onto one device (plain variables), as one
            # device would have left them: a model made in a strategy's scope keeps using it, and
            # its predict_on_batch runs the whole batch on every device, returning each row twice
            trained = training_state(model)
            model = fresh_model()
            restore_training_state(model, trained)
        return TrainResult(
            model=self.inference_model(model, params),
            history=history,
            seconds=earlier_seconds + seconds,
            images_per_second=data.train_size * (params.epochs - first_epoch) / max(seconds, 1e-9),
            parameters=int(model.count_params()),
            resumed_from_epoch=first_epoch,
            choices={
                "precision": choice.precision,
                "precision_reason": choice.reason,
                **{f"step_seconds_{p}": t for p, t in choice.step_seconds.items()},
                "devices": ", ".join(plan.devices),
                "devices_reason": plan.reason,
                "replicas": plan.replicas,
            },
        )

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

        A table in memory: its rows in epoch_order (a uint8 copy, never floats), batched by
        in_memory_batches, as is the val table in memory, in its own order. A streamed
        table: its batches through the shuffle buffer, whose order also depends only on (seed,
        epoch). A streamed val table: its batches in file order.
        """
        y_train, y_val = targets
        if data.train_stream is None:
            order = epoch_order(len(data.x_train), seed, epoch)  # reproducibly per epoch
            arguments = {
                "x": in_memory_batches(data.x_train[order], y_train[order], params.batch_size),
                "shuffle": False,  # epoch_order shuffled it
            }
        else:
            batches = data.train_stream.shuffled_batches(params.batch_size, seed=seed, epoch=epoch)
            arguments = {
                "x": self._fed(params, batches, data.num_classes),
                "steps_per_epoch": data.train_stream.batch_count(params.batch_size),
                "shuffle": False,  # the stream shuffled it
            }
        if data.val_stream is not None:
            batches = data.val_stream.ordered_batches(params.batch_size)
            arguments["validation_data"] = self._fed(params, batches, data.num_classes)
            arguments["validation_steps"] = data.val_stream.batch_count(params.batch_size)
        else:
            arguments["validation_data"] = (
                in_memory_batches(data.x_val, y_val, params.batch_size) if len(data.x_val) else None
            )
        return arguments

    def _streams_for_devices(
        self, params: KerasParams, data: TrainingData, *, seed: int, epoch: int
    ) -> dict[str, tf.data.Dataset]:
        """epoch_input's streamed tables for several devices: the same batches, as tf.data
        pipelines that read the stream afresh each time they are iterated and batch where
        TensorFlow sees it (see _replayable)."""
        arguments = {}
        if data.train_stream is not None:
            stream = data.train_stream
            arguments["x"] = _replayable(
                lambda: self._fed(
                    params,
                    stream.shuffled_batches(params.batch_size, seed=seed, epoch=epoch),
                    data.num_classes,
                ),
                params.batch_size,
            )
        if data.val_stream is not None:
            val_stream = data.val_stream
            arguments["validation_data"] = _replayable(
                lambda: self._fed(
                    params, val_stream.ordered_batches(params.batch_size), data.num_classes
                ),
                params.batch_size,
            )
        return arguments

    def _fed(
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

    def choose_precision(
        self, params: KerasParams, data: TrainingData, hardware: str | None
    ) -> PrecisionChoice:
        """params.precision, or for `auto` the faster precision for this model and data.

        Where nothing computes bfloat16 natively (hardware None) it is float32 untimed: emulated
        bfloat16 is several times slower. Otherwise WARMUP_STEPS and then TIMED_STEPS training
        steps of each precision are run on the first training images, timed in interleaved
        rounds; each precision's fastest round counts, and the faster precision wins.
        """
        if params.precision != "auto":
            return PrecisionChoice(params.precision, "as params.yaml sets it", {})
        if hardware is None:
            reason = (
                "auto, and no GPU or CPU flag of native bfloat16 "
                f"({' or '.join(BFLOAT16_CPU_FLAGS)}) here: bfloat16 would be emulated"
            )
            return PrecisionChoice(PRECISIONS[0], reason, {})
        seconds = self._step_seconds(params, data)
        fastest = min(seconds, key=seconds.__getitem__)
        return PrecisionChoice(fastest, f"auto, the faster of the two on {hardware}", seconds)

    def _step_seconds(self, params: KerasParams, data: TrainingData) -> dict[str, float]:
        """Seconds of one training step in each precision: the mean of its fastest round."""
        models = {
            precision: self.compiled_model(
                params,
                data.image_shape,
                data.num_classes,
                train_size=data.train_size,
                precision=precision,
            )
            for precision in PRECISIONS
        }
        size = params.batch_size
        x_head, y_head = data.train_head((WARMUP_STEPS + TIMED_STEPS) * size)  # no more is read
        y_head = self.targets(params, y_head, data.num_classes)
        batches = [
            (x_head[i : i + size], y_head[i : i + size])
            for i in range(0, len(x_head) - size + 1, size)
        ]
        for model in models.values():
            for x, y in batches[:WARMUP_STEPS]:
                model.train_on_batch(x, y)
        timed = batches[WARMUP_STEPS:] or batches[-1:]  # a tiny data set: time what there is
        rounds = [timed[i::TIMED_ROUNDS] for i in range(TIMED_ROUNDS) if timed[i::TIMED_ROUNDS]]
        best = dict.fromkeys(PRECISIONS, float("inf"))
        for steps in rounds:
            for precision, model in models.items():
                started = time.perf_counter()
                for x, y in steps:
                    model.train_on_batch(x, y)
                mean = (time.perf_counter() - started) / len(steps)
                best[precision] = min(best[precision], mean)
        return best

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


def _resume_advice(checkpoint: TrainingCheckpoint | None, epochs_done: int) -> str:
    """What to do after a stalled run: rerun the stage, which resumes from the checkpoint."""
    if checkpoint is None or not epochs_done:
        return "rerun the stage (dvc repro) to train again"
    return (
        f"rerun the stage (dvc repro) to resume after epoch {epochs_done} from the checkpoint "
        f"in {checkpoint.directory}"
    )


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
