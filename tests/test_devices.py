"""train.devices: the devices Keras models train on, data-parallel with MirroredStrategy over
several.

Two-device training runs in a subprocess on the CPU split into two logical devices: TensorFlow
allows that split only before its first operation in a process, and this test process runs
TensorFlow on one device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgpipe.devices import DevicePlan, plan_devices
from imgpipe.params import Params, ParamsError, parse_params
from imgpipe.registry import model_type
from imgpipe.runtime import StageError
from tests.support import ROOT, checkout_env, digits_split, fit, run

N_TRAIN, N_VAL = 1024, 512  # both multiples of the batch: every batch splits 16 + 16


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    ("gpus", "devices", "cpu_split"),
    [
        (0, ("/cpu:0",), 0),
        (1, ("/gpu:0",), 0),
        (3, ("/gpu:0", "/gpu:1", "/gpu:2"), 0),
    ],
)
def test_auto_takes_every_gpu_or_else_the_one_device(
    gpus: int, devices: tuple[str, ...], cpu_split: int
) -> None:
    plan = plan_devices("auto", gpus, batch_size=66)
    assert (plan.devices, plan.cpu_split, plan.replicas) == (devices, cpu_split, len(devices))
    assert "auto" in plan.reason


@pytest.mark.parametrize(
    ("count", "gpus", "expected"),
    [
        (1, 0, DevicePlan(("/cpu:0",), 0, "")),
        (2, 0, DevicePlan(("/cpu:0", "/cpu:1"), 2, "")),
        (3, 0, DevicePlan(("/cpu:0", "/cpu:1", "/cpu:2"), 3, "")),
        (1, 4, DevicePlan(("/gpu:0",), 0, "")),
        (2, 4, DevicePlan(("/gpu:0", "/gpu:1"), 0, "")),
    ],
)
def test_a_count_takes_the_first_gpus_or_splits_the_cpu(
    count: int, gpus: int, expected: DevicePlan
) -> None:
    plan = plan_devices(count, gpus, batch_size=96)
    assert (plan.devices, plan.cpu_split) == (expected.devices, expected.cpu_split)
    assert f"train.devices {count}" in plan.reason


@pytest.mark.parametrize(("count", "gpus"), [(3, 2), (2, 1), (8, 4)])
def test_more_devices_than_gpus_is_an_error_saying_how_many_there_are(
    count: int, gpus: int
) -> None:
    with pytest.raises(StageError, match=rf"train\.devices is {count}") as raised:
        plan_devices(count, gpus, batch_size=64)
    message = str(raised.value)
    assert f"this machine has {gpus} GPU" in message
    assert "auto" in message


@pytest.mark.parametrize(
    ("devices", "gpus", "batch_size", "suggested"),
    [(2, 0, 65, "64 or 66"), (3, 3, 64, "63 or 66"), ("auto", 4, 2, "4")],
)
def test_a_batch_that_does_not_split_evenly_over_the_devices_is_an_error(
    devices: str | int, gpus: int, batch_size: int, suggested: str
) -> None:
    with pytest.raises(
        StageError, match=f"batch_size {batch_size} does not split evenly"
    ) as raised:
        plan_devices(devices, gpus, batch_size=batch_size)  # type: ignore[arg-type]
    assert f"({suggested})" in str(raised.value)
    fitting = int(suggested.split()[-1])  # the suggestion is taken
    assert plan_devices(devices, gpus, batch_size=fitting).replicas > 1  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["all", 0, -1, "2", 1.5, True, None])
def test_train_devices_is_auto_or_a_count(repo_params: dict[str, Any], bad: object) -> None:
    repo_params["train"]["devices"] = bad
    with pytest.raises(
        ParamsError, match=r"train\.devices: must be auto or a number of devices"
    ) as raised:
        parse_params(repo_params)
    assert str(raised.value).count("train.devices") == 1  # one line, not one per type it could be
    for good in ("auto", 1, 4):
        repo_params["train"]["devices"] = good
        assert parse_params(repo_params).train.devices == good


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """conftest's digits cut to N_TRAIN to train on and N_VAL to validate on, both multiples of
    the batch (overrides conftest's digits in this module)."""
    return digits_split(N_TRAIN, N_VAL)


@pytest.fixture(scope="module")
def sections(params: Params) -> dict[str, Any]:
    """A dense net with nothing random in training (no dropout, no flips), whose two-device
    training is the same arithmetic as one device's, and a small CNN with batch norm,
    augmentation, dropout and flip averaging."""
    return {
        "dense": params.dense.model_copy(
            update={
                "hidden_units": [32],
                "dropout": 0.0,
                "flip": "none",
                "learning_rate": 0.01,
                "batch_size": 32,
                "epochs": 3,
                "precision": "float32",
            }
        ),
        "cnn": params.cnn.model_copy(
            update={
                "filters": [4, 8],
                "head_units": 8,
                "flip_tta": True,
                "batch_size": 32,
                "epochs": 2,
                "precision": "float32",  # auto would time bfloat16 where the CPU has it
                # (8x8 digits through a 4x4 patch stem, or at half size, leave too little for
                # the blocks' pools)
                "stem": "conv3x3_stride2",
                "progressive": params.cnn.progressive.model_copy(update={"fraction": 0.0}),
            }
        ),
    }


# Trains each model of sections.json on two logical CPU devices; writes what the tests check. The
# model made inside the strategy's scope is kept to look at its variables (train() returns the
# trained model copied onto one device).
_TWO_DEVICE_TRAINING = """
import json, logging, sys
from pathlib import Path
import numpy as np
import tensorflow as tf
from imgpipe.keras_models import KerasModelType
from imgpipe.registry import model_type
from tests.support import fit

logging.basicConfig(level=logging.INFO)
folder = Path(sys.argv[1])
data = dict(np.load(folder / "digits.npz"))
mirrored_models = []
compiled_model = KerasModelType.compiled_model


def recorded(self, *args, **kwargs):
    model = compiled_model(self, *args, **kwargs)
    if tf.distribute.has_strategy():
        mirrored_models.append(model)
    return model


KerasModelType.compiled_model = recorded
report = {}
for name, values in json.loads((folder / "sections.json").read_text()).items():
    entry = model_type(name)
    result = fit(name, entry.params_class.model_validate(values), **data, num_classes=10,
                 seed=5, devices=2)
    trained = mirrored_models.pop()
    variables = {}
    for kind, group in (("model", trained.variables), ("optimizer", trained.optimizer.variables)):
        for variable in group:
            value = variable.value
            mirrored = isinstance(value, tf.distribute.DistributedValues)
            copies = [np.asarray(c) for c in value.values] if mirrored else [np.asarray(value)]
            variables[f"{kind}/{variable.path}"] = {
                "devices": [c.device for c in value.values] if mirrored else [value.device],
                "equal": all(np.array_equal(copies[0], c) for c in copies[1:]),
            }
    returned = [*result.model.variables]
    entry.save(result.model, folder / f"{name}.keras")
    np.save(folder / f"{name}_proba.npy", entry.predict_proba(result.model, data["x_val"], 64))
    report[name] = {
        "history": result.history, "choices": result.choices, "variables": variables,
        "strategy": type(trained.distribute_strategy).__name__,
        "returned_mirrored": sum(
            isinstance(v.value, tf.distribute.DistributedValues) for v in returned
        ),
        "returned_equal": all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(trained.variables, result.model.variables)
        ) if name == "dense" else None,
    }
(folder / "report.json").write_text(json.dumps(report))
"""


@pytest.fixture(scope="module")
def two_devices(
    tmp_path_factory: pytest.TempPathFactory,
    digits: dict[str, np.ndarray],
    sections: dict[str, Any],
) -> tuple[Path, dict[str, Any]]:
    """The sections trained on the CPU split into two devices, in a fresh process: its folder
    (saved models, val probabilities) and its report."""
    folder = tmp_path_factory.mktemp("two_devices")
    np.savez(folder / "digits.npz", **digits)
    dumped = {name: section.model_dump() for name, section in sections.items()}
    (folder / "sections.json").write_text(json.dumps(dumped))
    output = run(
        [sys.executable, "-c", _TWO_DEVICE_TRAINING, str(folder)],
        ROOT,
        checkout_env(TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=600,
    )
    assert "training data-parallel on 2 devices (/cpu:0, /cpu:1) with MirroredStrategy: " in (
        output
    )
    assert "global batch 32, 16 per device" in output
    return folder, json.loads((folder / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "cnn"])
def test_two_devices_hold_an_equal_copy_of_every_variable(
    two_devices: tuple[Path, dict[str, Any]], name: str
) -> None:
    report = two_devices[1][name]
    assert report["strategy"] == "MirroredStrategy"
    assert report["choices"]["replicas"] == 2
    assert report["choices"]["devices"] == "/cpu:0, /cpu:1"
    variables = report["variables"]
    assert any(path.startswith("optimizer/") for path in variables)
    for path, variable in variables.items():
        assert [device.rsplit("/", 1)[-1] for device in variable["devices"]] == [
            "device:CPU:0",
            "device:CPU:1",
        ], path
        # weights by the mean gradient, batch-norm statistics averaged at each epoch's end,
        # seed states advanced alike: the copies agree after training
        assert variable["equal"], path
    if name == "cnn":
        assert any("moving_mean" in path for path in variables)
    # what train() returns (saved, evaluated, predicted with) is that model on one device
    assert report["returned_mirrored"] == 0
    assert report["returned_equal"] in (True, None)  # (the cnn's wraps it in flip averaging)


@pytest.mark.slow
def test_two_devices_train_to_the_accuracy_of_one(
    two_devices: tuple[Path, dict[str, Any]],
    digits: dict[str, np.ndarray],
    sections: dict[str, Any],
) -> None:
    folder, report = two_devices
    one = fit("dense", sections["dense"], **digits, num_classes=10, seed=5, devices=1)
    assert one.choices["replicas"] == 1
    two = report["dense"]["history"]
    # each step: two halves of the same batch, the mean of their gradients = one device's
    np.testing.assert_allclose(two["loss"], one.history["loss"], rtol=1e-4)
    np.testing.assert_allclose(two["val_loss"], one.history["val_loss"], rtol=1e-4)
    np.testing.assert_allclose(two["val_accuracy"], one.history["val_accuracy"], atol=2 / N_VAL)
    assert two["val_accuracy"][-1] > 0.8  # and it learned: guessing scores 0.1
    loaded = model_type("dense").load(folder / "dense.keras")
    for a, b in zip(loaded.get_weights(), one.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "cnn"])
def test_a_model_trained_on_two_devices_loads_and_predicts_on_one(
    two_devices: tuple[Path, dict[str, Any]], digits: dict[str, np.ndarray], name: str
) -> None:
    import tensorflow as tf

    folder, report = two_devices
    entry = model_type(name)
    model = entry.load(folder / f"{name}.keras")
    assert not isinstance(model.variables[0].value, tf.distribute.DistributedValues)
    proba = entry.predict_proba(model, digits["x_val"], batch_size=100)
    np.testing.assert_allclose(proba, np.load(folder / f"{name}_proba.npy"), rtol=1e-5, atol=1e-6)
    if name == "dense":  # the cnn's saved model averages flips, which validation did not
        accuracy = float(np.mean(proba.argmax(axis=1) == digits["y_val"]))
        assert accuracy == pytest.approx(report[name]["history"]["val_accuracy"][-1], abs=1e-6)


@pytest.mark.slow
def test_auto_without_a_gpu_trains_on_one_device_with_no_strategy(
    sections: dict[str, Any], digits: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("auto takes every GPU of a machine that has them")

    def no_strategy(*args: object, **kwargs: object) -> None:
        raise AssertionError("auto made a MirroredStrategy on a machine without GPUs")

    monkeypatch.setattr(tf.distribute, "MirroredStrategy", no_strategy)
    section = sections["dense"].model_copy(update={"epochs": 1})
    subset = {key: value[:256] for key, value in digits.items()}
    result = fit("dense", section, **subset, num_classes=10, seed=0, devices="auto")
    assert result.choices["replicas"] == 1
    assert result.choices["devices"] == "/cpu:0"
    assert "auto" in str(result.choices["devices_reason"])
    model = result.model
    assert model.distribute_strategy is tf.distribute.get_strategy()  # the default: none
    for variable in [*model.variables, *model.optimizer.variables]:
        assert not isinstance(variable.value, tf.distribute.DistributedValues), variable.path


def test_splitting_the_cpu_after_tensorflow_has_run_is_a_clear_error(
    sections: dict[str, Any], digits: dict[str, np.ndarray]
) -> None:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("with GPUs a count names GPUs; the CPU is not split")
    tf.config.list_logical_devices("CPU")  # TensorFlow has started in this process
    with pytest.raises(StageError, match="train in a fresh process") as raised:
        fit("dense", sections["dense"], **digits, num_classes=10, seed=0, devices=2)
    assert "train.devices 2 splits the CPU into 2 logical devices" in str(raised.value)


# --------------------------------------------------------------------------- streamed tables


def write_tables(folder: Path, digits: dict[str, np.ndarray], rows_per_group: int) -> None:
    """The digits' train and val arrays as 8x8 grayscale pixel tables of many row groups."""
    from imgpipe.tables import TableWriter, record_batch, table_schema

    schema = table_schema((8, 8, 1), [str(d) for d in range(10)], "gray8")
    for split_name in ("train", "val"):
        pixels, labels = digits[f"x_{split_name}"], digits[f"y_{split_name}"]
        with TableWriter(folder / f"{split_name}.parquet", schema) as writer:
            for start in range(0, len(labels), rows_per_group):
                rows = slice(start, start + rows_per_group)
                sources = [f"{split_name}/{i}.png" for i in range(len(labels))[rows]]
                writer.write(record_batch(schema, pixels[rows], labels[rows], sources))


@pytest.mark.slow
def test_streamed_tables_train_on_two_devices_as_on_one(
    tmp_path: Path, repo_params: dict[str, Any], digits: dict[str, np.ndarray]
) -> None:
    """train.stream_over_mb 0: both tables streamed, which Keras takes as generators; on two
    devices the same batches are split over them, none lost, none doubled."""
    write_tables(tmp_path / "tables", digits, rows_per_group=200)
    raw = repo_params
    raw["views"] = {"gray8": {"height": 8, "width": 8, "color": "grayscale"}}
    raw["models"] = {"dense": "gray8"}
    raw["train"].update(stream_over_mb=0, shuffle_rows=256)
    raw["dense"].update(
        hidden_units=[32], dropout=0.0, flip="none", learning_rate=0.01, batch_size=32, epochs=2
    )
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    histories, logs = {}, {}
    command = [sys.executable, "-m", "stages.train", "--model", "dense", "--tables", "tables"]
    for devices in (1, 2):
        raw["train"]["devices"] = devices
        (tmp_path / "params.yaml").write_text(json.dumps(raw))  # JSON is YAML
        logs[devices] = run(
            [*command, "--out", f"models/{devices}"], tmp_path, checkout_env(CI="1"), timeout=600
        )
        history = json.loads((tmp_path / "models" / str(devices) / "history.json").read_text())
        histories[devices] = history["history"]
    assert "train table" in logs[2] and "streaming it by row group" in logs[2]
    assert "training data-parallel on 2 devices" in logs[2]
    assert "ran out of data" not in logs[2]
    one, two = histories[1], histories[2]
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
    np.testing.assert_allclose(two["val_loss"], one["val_loss"], rtol=1e-4)
    np.testing.assert_allclose(two["accuracy"], one["accuracy"], atol=2 / N_TRAIN)
    np.testing.assert_allclose(two["val_accuracy"], one["val_accuracy"], atol=2 / N_VAL)
