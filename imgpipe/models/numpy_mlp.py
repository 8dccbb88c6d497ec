"""`numpy_mlp`: the same net as `dense`, written with NumPy alone: an L-layer perceptron with
its own forward pass, backpropagation, dropout, flips, optimizers and schedules."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, model_validator

from imgpipe.registry import EpochCallback, ModelType, TrainingData, TrainResult
from imgpipe.runtime import StageError
from imgpipe.sections import SCHEDULES, ScheduledTraining, check_positive

if TYPE_CHECKING:
    from imgpipe.checkpoints import TrainingCheckpoint

OUTPUTS = ("sigmoid", "softmax")
INITS = ("he", "xavier")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")  # adamw: adam with weight decay
FLIPS = ("none", "horizontal")

MOMENTUM = 0.9
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-7  # Keras default
FORMAT_VERSION = 2  # 2: inputs scaled to [-1, 1] (version 1 scaled them to [0, 1])


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _check_layer_sizes(layer_sizes: Sequence[int], output: str) -> tuple[int, ...]:
    sizes = list(layer_sizes)
    if len(sizes) < 2:
        raise ValueError(
            "layer_sizes must list at least [n_inputs, n_outputs] "
            f"(optionally with hidden sizes between); got {sizes!r}"
        )
    for size in sizes:
        _check_positive_int("every entry of layer_sizes", size)
    if output == "sigmoid" and sizes[-1] != 1:
        raise ValueError(f"output 'sigmoid' needs layer_sizes[-1] == 1; got {sizes[-1]}")
    if output == "softmax" and sizes[-1] < 2:
        raise ValueError(f"output 'softmax' needs layer_sizes[-1] >= 2; got {sizes[-1]}")
    return tuple(int(s) for s in sizes)


def _scaled_batch(
    pixels: np.ndarray, rows: slice | np.ndarray, dtype: np.dtype, flips: np.ndarray | None = None
) -> np.ndarray:
    """Flatten one batch of uint8 pixels and scale it to [-1, 1] in `dtype`, as Keras' dense
    model does (Rescaling(1 / 127.5, offset=-1)). `flips` (b,) bool mirrors those rows' images
    left to right; it needs (N, H, W, C) pixels."""
    batch = pixels[rows]  # (b, ...) uint8: a view for slices, a b-row copy for index arrays
    if flips is not None and flips.any():
        batch = batch.copy() if isinstance(rows, slice) else batch
        batch[flips] = batch[flips, :, ::-1]  # (f, H, W, C), width reversed
    batch = batch.reshape(batch.shape[0], -1)  # (b, D)
    scaled = np.divide(batch, 127.5, dtype=dtype)  # (b, D) float
    scaled -= 1
    return scaled


# One training batch: uint8 pixels, which of their rows to train on (a slice: all), labels (b,)
TrainBatch = tuple[np.ndarray, slice | np.ndarray, np.ndarray]


def _array_batches(
    pixels: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels, labels) slices of batch_size rows, in order (views, no copies)."""
    for start in range(0, len(labels), batch_size):
        yield pixels[start : start + batch_size], labels[start : start + batch_size]


def _shuffled_array_batches(
    pixels: np.ndarray, labels: np.ndarray, batch_size: int
) -> Callable[[int, np.random.Generator], Iterator[TrainBatch]]:
    """train_batches for NumpyMLP.fit_batches over arrays: each epoch a permutation drawn from
    the training's generator, cut into batches."""

    def train_batches(epoch: int, rng: np.random.Generator) -> Iterator[TrainBatch]:
        order = rng.permutation(len(labels))  # (N,)
        for start in range(0, len(labels), batch_size):
            # sorting inside a batch keeps its membership and makes the gather sequential
            rows = np.sort(order[start : start + batch_size])  # (b,)
            yield pixels, rows, labels[rows]

    return train_batches


def learning_rate_at(
    step: int,
    *,
    learning_rate: float,
    schedule: str,
    decay_steps: int,
    decay_rate: float,
    total_steps: int,
) -> float:
    """The learning rate of update `step` (0-based), with Keras' ExponentialDecay (continuous)
    or CosineDecay (to 0 at total_steps, alpha 0) formulas."""
    if schedule == "cosine":
        progress = min(step, total_steps) / total_steps
        return learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return learning_rate * decay_rate ** (step / decay_steps)


def _check_pixels(name: str, pixels: np.ndarray, n_inputs: int) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        got = getattr(pixels, "dtype", type(pixels).__name__)
        raise ValueError(f"{name} must be a uint8 numpy array of pixels; got {got}")
    if pixels.ndim < 1:
        raise ValueError(f"{name} must have a leading sample axis; got shape {pixels.shape}")
    n_features = math.prod(pixels.shape[1:])
    if n_features != n_inputs:
        raise ValueError(
            f"{name} has {n_features} features per sample (shape {pixels.shape}); "
            f"the network expects {n_inputs}"
        )


class _Optimizer:
    """In-place parameter updates for plain SGD, momentum SGD and Adam (Keras formulas).

    weight_decay > 0 first shrinks every weight and bias by weight_decay x lr, as Keras does for
    any optimizer given a weight_decay (decoupled weight decay; AdamW is Adam with it).
    """

    def __init__(
        self, kind: str, params: list[tuple[np.ndarray, np.ndarray]], weight_decay: float
    ) -> None:
        self.kind = "adam" if kind == "adamw" else kind
        self.weight_decay = weight_decay
        self.iterations = 0
        arrays = [p for pair in params for p in pair]
        self.slots_m = [np.zeros_like(p) for p in arrays] if self.kind != "sgd" else []
        self.slots_v = [np.zeros_like(p) for p in arrays] if self.kind == "adam" else []

    def step(
        self,
        params: list[tuple[np.ndarray, np.ndarray]],
        grads: list[tuple[np.ndarray, np.ndarray]],
        lr: float,
    ) -> None:
        self.iterations += 1
        arrays = [p for pair in params for p in pair]
        grad_arrays = [g for pair in grads for g in pair]
        if self.weight_decay:
            for p in arrays:
                p -= p * np.float32(self.weight_decay * lr)  # Keras: w - w * wd * lr
        if self.kind == "sgd":
            for p, g in zip(arrays, grad_arrays, strict=True):
                g *= lr  # gradients are scratch arrays: reuse them
                p -= g
        elif self.kind == "momentum":
            for p, g, m in zip(arrays, grad_arrays, self.slots_m, strict=True):
                m *= MOMENTUM
                g *= lr
                m -= g  # m = momentum * m - lr * g
                p += m
        else:
            t = self.iterations
            alpha = lr * math.sqrt(1.0 - ADAM_BETA2**t) / (1.0 - ADAM_BETA1**t)
            for p, g, m, v in zip(arrays, grad_arrays, self.slots_m, self.slots_v, strict=True):
                m *= ADAM_BETA1
                m += (1.0 - ADAM_BETA1) * g
                np.square(g, out=g)
                v *= ADAM_BETA2
                v += (1.0 - ADAM_BETA2) * g
                denom = np.sqrt(v)
                denom += ADAM_EPSILON
                np.divide(m, denom, out=denom)
                denom *= alpha
                p -= denom


class NumpyMLP:
    """L-layer perceptron: ReLU hidden layers, sigmoid or softmax output."""

    def __init__(self, layer_sizes: Sequence[int], *, output: str, init: str, seed: int) -> None:
        """Validate the architecture and draw initial weights from default_rng(seed)."""
        _check_choice("output", output, OUTPUTS)
        _check_choice("init", init, INITS)
        self.layer_sizes = _check_layer_sizes(layer_sizes, output)
        self.output = output
        self.init = init
        self.seed = int(seed)
        self.n_classes = 2 if output == "sigmoid" else self.layer_sizes[-1]
        rng = np.random.default_rng(self.seed)
        gain = 2.0 if init == "he" else 1.0
        self.params: list[tuple[np.ndarray, np.ndarray]] = []
        for fan_in, fan_out in zip(self.layer_sizes[:-1], self.layer_sizes[1:], strict=True):
            weights = rng.standard_normal((fan_in, fan_out), dtype=np.float32)  # (n_in, n_out)
            weights *= np.float32(math.sqrt(gain / fan_in))
            self.params.append((weights, np.zeros(fan_out, dtype=np.float32)))

    def __repr__(self) -> str:
        return (
            f"NumpyMLP(layer_sizes={list(self.layer_sizes)}, output={self.output!r}, "
            f"init={self.init!r}, seed={self.seed})"
        )

    @property
    def dtype(self) -> np.dtype:
        """Floating dtype of the parameters (float32 unless changed for checks)."""
        return self.params[0][0].dtype

    def count_params(self) -> int:
        """Total number of trainable scalars (weights and biases)."""
        return sum(w.size + b.size for w, b in self.params)

    # ----------------------------------------------------------------- forward / loss / backprop

    def _logits(
        self, x: np.ndarray, dropout: float = 0.0, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pre-activation of the output layer and the input of every layer.

        With dropout > 0 (training), each hidden unit's output is zeroed with that probability
        and the survivors scaled by 1 / (1 - dropout) (inverted dropout, as Keras' Dropout).
        """
        layer_inputs = [x]  # [(B, n0), (B, n1), ...]
        a = x
        for weights, bias in self.params[:-1]:
            z = a @ weights  # (B, n_out)
            z += bias
            np.maximum(z, 0, out=z)  # ReLU in place
            if dropout > 0:
                assert rng is not None
                keep = rng.random(z.shape, dtype=z.dtype) >= dropout  # (B, n_out)
                z *= keep
                z *= np.asarray(1.0 / (1.0 - dropout), dtype=z.dtype)
            a = z
            layer_inputs.append(a)
        weights, bias = self.params[-1]
        logits = a @ weights  # (B, K)
        logits += bias
        return logits, layer_inputs

    def _activate(self, logits: np.ndarray) -> np.ndarray:
        """Sigmoid or softmax of the output logits, computed stably."""
        if self.output == "sigmoid":
            e = np.exp(-np.abs(logits))  # (B, 1), in (0, 1]
            return np.where(logits >= 0, 1 / (1 + e), e / (1 + e))  # (B, 1)
        shifted = logits - logits.max(axis=1, keepdims=True)  # (B, K)
        np.exp(shifted, out=shifted)
        shifted /= shifted.sum(axis=1, keepdims=True)
        return shifted  # (B, K)

    def _losses(self, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-sample cross-entropy from logits (log-sum-exp / softplus form)."""
        if self.output == "sigmoid":
            z = logits[:, 0]  # (B,)
            y = y.astype(z.dtype)  # (B,) keeps float32 math in float32
            # softplus(z) - y z, with softplus(z) = max(z, 0) + log1p(exp(-|z|))
            return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))  # (B,)
        top = logits.max(axis=1)  # (B,)
        log_sum = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top  # (B,)
        return log_sum - logits[np.arange(len(y)), y]  # (B,)

    def _predicted_labels(self, logits: np.ndarray) -> np.ndarray:
        if self.output == "sigmoid":
            return (logits[:, 0] > 0).astype(np.int64)  # p > 0.5, as Keras
        return logits.argmax(axis=1)  # (B,)

    def _backward(
        self,
        probs: np.ndarray,
        layer_inputs: list[np.ndarray],
        y: np.ndarray,
        dropout: float = 0.0,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Gradients of the mean loss given output probabilities and the forward cache.

        With dropout, a hidden output is a = relu(z) * keep / (1 - dropout), so da/dz is
        1 / (1 - dropout) where a > 0 and 0 elsewhere (dropped or not active).
        """
        batch = probs.shape[0]
        delta = probs.copy()  # (B, K): dL/dlogits * B
        if self.output == "sigmoid":
            delta[:, 0] -= y.astype(delta.dtype)
        else:
            delta[np.arange(batch), y] -= 1
        delta /= batch
        grads: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(len(self.params) - 1, -1, -1):
            weights, _ = self.params[i]
            a = layer_inputs[i]  # (B, n_in)
            grads.append((a.T @ delta, delta.sum(axis=0)))  # (n_in, n_out), (n_out,)
            if i > 0:  # no gradient needed with respect to the network input
                delta = delta @ weights.T  # (B, n_in)
                delta *= a > 0  # ReLU derivative; a is the ReLU output of layer i-1
                if dropout > 0:
                    delta *= np.asarray(1.0 / (1.0 - dropout), dtype=delta.dtype)
        grads.reverse()
        return grads

    def _check_labels(self, y: np.ndarray, n_rows: int, name: str = "y") -> np.ndarray:
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != n_rows:
            raise ValueError(f"{name} must have shape ({n_rows},); got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class labels; got dtype {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= self.n_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {self.n_classes - 1}]; "
                f"got range [{y.min()}, {y.max()}]"
            )
        return y

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Output activations (B, K) for scaled float inputs x (B, D), plus the backprop cache."""
        logits, layer_inputs = self._logits(x)
        return self._activate(logits), layer_inputs

    def loss(self, x: np.ndarray, y: np.ndarray, *, dropout: float = 0.0, seed: int = 0) -> float:
        """Mean cross-entropy of scaled float inputs x (B, D) against int labels y (B,).

        With dropout, the masks come from default_rng(seed): the same seed, the same masks.
        """
        y = self._check_labels(y, x.shape[0])
        logits, _ = self._logits(x, dropout, np.random.default_rng(seed))
        return float(self._losses(logits, y).mean(dtype=np.float64))

    def gradients(
        self, x: np.ndarray, y: np.ndarray, *, dropout: float = 0.0, seed: int = 0
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Backprop gradients of the mean loss, structured like `params` (dropout as in loss)."""
        y = self._check_labels(y, x.shape[0])
        logits, layer_inputs = self._logits(x, dropout, np.random.default_rng(seed))
        return self._backward(self._activate(logits), layer_inputs, y, dropout)

    # ----------------------------------------------------------------- prediction

    def predict_proba(self, pixels: np.ndarray, *, batch_size: int) -> np.ndarray:
        """Class probabilities (N, n_classes) for uint8 pixels (N, ...), scaled batch by batch."""
        _check_pixels("pixels", pixels, self.layer_sizes[0])
        _check_positive_int("batch_size", batch_size)
        n = pixels.shape[0]
        out = np.empty((n, self.n_classes), dtype=np.float32)  # (N, n_classes)
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            logits, _ = self._logits(_scaled_batch(pixels, rows, self.dtype))
            probs = self._activate(logits)  # (b, 1) or (b, K)
            if self.output == "sigmoid":
                out[rows, 1] = probs[:, 0]
                out[rows, 0] = 1 - probs[:, 0]
            else:
                out[rows] = probs
        return out

    def _evaluate(self, pixels: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
        """Mean loss and accuracy over a uint8 pixel set, computed batch by batch."""
        return self._evaluate_batches(_array_batches(pixels, y, batch_size))

    def _evaluate_batches(
        self, batches: Iterable[tuple[np.ndarray, np.ndarray]]
    ) -> tuple[float, float]:
        """Mean loss and accuracy over (uint8 pixels (b, ...), labels (b,)) batches."""
        total_loss = 0.0
        correct = 0
        n = 0
        for pixels, y in batches:
            logits, _ = self._logits(_scaled_batch(pixels, slice(None), self.dtype))
            total_loss += float(self._losses(logits, y).sum(dtype=np.float64))
            correct += int(np.count_nonzero(self._predicted_labels(logits) == y))
            n += len(y)
        return total_loss / n, correct / n

    # ----------------------------------------------------------------- training

    def fit(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray,
        *,
        x_val: np.ndarray,
        y_val: np.ndarray,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        optimizer: str,
        schedule: str,
        decay_steps: int,
        decay_rate: float,
        dropout: float,
        flip: str,
        seed: int,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
        weight_decay: float = 0.0,
    ) -> dict[str, list[float]]:
        """Mini-batch training on uint8 pixels; returns per-epoch loss/accuracy history.

        flip="horizontal" mirrors a random half of every batch (pixels must be (N, H, W, C));
        dropout applies to every hidden layer's output, during training only; weight_decay
        (decoupled, x the learning rate) shrinks every parameter before each update.
        """
        n_inputs = self.layer_sizes[0]
        _check_pixels("x_train", x_train, n_inputs)
        _check_pixels("x_val", x_val, n_inputs)
        y_train = self._check_labels(y_train, x_train.shape[0], "y_train")
        y_val = self._check_labels(y_val, x_val.shape[0], "y_val")
        if x_train.shape[0] == 0 or x_val.shape[0] == 0:
            raise ValueError("x_train and x_val must each hold at least one sample")
        if flip == "horizontal" and x_train.ndim != 4:
            raise ValueError(f"flip needs pixels shaped (N, H, W, C); got {x_train.shape}")
        return self.fit_batches(
            _shuffled_array_batches(x_train, y_train, batch_size),
            lambda: _array_batches(x_val, y_val, batch_size),
            train_size=x_train.shape[0],
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            optimizer=optimizer,
            schedule=schedule,
            decay_steps=decay_steps,
            decay_rate=decay_rate,
            dropout=dropout,
            flip=flip,
            seed=seed,
            on_epoch_end=on_epoch_end,
            weight_decay=weight_decay,
        )

    def fit_batches(
        self,
        train_batches: Callable[[int, np.random.Generator], Iterable[TrainBatch]],
        val_batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
        *,
        train_size: int,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        optimizer: str,
        schedule: str,
        decay_steps: int,
        decay_rate: float,
        dropout: float,
        flip: str,
        seed: int,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
        weight_decay: float = 0.0,
    ) -> dict[str, list[float]]:
        """Mini-batch training on batches from elsewhere (arrays, or a table streamed by row group).

        train_batches(epoch, rng) gives one epoch's batches in training order, each as (uint8
        pixels, the rows of them to train on, their labels); rng is the training's generator,
        which also draws flips and dropout. val_batches() gives (pixels, labels) batches.
        train_size: rows per epoch (sets a cosine schedule's length).
        """
        _check_choice("optimizer", optimizer, OPTIMIZERS)
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("flip", flip, FLIPS)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative integer; got {epochs!r}")
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("decay_steps", decay_steps)
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {learning_rate!r}")
        if not decay_rate > 0:
            raise ValueError(f"decay_rate must be > 0 (1.0 = constant); got {decay_rate!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0 (0 = none); got {weight_decay!r}")

        _check_positive_int("train_size", train_size)
        rng = np.random.default_rng(seed)
        opt = _Optimizer(optimizer, self.params, weight_decay)
        total_steps = epochs * math.ceil(train_size / batch_size)
        history: dict[str, list[float]] = {
            "loss": [],
            "accuracy": [],
            "val_loss": [],
            "val_accuracy": [],
        }
        for epoch in range(epochs):
            loss_sum = 0.0
            correct = 0
            n = 0  # rows trained on this epoch
            for pixels, rows, yb in train_batches(epoch, rng):
                count = len(yb)
                flips = rng.random(count) < 0.5 if flip == "horizontal" else None  # (b,)
                xb = _scaled_batch(pixels, rows, self.dtype, flips)  # (b, D)
                n += count
                logits, layer_inputs = self._logits(xb, dropout, rng)  # (b, K)
                loss_sum += float(self._losses(logits, yb).sum(dtype=np.float64))
                correct += int(np.count_nonzero(self._predicted_labels(logits) == yb))
                grads = self._backward(self._activate(logits), layer_inputs, yb, dropout)
                # Keras' schedules, evaluated at the update's 0-based index
                lr = learning_rate_at(
                    opt.iterations,
                    learning_rate=learning_rate,
                    schedule=schedule,
                    decay_steps=decay_steps,
                    decay_rate=decay_rate,
                    total_steps=total_steps,
                )
                opt.step(self.params, grads, lr)
            val_loss, val_accuracy = self._evaluate_batches(val_batches())
            logs = {
                "loss": loss_sum / n,  # sample-weighted mean over the epoch's batches
                "accuracy": correct / n,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
            for key, value in logs.items():
                history[key].append(value)
            if on_epoch_end is not None:
                on_epoch_end(epoch, dict(logs))
        return history

    # ----------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> None:
        """Write weights and config to an .npz file (plain arrays, no pickle)."""
        config = {
            "format_version": FORMAT_VERSION,
            "layer_sizes": list(self.layer_sizes),
            "output": self.output,
            "init": self.init,
            "seed": self.seed,
        }
        arrays: dict[str, np.ndarray] = {"config": np.array(json.dumps(config))}
        for i, (weights, bias) in enumerate(self.params):
            arrays[f"W{i}"] = weights
            arrays[f"b{i}"] = bias
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:  # a file handle keeps numpy from appending ".npz"
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> NumpyMLP:
        """Read a model written by `save` (np.load with allow_pickle=False)."""
        with np.load(Path(path), allow_pickle=False) as data:
            config = json.loads(str(data["config"]))
            if config.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"{path}: unsupported format_version {config.get('format_version')!r} "
                    f"(this version reads {FORMAT_VERSION}); retrain it: dvc repro train@numpy_mlp"
                )
            output, init = config["output"], config["init"]
            _check_choice("output", output, OUTPUTS)
            _check_choice("init", init, INITS)
            model = cls.__new__(cls)
            model.layer_sizes = _check_layer_sizes(config["layer_sizes"], output)
            model.output = output
            model.init = init
            model.seed = int(config["seed"])
            model.n_classes = 2 if output == "sigmoid" else model.layer_sizes[-1]
            model.params = []
            shapes = zip(model.layer_sizes[:-1], model.layer_sizes[1:], strict=True)
            for i, (fan_in, fan_out) in enumerate(shapes):
                weights, bias = data[f"W{i}"], data[f"b{i}"]
                if weights.shape != (fan_in, fan_out) or bias.shape != (fan_out,):
                    raise ValueError(
                        f"{path}: layer {i} has shapes {weights.shape}, {bias.shape}; "
                        f"config says ({fan_in}, {fan_out}), ({fan_out},)"
                    )
                model.params.append((weights, bias))
        return model


class NumpyMlpParams(ScheduledTraining):
    """params.yaml `numpy_mlp:`."""

    hidden_units: list[int] = Field(min_length=1)
    dropout: float = Field(ge=0, lt=1)
    flip: Literal[FLIPS]  # type: ignore[valid-type]
    output: Literal[OUTPUTS]  # type: ignore[valid-type]
    init: Literal[INITS]  # type: ignore[valid-type]
    optimizer: Literal[OPTIMIZERS]  # type: ignore[valid-type]
    weight_decay: float = Field(ge=0)  # decoupled, x learning_rate per step; 0 = none

    @model_validator(mode="after")
    def _positive_units(self) -> NumpyMlpParams:
        check_positive(self.hidden_units, "hidden_units")
        return self


class NumpyMlpType(ModelType):
    """NumpyMLP trained by its own fit(); weights in a plain .npz (no pickle)."""

    params_class = NumpyMlpParams
    weights_file = "model.npz"
    streams = True  # mini-batches: a table over train.stream_over_mb streams through them

    def train(
        self,
        params: NumpyMlpParams,
        data: TrainingData,
        *,
        seed: int,
        on_epoch_end: EpochCallback,
        checkpoint: TrainingCheckpoint | None,
        devices: Literal["auto"] | int,  # Keras models only: this one trains on the CPU
    ) -> TrainResult:
        """Build the net for the view's inputs and fit it with the section's settings.

        A streamed train table (data.train_stream) gives each epoch's batches through its
        shuffle buffer, in an order that depends only on (seed, epoch); a streamed val table is
        read in file order. Flips and dropout draw from the same generator either way.
        """
        if params.output == "sigmoid" and data.num_classes != 2:
            raise StageError(
                f"numpy_mlp.output: sigmoid needs exactly 2 classes, the data has "
                f"{data.num_classes}; use softmax"
            )
        n_inputs = math.prod(data.image_shape)
        n_outputs = 1 if params.output == "sigmoid" else data.num_classes
        model = NumpyMLP(
            [n_inputs, *params.hidden_units, n_outputs],
            output=params.output,
            init=params.init,
            seed=seed,
        )
        settings = {
            "epochs": params.epochs,
            "batch_size": params.batch_size,
            "learning_rate": params.learning_rate,
            "optimizer": params.optimizer,
            "weight_decay": params.weight_decay,
            "schedule": params.schedule,
            "decay_steps": params.decay_steps,
            "decay_rate": params.decay_rate,
            "dropout": params.dropout,
            "flip": params.flip,
            "seed": seed,
            "on_epoch_end": on_epoch_end,
        }
        started = time.perf_counter()
        if not data.streamed:
            history = model.fit(
                data.x_train, data.y_train, x_val=data.x_val, y_val=data.y_val, **settings
            )
        else:
            history = model.fit_batches(
                _table_batches(data, params.batch_size, seed),
                lambda: (
                    data.val_stream.ordered_batches(params.batch_size)
                    if data.val_stream is not None
                    else _array_batches(data.x_val, data.y_val, params.batch_size)
                ),
                train_size=data.train_size,
                **settings,
            )
        seconds = time.perf_counter() - started
        return TrainResult(
            model=model,
            history={key: [float(v) for v in values] for key, values in history.items()},
            seconds=seconds,
            images_per_second=data.train_size * params.epochs / seconds,
            parameters=model.count_params(),
        )

    def save(self, model: NumpyMLP, path: Path) -> None:
        """Weights and config as plain arrays."""
        model.save(path)

    def load(self, path: Path) -> NumpyMLP:
        """Read the .npz back (np.load without pickle)."""
        return NumpyMLP.load(path)

    def predict_proba(self, model: NumpyMLP, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Probabilities, batch by batch."""
        return model.predict_proba(pixels, batch_size=batch_size)


def _table_batches(
    data: TrainingData, batch_size: int, seed: int
) -> Callable[[int, np.random.Generator], Iterable[TrainBatch]]:
    """train_batches for NumpyMLP.fit_batches: the train stream's seeded epochs (each batch a
    fresh array of its rows), or the arrays' epochs as fit() draws them."""
    stream = data.train_stream
    if stream is None:
        return _shuffled_array_batches(data.x_train, data.y_train, batch_size)

    def train_batches(epoch: int, rng: np.random.Generator) -> Iterator[TrainBatch]:
        for pixels, labels in stream.shuffled_batches(batch_size, seed=seed, epoch=epoch):
            yield pixels, slice(None), labels

    return train_batches


MODEL_TYPE = NumpyMlpType()
