"""The network behind model type `numpy_mlp`, written with NumPy alone: an L-layer perceptron
with its own forward pass, backpropagation, dropout, flips, optimizers, schedules and .npz file.

Kept out of imgpipe/models/ (where every module is a model type): models/numpy_mlp.py holds the
params section and the model type that build a NumpyMLP and a FitSettings from params.yaml.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe.sections import SCHEDULES

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


@dataclass(frozen=True)
class FitSettings:
    """How fit and fit_batches train a NumpyMLP: the numpy_mlp section's training knobs and the
    seed of the training's generator (batch order, flips and dropout masks). Checked when made."""

    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str  # one of OPTIMIZERS
    weight_decay: float  # decoupled: shrinks every parameter by it x lr before each update
    schedule: str  # one of SCHEDULES
    decay_steps: int
    decay_rate: float
    dropout: float  # on every hidden layer's output, during training only
    flip: str  # one of FLIPS; "horizontal" mirrors a random half of every batch
    seed: int

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("flip", self.flip, FLIPS)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        epochs = self.epochs
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative integer; got {epochs!r}")
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("decay_steps", self.decay_steps)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate!r}")
        if not self.decay_rate > 0:
            raise ValueError(f"decay_rate must be > 0 (1.0 = constant); got {self.decay_rate!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0 (0 = none); got {self.weight_decay!r}")


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


def array_batches(
    pixels: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels, labels) slices of batch_size rows, in order (views, no copies)."""
    for start in range(0, len(labels), batch_size):
        yield pixels[start : start + batch_size], labels[start : start + batch_size]


def shuffled_array_batches(
    pixels: np.ndarray, labels: np.ndarray, batch_size: int
) -> Callable[[int, np.random.Generator], Iterator[TrainBatch]]:
    """train_batches for fit_batches over arrays: each epoch a permutation drawn from
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
        self._configure(layer_sizes, output, init, seed)
        rng = np.random.default_rng(self.seed)
        gain = 2.0 if init == "he" else 1.0
        self.params: list[tuple[np.ndarray, np.ndarray]] = []
        for fan_in, fan_out in zip(self.layer_sizes[:-1], self.layer_sizes[1:], strict=True):
            weights = rng.standard_normal((fan_in, fan_out), dtype=np.float32)  # (n_in, n_out)
            weights *= np.float32(math.sqrt(gain / fan_in))
            self.params.append((weights, np.zeros(fan_out, dtype=np.float32)))

    def _configure(self, layer_sizes: Sequence[int], output: str, init: str, seed: int) -> None:
        """Check and set the architecture (a new net's or a loaded file's config)."""
        _check_choice("output", output, OUTPUTS)
        _check_choice("init", init, INITS)
        self.layer_sizes = _check_layer_sizes(layer_sizes, output)
        self.output = output
        self.init = init
        self.seed = int(seed)
        self.n_classes = 2 if output == "sigmoid" else self.layer_sizes[-1]

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
            model = cls.__new__(cls)
            model._configure(
                config["layer_sizes"], config["output"], config["init"], config["seed"]
            )
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


def fit(
    model: NumpyMLP,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    x_val: np.ndarray,
    y_val: np.ndarray,
    settings: FitSettings,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Mini-batch training of `model` on uint8 pixels; returns per-epoch loss/accuracy history.

    flip="horizontal" needs pixels shaped (N, H, W, C).
    """
    n_inputs = model.layer_sizes[0]
    _check_pixels("x_train", x_train, n_inputs)
    _check_pixels("x_val", x_val, n_inputs)
    y_train = model._check_labels(y_train, x_train.shape[0], "y_train")
    y_val = model._check_labels(y_val, x_val.shape[0], "y_val")
    if x_train.shape[0] == 0 or x_val.shape[0] == 0:
        raise ValueError("x_train and x_val must each hold at least one sample")
    if settings.flip == "horizontal" and x_train.ndim != 4:
        raise ValueError(f"flip needs pixels shaped (N, H, W, C); got {x_train.shape}")
    return fit_batches(
        model,
        shuffled_array_batches(x_train, y_train, settings.batch_size),
        lambda: array_batches(x_val, y_val, settings.batch_size),
        train_size=x_train.shape[0],
        settings=settings,
        on_epoch_end=on_epoch_end,
    )


def fit_batches(
    model: NumpyMLP,
    train_batches: Callable[[int, np.random.Generator], Iterable[TrainBatch]],
    val_batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    *,
    train_size: int,
    settings: FitSettings,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Mini-batch training on batches from elsewhere (arrays, or a table streamed by row group).

    train_batches(epoch, rng) gives one epoch's batches in training order, each as (uint8
    pixels, the rows of them to train on, their labels); rng is the training's generator,
    which also draws flips and dropout. val_batches() gives (pixels, labels) batches.
    train_size: rows per epoch (sets a cosine schedule's length).
    """
    _check_positive_int("train_size", train_size)
    return _Training(model, settings, train_size).run(train_batches, val_batches, on_epoch_end)


class _Training:
    """One run of fit_batches: the generator that orders batches, flips images and drops
    units, the optimizer and the schedule's length, around the network's forward and backward
    passes. Draws from the generator in this order, per epoch: the epoch's batches (their
    order), then per batch its flips and its dropout masks."""

    def __init__(self, model: NumpyMLP, settings: FitSettings, train_size: int) -> None:
        self.model = model
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)
        self.optimizer = _Optimizer(settings.optimizer, model.params, settings.weight_decay)
        self.total_steps = settings.epochs * math.ceil(train_size / settings.batch_size)

    def run(
        self,
        train_batches: Callable[[int, np.random.Generator], Iterable[TrainBatch]],
        val_batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
        on_epoch_end: Callable[[int, dict[str, float]], None] | None,
    ) -> dict[str, list[float]]:
        """Every epoch: train on its batches, score the val batches, report; the history."""
        history: dict[str, list[float]] = {
            "loss": [],
            "accuracy": [],
            "val_loss": [],
            "val_accuracy": [],
        }
        for epoch in range(self.settings.epochs):
            loss, accuracy = self.train_epoch(train_batches(epoch, self.rng))
            val_loss, val_accuracy = self.model._evaluate_batches(val_batches())
            logs = {
                "loss": loss,
                "accuracy": accuracy,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
            for key, value in logs.items():
                history[key].append(value)
            if on_epoch_end is not None:
                on_epoch_end(epoch, dict(logs))
        return history

    def train_epoch(self, batches: Iterable[TrainBatch]) -> tuple[float, float]:
        """One update per batch; the epoch's loss and accuracy, sample-weighted means over its
        batches as they were trained (each before its own update)."""
        loss_sum = 0.0
        correct = 0
        n = 0  # rows trained on this epoch
        for pixels, rows, labels in batches:
            batch_loss, batch_correct = self.train_step(pixels, rows, labels)
            loss_sum += batch_loss
            correct += batch_correct
            n += len(labels)
        return loss_sum / n, correct / n

    def train_step(
        self, pixels: np.ndarray, rows: slice | np.ndarray, labels: np.ndarray
    ) -> tuple[float, int]:
        """Flip, scale, forward with dropout, backward, update; the batch's summed loss and its
        count of correct predictions."""
        model, settings = self.model, self.settings
        flips = self.rng.random(len(labels)) < 0.5 if settings.flip == "horizontal" else None
        x = _scaled_batch(pixels, rows, model.dtype, flips)  # (b, D)
        logits, layer_inputs = model._logits(x, settings.dropout, self.rng)  # (b, K)
        loss_sum = float(model._losses(logits, labels).sum(dtype=np.float64))
        correct = int(np.count_nonzero(model._predicted_labels(logits) == labels))
        grads = model._backward(model._activate(logits), layer_inputs, labels, settings.dropout)
        # Keras' schedules, evaluated at the update's 0-based index
        lr = learning_rate_at(
            self.optimizer.iterations,
            learning_rate=settings.learning_rate,
            schedule=settings.schedule,
            decay_steps=settings.decay_steps,
            decay_rate=settings.decay_rate,
            total_steps=self.total_steps,
        )
        self.optimizer.step(model.params, grads, lr)
        return loss_sum, correct
