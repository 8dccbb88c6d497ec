"""Tests for the NumPy-only multilayer perceptron."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from imgpipe.numpy_net import FitSettings, NumpyMLP, _scaled_batch, fit, learning_rate_at

# Small, fast training settings for scikit-learn's bundled 8x8 digits (measured: val accuracy
# 0.92-0.98 over 10 seeds for every optimizer below; the thresholds keep a wide margin).
# exponential decay, no dropout, no flips: the plain L-layer network of the tutorial
PLAIN = {"schedule": "exponential", "dropout": 0.0, "flip": "none"}
DIGITS_FIT = {"epochs": 5, "batch_size": 32, "decay_steps": 100, "decay_rate": 0.9, **PLAIN}
DIGITS_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 0.005}
MIN_VAL_ACCURACY = 0.85


def _settings(**overrides: object) -> FitSettings:
    kwargs = {
        "epochs": 2,
        "batch_size": 16,
        "learning_rate": 0.01,
        "optimizer": "adam",
        "weight_decay": 0.0,
        "decay_steps": 10,
        "decay_rate": 0.9,
        "seed": 0,
        **PLAIN,
    }
    kwargs.update(overrides)
    return FitSettings(**kwargs)


def _random_pixels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _flat(params: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    return [array for pair in params for array in pair]


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("init, gain", [("he", 2.0), ("xavier", 1.0)])
def test_init_scale_dtype_and_zero_biases(init: str, gain: float) -> None:
    model = NumpyMLP([2000, 400, 3], output="softmax", init=init, seed=0)
    weights, bias = model.params[0]
    assert weights.shape == (2000, 400) and bias.shape == (400,)
    assert weights.dtype == np.float32 and bias.dtype == np.float32
    assert not bias.any()
    assert abs(weights.std() / math.sqrt(gain / 2000) - 1) < 0.02
    assert abs(weights.mean()) < 0.01 * math.sqrt(gain / 2000)
    assert model.count_params() == 2000 * 400 + 400 + 400 * 3 + 3
    assert model.n_classes == 3


def test_sigmoid_has_two_classes() -> None:
    model = NumpyMLP([4, 3, 1], output="sigmoid", init="he", seed=0)
    assert model.n_classes == 2


def test_same_seed_same_init_and_different_seed_differs() -> None:
    first = NumpyMLP([30, 8, 4], output="softmax", init="he", seed=3)
    second = NumpyMLP([30, 8, 4], output="softmax", init="he", seed=3)
    other = NumpyMLP([30, 8, 4], output="softmax", init="he", seed=4)
    assert all(
        np.array_equal(a, b) for a, b in zip(_flat(first.params), _flat(second.params), strict=True)
    )
    assert not np.array_equal(first.params[0][0], other.params[0][0])


@pytest.mark.parametrize(
    "kwargs, expected_words",
    [
        ({"output": "relu", "init": "he"}, ["output", "sigmoid", "softmax"]),
        ({"output": "softmax", "init": "uniform"}, ["init", "he", "xavier"]),
    ],
)
def test_invalid_choices_raise_with_valid_choices(kwargs: dict, expected_words: list) -> None:
    with pytest.raises(ValueError, match=rf"^{expected_words[0]} must be one of") as info:
        NumpyMLP([4, 3, 2], seed=0, **kwargs)
    for word in expected_words[1:]:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "sizes, output, expected",
    [
        ([10], "softmax", "layer_sizes"),
        ([], "softmax", "layer_sizes"),
        ([10, 0, 2], "softmax", "layer_sizes"),
        ([10, 4.5, 2], "softmax", "layer_sizes"),
        ([10, 4, 2], "sigmoid", "sigmoid"),
        ([10, 4, 1], "softmax", "softmax"),
    ],
)
def test_invalid_layer_sizes_raise(sizes: list, output: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        NumpyMLP(sizes, output=output, init="he", seed=0)


def test_invalid_optimizer_names_valid_choices() -> None:
    rng = np.random.default_rng(0)
    model = NumpyMLP([12, 4, 3], output="softmax", init="he", seed=0)
    x, y = _random_pixels(rng, (20, 3, 4)), rng.integers(0, 3, 20)
    with pytest.raises(ValueError, match=r"^optimizer must be one of") as info:
        fit(model, x, y, x_val=x, y_val=y, settings=_settings(optimizer="rmsprop"))
    for word in ("sgd", "momentum", "adam"):
        assert word in str(info.value)


def test_bad_inputs_raise() -> None:
    rng = np.random.default_rng(0)
    model = NumpyMLP([12, 4, 3], output="softmax", init="he", seed=0)
    x, y = _random_pixels(rng, (20, 12)), rng.integers(0, 3, 20)
    with pytest.raises(ValueError, match="uint8"):
        model.predict_proba(x.astype(np.float32), batch_size=4)
    with pytest.raises(ValueError, match="features"):
        model.predict_proba(_random_pixels(rng, (5, 13)), batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        model.predict_proba(x, batch_size=0)
    with pytest.raises(ValueError, match="labels"):
        fit(model, x, y + 1, x_val=x, y_val=y, settings=_settings())
    with pytest.raises(ValueError, match="y_val"):
        fit(model, x, y, x_val=x, y_val=y[:5], settings=_settings())


# --------------------------------------------------------------------------- maths


def _float64_copy(model: NumpyMLP) -> NumpyMLP:
    model.params = [(w.astype(np.float64), b.astype(np.float64)) for w, b in model.params]
    return model


def _numerical_gradients(
    model: NumpyMLP, x: np.ndarray, y: np.ndarray, dropout: float = 0.0
) -> list[np.ndarray]:
    eps = 1e-6
    numerical = []
    for array in _flat(model.params):
        grad = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + eps
            plus = model.loss(x, y, dropout=dropout, seed=3)  # the same masks every time
            array[index] = saved - eps
            minus = model.loss(x, y, dropout=dropout, seed=3)
            array[index] = saved
            grad[index] = (plus - minus) / (2 * eps)
        numerical.append(grad)
    return numerical


@pytest.mark.parametrize("output, n_out", [("sigmoid", 1), ("softmax", 4)])
@pytest.mark.parametrize("hidden", [[], [5], [6, 5]])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_gradients_match_finite_differences(
    output: str, n_out: int, hidden: list, dropout: float
) -> None:
    rng = np.random.default_rng(1)
    model = _float64_copy(NumpyMLP([7, *hidden, n_out], output=output, init="he", seed=2))
    # non-zero biases so that the bias gradients are exercised away from the start point
    model.params = [(w, rng.normal(0, 0.1, size=b.shape)) for w, b in model.params]
    x = rng.normal(0, 1, size=(11, 7))  # (B, D) float64
    y = rng.integers(0, model.n_classes, size=11)
    analytic = _flat(model.gradients(x, y, dropout=dropout, seed=3))
    numerical = _numerical_gradients(model, x, y, dropout)
    assert [a.shape for a in analytic] == [p.shape for p in _flat(model.params)]
    for a, n in zip(analytic, numerical, strict=True):
        rel = np.linalg.norm(a - n) / max(np.linalg.norm(a) + np.linalg.norm(n), 1e-12)
        assert rel < 1e-6


@pytest.mark.parametrize("output, n_out", [("sigmoid", 1), ("softmax", 3)])
def test_float32_stays_float32(output: str, n_out: int) -> None:
    rng = np.random.default_rng(0)
    model = NumpyMLP([9, 5, n_out], output=output, init="he", seed=0)
    x = rng.random((6, 9), dtype=np.float32)
    y = rng.integers(0, model.n_classes, 6)
    probs, _ = model.forward(x)
    assert probs.dtype == np.float32 and probs.shape == (6, n_out)
    assert all(g.dtype == np.float32 for g in _flat(model.gradients(x, y)))


@pytest.mark.parametrize("output, n_out", [("sigmoid", 1), ("softmax", 5)])
def test_loss_is_mean_cross_entropy_of_forward(output: str, n_out: int) -> None:
    rng = np.random.default_rng(0)
    model = _float64_copy(NumpyMLP([8, 6, n_out], output=output, init="xavier", seed=0))
    x = rng.random((13, 8))
    y = rng.integers(0, model.n_classes, 13)
    probs, _ = model.forward(x)
    if output == "sigmoid":
        p = probs[:, 0]
        expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    else:
        expected = -np.mean(np.log(probs[np.arange(13), y]))
    assert model.loss(x, y) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("output, n_out", [("sigmoid", 1), ("softmax", 3)])
def test_loss_is_finite_for_saturated_outputs(output: str, n_out: int) -> None:
    model = NumpyMLP([4, n_out], output=output, init="he", seed=0)
    weights, bias = model.params[0]
    weights[:] = 0
    bias[:] = -1e4  # every logit hugely negative: sigmoid p ~ 0
    if output == "softmax":
        bias[0] = 1e4  # softmax puts all mass on class 0
    x = np.ones((3, 4), dtype=np.float32)
    wrong = np.ones(3, dtype=np.int64)  # the class with ~0 probability
    loss = model.loss(x, wrong)
    assert np.isfinite(loss) and loss > 1e3
    right = np.zeros(3, dtype=np.int64)
    assert 0 <= model.loss(x, right) < 1e-6
    assert all(np.isfinite(g).all() for g in _flat(model.gradients(x, wrong)))


@pytest.mark.parametrize("output, n_out", [("sigmoid", 1), ("softmax", 4)])
def test_predict_proba_shape_sum_and_batch_independence(output: str, n_out: int) -> None:
    rng = np.random.default_rng(0)
    model = NumpyMLP([20, 7, n_out], output=output, init="he", seed=0)
    pixels = _random_pixels(rng, (37, 4, 5))
    probs = model.predict_proba(pixels, batch_size=8)  # 37 is not a multiple of 8
    assert probs.shape == (37, model.n_classes) and probs.dtype == np.float32
    assert np.all(probs >= 0) and np.all(probs <= 1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    whole, _ = model.forward(pixels.reshape(37, -1).astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(probs[:, -n_out:], whole, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.predict_proba(pixels, batch_size=100), probs, atol=1e-6)


def test_predict_proba_on_empty_input() -> None:
    model = NumpyMLP([6, 3], output="softmax", init="he", seed=0)
    assert model.predict_proba(np.zeros((0, 2, 3), np.uint8), batch_size=4).shape == (0, 3)


# --------------------------------------------------------------------------- optimizers


def _reference_steps(
    model: NumpyMLP,
    x: np.ndarray,
    y: np.ndarray,
    optimizer: str,
    lr0: float,
    steps: int,
    weight_decay: float,
) -> list[np.ndarray]:
    """Full-batch updates written out from the textbook / Keras formulas (weight decay:
    Keras' w - w * weight_decay * lr before the optimizer's own update)."""
    decay_steps, decay_rate = 3, 0.5
    params = _flat(model.params)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for step in range(steps):
        lr = lr0 * decay_rate ** (step / decay_steps)
        grads = _flat(model.gradients(x, y))
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p -= p * weight_decay * lr
            if optimizer == "sgd":
                p -= lr * g
            elif optimizer == "momentum":
                m[i] = 0.9 * m[i] - lr * g
                p += m[i]
            else:
                t = step + 1
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.999 * v[i] + 0.001 * g * g
                m_hat, v_hat = m[i] / (1 - 0.9**t), v[i] / (1 - 0.999**t)
                p -= lr * m_hat / (np.sqrt(v_hat) + 1e-7 / math.sqrt(1 - 0.999**t))
    return params


@pytest.mark.parametrize(
    ("optimizer", "weight_decay"),
    [("sgd", 0.0), ("momentum", 0.0), ("adam", 0.0), ("adamw", 0.5), ("sgd", 0.5)],
)
def test_full_batch_updates_follow_the_formulas(optimizer: str, weight_decay: float) -> None:
    rng = np.random.default_rng(0)
    pixels = _random_pixels(rng, (24, 10))
    y = rng.integers(0, 3, 24)
    lr, epochs = 0.05, 5
    trained = NumpyMLP([10, 6, 3], output="softmax", init="he", seed=0)
    fit(
        trained,
        pixels,
        y,
        x_val=pixels,
        y_val=y,
        settings=_settings(
            epochs=epochs,
            batch_size=24,  # one full batch per epoch: one update per epoch
            learning_rate=lr,
            optimizer=optimizer,
            decay_steps=3,
            decay_rate=0.5,
            weight_decay=weight_decay,
        ),
    )
    reference = _float64_copy(NumpyMLP([10, 6, 3], output="softmax", init="he", seed=0))
    x = pixels.astype(np.float64) / 127.5 - 1
    expected = _reference_steps(reference, x, y, optimizer, lr, epochs, weight_decay)
    if weight_decay:  # the decay is big enough to tell apart from no decay
        fresh = _float64_copy(NumpyMLP([10, 6, 3], output="softmax", init="he", seed=0))
        without = _reference_steps(fresh, x, y, optimizer, lr, epochs, 0.0)
        assert not np.allclose(without[0], expected[0], rtol=1e-4, atol=1e-5)
    initial = _flat(NumpyMLP([10, 6, 3], output="softmax", init="he", seed=0).params)
    for got, want, start in zip(_flat(trained.params), expected, initial, strict=True):
        assert not np.allclose(want, start)  # the reference actually moved
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_fit_digits_learns(digits: dict, optimizer: str) -> None:
    model = NumpyMLP([64, 32, 10], output="softmax", init="he", seed=0)
    calls: list[tuple[int, dict]] = []
    history = fit(
        model,
        **digits,
        settings=_settings(learning_rate=DIGITS_LR[optimizer], optimizer=optimizer, **DIGITS_FIT),
        on_epoch_end=lambda epoch, logs: calls.append((epoch, logs)),
    )
    epochs = DIGITS_FIT["epochs"]
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(values) == epochs for values in history.values())
    assert [epoch for epoch, _ in calls] == list(range(epochs))
    for epoch, logs in calls:
        assert logs == {key: values[epoch] for key, values in history.items()}
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert history["accuracy"][-1] > MIN_VAL_ACCURACY
    assert history["val_accuracy"][-1] > MIN_VAL_ACCURACY
    probs = model.predict_proba(digits["x_val"], batch_size=64)
    accuracy = float(np.mean(probs.argmax(axis=1) == digits["y_val"]))
    assert accuracy == pytest.approx(history["val_accuracy"][-1])


def test_fit_digits_binary_sigmoid(digits: dict) -> None:
    model = NumpyMLP([64, 16, 1], output="sigmoid", init="xavier", seed=0)
    y_train = (digits["y_train"] >= 5).astype(np.int64)
    y_val = (digits["y_val"] >= 5).astype(np.int64)
    history = fit(
        model,
        digits["x_train"],
        y_train,
        x_val=digits["x_val"],
        y_val=y_val,
        settings=_settings(
            learning_rate=0.005, optimizer="adam", **{**DIGITS_FIT, "decay_rate": 1.0}
        ),
    )
    assert history["loss"][-1] < 0.6 * history["loss"][0]
    assert history["val_accuracy"][-1] > MIN_VAL_ACCURACY
    probs = model.predict_proba(digits["x_val"], batch_size=50)
    assert probs.shape == (len(y_val), 2)
    assert float(np.mean(probs.argmax(axis=1) == y_val)) > MIN_VAL_ACCURACY


def _train(digits: dict, *, init_seed: int, fit_seed: int) -> tuple[NumpyMLP, dict]:
    model = NumpyMLP([64, 16, 10], output="softmax", init="he", seed=init_seed)
    history = fit(
        model,
        digits["x_train"][:500],
        digits["y_train"][:500],
        x_val=digits["x_val"],
        y_val=digits["y_val"],
        settings=_settings(epochs=2, batch_size=32, seed=fit_seed),
    )
    return model, history


def test_same_seed_is_bit_identical_and_other_seed_differs(digits: dict) -> None:
    model_a, history_a = _train(digits, init_seed=0, fit_seed=0)
    model_b, history_b = _train(digits, init_seed=0, fit_seed=0)
    assert history_a == history_b
    assert all(
        np.array_equal(a, b)
        for a, b in zip(_flat(model_a.params), _flat(model_b.params), strict=True)
    )
    model_c, _ = _train(digits, init_seed=0, fit_seed=1)  # only the shuffle differs
    assert not np.array_equal(model_a.params[0][0], model_c.params[0][0])
    model_d, _ = _train(digits, init_seed=1, fit_seed=0)  # only the initial weights differ
    assert not np.array_equal(model_a.params[0][0], model_d.params[0][0])


@pytest.mark.parametrize("output, n_out", [("sigmoid", 1), ("softmax", 3)])
def test_history_metrics_are_means_over_all_samples(output: str, n_out: int) -> None:
    rng = np.random.default_rng(0)
    # no hidden layer: with a narrow ReLU layer on all-positive pixels, rows whose hidden units
    # are all dead tie exactly, and a 1e-32 bias change would decide those ties
    model = NumpyMLP([12, n_out], output=output, init="he", seed=0)
    x_train, x_val = _random_pixels(rng, (37, 3, 4)), _random_pixels(rng, (23, 12))
    y_train = rng.integers(0, model.n_classes, 37)
    y_val = rng.integers(0, model.n_classes, 23)
    # a negligible learning rate keeps the weights (practically) fixed during the epoch, so the
    # running train metrics must equal the metrics of the whole set; 37 = 4 * 8 + 5 rows
    history = fit(
        model,
        x_train,
        y_train,
        x_val=x_val,
        y_val=y_val,
        settings=_settings(epochs=1, batch_size=8, learning_rate=1e-30, optimizer="sgd"),
    )
    for x, y, prefix in [(x_train, y_train, ""), (x_val, y_val, "val_")]:
        scaled = x.reshape(len(x), -1).astype(np.float32) / 127.5 - 1
        assert history[f"{prefix}loss"][0] == pytest.approx(model.loss(scaled, y), rel=1e-6)
        accuracy = np.mean(model.predict_proba(x, batch_size=64).argmax(axis=1) == y)
        assert history[f"{prefix}accuracy"][0] == pytest.approx(accuracy)


def test_zero_epochs_leaves_weights_alone(digits: dict) -> None:
    model = NumpyMLP([64, 8, 10], output="softmax", init="he", seed=0)
    before = [a.copy() for a in _flat(model.params)]
    history = fit(
        model,
        **digits,
        settings=_settings(epochs=0),
    )
    assert all(values == [] for values in history.values())
    assert all(np.array_equal(a, b) for a, b in zip(before, _flat(model.params), strict=True))


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("output, n_out", [("sigmoid", 1), ("softmax", 3)])
@pytest.mark.parametrize("filename", ["model.npz", "nested/dir/model.weights"])
def test_save_load_round_trip(tmp_path, output: str, n_out: int, filename: str) -> None:
    rng = np.random.default_rng(0)
    model = NumpyMLP([12, 5, 4, n_out], output=output, init="xavier", seed=7)
    pixels = _random_pixels(rng, (30, 3, 4))
    fit(
        model,
        pixels,
        rng.integers(0, model.n_classes, 30),
        x_val=pixels,
        y_val=rng.integers(0, model.n_classes, 30),
        settings=_settings(),
    )
    path = tmp_path / filename
    model.save(path)
    assert path.is_file()  # written exactly where asked (no ".npz" appended)
    with np.load(path, allow_pickle=False) as data:
        assert all(data[key].dtype != object for key in data.files)
    loaded = NumpyMLP.load(str(path))
    assert loaded.layer_sizes == model.layer_sizes
    assert (loaded.output, loaded.init, loaded.n_classes) == (output, "xavier", model.n_classes)
    assert loaded.count_params() == model.count_params()
    assert all(
        np.array_equal(a, b) for a, b in zip(_flat(model.params), _flat(loaded.params), strict=True)
    )
    assert all(
        a.dtype == b.dtype for a, b in zip(_flat(model.params), _flat(loaded.params), strict=True)
    )
    np.testing.assert_array_equal(
        loaded.predict_proba(pixels, batch_size=7), model.predict_proba(pixels, batch_size=7)
    )


# --------------------------------------------------------------------------- memory


def _peak_bytes(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_predict_proba_and_fit_never_hold_a_float_copy_of_all_inputs() -> None:
    rng = np.random.default_rng(0)
    n, shape = 20_000, (32, 32)
    pixels = _random_pixels(rng, (n, *shape))  # 20 MB of uint8; as float32 it would be 80 MB
    labels = rng.integers(0, 2, n)
    float_copy_bytes = n * math.prod(shape) * 4
    model = NumpyMLP([math.prod(shape), 8, 2], output="softmax", init="he", seed=0)

    peak = _peak_bytes(lambda: model.predict_proba(pixels, batch_size=256))
    assert peak < float_copy_bytes / 20

    settings = _settings(epochs=1, batch_size=256, optimizer="sgd")
    peak = _peak_bytes(
        lambda: fit(model, pixels, labels, x_val=pixels, y_val=labels, settings=settings)
    )
    assert peak < float_copy_bytes / 20


def test_dropout_zeroes_and_rescales_hidden_units_only_while_training() -> None:
    model = NumpyMLP([6, 400, 2], output="softmax", init="he", seed=0)
    x = np.random.default_rng(0).normal(0, 1, size=(50, 6)).astype(np.float32)
    _, plain = model._logits(x)
    _, dropped = model._logits(x, 0.25, np.random.default_rng(1))
    active = plain[1] > 0
    kept = dropped[1] > 0
    assert kept.sum() / active.sum() == pytest.approx(0.75, abs=0.02)
    np.testing.assert_allclose(dropped[1][kept], plain[1][kept] / 0.75, rtol=1e-6)
    # prediction never drops units
    np.testing.assert_array_equal(
        model.predict_proba(np.zeros((3, 6), np.uint8), batch_size=2),
        model.predict_proba(np.zeros((3, 6), np.uint8), batch_size=2),
    )


def test_scaled_batch_flips_chosen_images_left_to_right_and_scales_to_minus_one_one() -> None:
    pixels = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3, 1) * 20  # (N, H, W, C)
    flips = np.array([False, True])
    for rows in (slice(0, 2), np.array([0, 1])):
        batch = _scaled_batch(pixels, rows, np.dtype(np.float64), flips)
        expected = np.stack([pixels[0], pixels[1, :, ::-1]]).reshape(2, -1) / 127.5 - 1
        np.testing.assert_allclose(batch, expected)
    assert pixels[1, 0, 0, 0] == 120  # the caller's pixels are never flipped in place
    np.testing.assert_allclose(
        _scaled_batch(np.array([[0, 255]], np.uint8), slice(0, 1), np.dtype(np.float64)),
        [[-1.0, 1.0]],
    )


@pytest.mark.parametrize("step", [0, 1, 7, 19, 20, 35])
def test_learning_rate_at_matches_keras_schedules(step: int) -> None:
    import keras

    cosine = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=20)
    exponential = keras.optimizers.schedules.ExponentialDecay(0.01, 5, 0.5)
    common = {"learning_rate": 0.01, "decay_steps": 5, "decay_rate": 0.5, "total_steps": 20}
    assert learning_rate_at(step, schedule="cosine", **common) == pytest.approx(
        float(cosine(step)), rel=1e-5, abs=1e-9
    )
    assert learning_rate_at(step, schedule="exponential", **common) == pytest.approx(
        float(exponential(step)), rel=1e-5
    )


def test_fit_with_flips_dropout_and_cosine_is_reproducible_and_learns(digits: dict) -> None:
    def train(seed: int) -> tuple[NumpyMLP, dict]:
        model = NumpyMLP([64, 32, 10], output="softmax", init="he", seed=0)
        history = fit(
            model,
            digits["x_train"],  # (N, 8, 8, 1): flips need image-shaped pixels
            digits["y_train"],
            x_val=digits["x_val"],
            y_val=digits["y_val"],
            settings=_settings(
                epochs=8,
                batch_size=32,
                learning_rate=0.005,
                schedule="cosine",
                dropout=0.2,
                flip="horizontal",
                seed=seed,
            ),
        )
        return model, history

    model_a, history_a = train(0)
    model_b, history_b = train(0)
    assert history_a == history_b
    assert np.array_equal(model_a.params[0][0], model_b.params[0][0])
    model_c, _ = train(1)  # other flips, masks and order
    assert not np.array_equal(model_a.params[0][0], model_c.params[0][0])
    assert history_a["val_accuracy"][-1] > 0.85  # mirrored digits are still learnable


def test_flip_needs_image_shaped_pixels(digits: dict) -> None:
    flat = digits["x_train"].reshape(len(digits["x_train"]), -1)
    model = NumpyMLP([64, 10], output="softmax", init="he", seed=0)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        fit(
            model,
            flat,
            digits["y_train"],
            x_val=flat,
            y_val=digits["y_train"],
            settings=_settings(flip="horizontal"),
        )
