"""What every Keras model type shares: params, optimizer, compiling, the resumable training loop,
saving, loading and predicting. A Keras model type (imgpipe/models/dense.py, cnn.py) only says
how its network is built.

Builders return uncompiled models that take raw uint8 pixels (N, H, W, C) and scale them inside
the graph, batch by batch: no float copy of the data set is ever made, and a saved model needs no
separate preprocessing to predict. Keras is imported where it is used, not with this module.
"""

from __future__ import annotations

import logging
import math
import random
import time
from abc import abstractmethod
from collections.abc import Callable
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
from imgpipe.sections import ScheduledTraining
from imgpipe.stall import StallWatchdog, stall_seconds

if TYPE_CHECKING:
    import keras

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
    ) -> TrainResult:
        """Build, compile and fit the model, one `fit` call per epoch.

        With a checkpoint, each finished epoch is saved to it, and a matching checkpoint found at
        the start is restored: training continues after its last epoch and ends exactly where an
        uninterrupted run would (same batches, same dropout and augmentation draws, same
        optimizer state).
        """
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
        if checkpoint is not None:
            checkpoint.extra = {**checkpoint.extra, "precision": choice.precision}
        seed_everything(seed)
        x_train, y_train = data.x_train, data.y_train
        model = self.compiled_model(
            params,
            tuple(x_train.shape[1:]),
            data.num_classes,
            train_size=len(x_train),
            precision=choice.precision,
        )
        model.optimizer.build(model.trainable_variables)  # its slots exist before any restore
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
        y_train = self.targets(params, y_train, data.num_classes)
        y_val = self.targets(params, data.y_val, data.num_classes)
        validation = (data.x_val, y_val) if len(data.x_val) else None
        steps = math.ceil(len(x_train) / params.batch_size)
        done = [first_epoch]  # epochs finished and checkpointed, for the stall advice
        watchdog = StallWatchdog(stall_seconds(), lambda: _resume_advice(checkpoint, done[0]))
        started = time.perf_counter()
        with watchdog:
            for epoch in range(first_epoch, params.epochs):
                order = epoch_order(len(x_train), seed, epoch)  # a uint8 copy, never floats
                fitted = model.fit(
                    x_train[order],
                    y_train[order],
                    validation_data=validation,
                    batch_size=params.batch_size,
                    initial_epoch=epoch,
                    epochs=epoch + 1,
                    shuffle=False,  # epoch_order shuffled it, reproducibly per epoch
                    callbacks=[_batch_progress(epoch, params.epochs, steps, watchdog.beat)],
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
        return TrainResult(
            model=self.inference_model(model, params),
            history=history,
            seconds=earlier_seconds + seconds,
            images_per_second=len(x_train) * (params.epochs - first_epoch) / max(seconds, 1e-9),
            parameters=int(model.count_params()),
            resumed_from_epoch=first_epoch,
            choices={
                "precision": choice.precision,
                "precision_reason": choice.reason,
                **{f"step_seconds_{p}": t for p, t in choice.step_seconds.items()},
            },
        )

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
        shape = tuple(data.x_train.shape[1:])
        models = {
            precision: self.compiled_model(
                params, shape, data.num_classes, train_size=len(data.x_train), precision=precision
            )
            for precision in PRECISIONS
        }
        size = params.batch_size
        y_train = self.targets(params, data.y_train, data.num_classes)
        batches = [
            (data.x_train[i : i + size], y_train[i : i + size])
            for i in range(0, len(data.x_train) - size + 1, size)
        ][: WARMUP_STEPS + TIMED_STEPS]
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
