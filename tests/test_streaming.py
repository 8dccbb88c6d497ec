"""Training on tables bigger than memory: the seeded shuffle buffer, streamed epochs, the train
stage's choice to stream (train.stream_over_mb), and streamed runs that rerun and resume exactly.

The tables are scikit-learn's digits written with small row groups, so that a table spans many
of them and the shuffle buffer (train.shuffle_rows) holds only part of it.
"""

from __future__ import annotations

import json
import logging
import math
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from imgpipe.checkpoints import TrainingCheckpoint
from imgpipe.params import Params, parse_params
from imgpipe.precision import choose_precision
from imgpipe.registry import TrainingData, TrainResult, model_type
from imgpipe.runtime import StageError
from imgpipe.tables import (
    TableStream,
    TableWriter,
    ordered_batches,
    read_table,
    record_batch,
    shuffle_buffer_batches,
    table_schema,
)
from imgpipe.training import training_data
from tests.support import (
    checkpoint_epochs,
    histories_of_equal_models,
    kill_midway,
    load_repo_params,
    resume_and_train_straight,
    train_here,
    write_digit_tables,
    write_train_project,
)

ROWS_PER_GROUP = 64  # 1,200 digits: 19 row groups
SHUFFLE_ROWS = 256  # a fifth of the training table


# --------------------------------------------------------------------------- tables


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the digit tables, in row groups of ROWS_PER_GROUP rows."""
    folder = tmp_path_factory.mktemp("tables")
    write_digit_tables(folder, ROWS_PER_GROUP)
    return folder


def numbered_groups(sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Row groups whose rows are numbered 0, 1, 2, ...: pixels (G, 1, 1, 1) and labels (G,)
    both hold the row's number, so that any mix-up of pixels and labels shows."""
    groups, start = [], 0
    for size in sizes:
        numbers = np.arange(start, start + size)
        groups.append((numbers.reshape(-1, 1, 1, 1), numbers))
        start += size
    return groups


def check_epoch(batches: list[tuple[np.ndarray, np.ndarray]], rows: int, batch_size: int) -> None:
    """Every row exactly once, pixels with their own labels, full batches but the last."""
    assert len(batches) == math.ceil(rows / batch_size)
    assert all(len(labels) == batch_size for _, labels in batches[:-1])
    assert 1 <= len(batches[-1][1]) <= batch_size
    numbers = np.concatenate([labels for _, labels in batches])
    assert sorted(numbers.tolist()) == list(range(rows))
    for pixels, labels in batches:
        np.testing.assert_array_equal(pixels[:, 0, 0, 0], labels)


@pytest.mark.parametrize("buffer_rows", [0, 1, 5, 16, 40, 1000])
@pytest.mark.parametrize("batch_size", [1, 4, 7, 64])
@pytest.mark.parametrize("sizes", [[10, 10, 10, 3], [1], [9, 2, 30, 5]])
def test_shuffle_buffer_gives_every_row_once_in_full_batches(
    buffer_rows: int, batch_size: int, sizes: list[int]
) -> None:
    batches = list(
        shuffle_buffer_batches(
            iter(numbered_groups(sizes)),
            rng=np.random.default_rng(0),
            batch_size=batch_size,
            buffer_rows=buffer_rows,
        )
    )
    check_epoch(batches, sum(sizes), batch_size)


def test_shuffle_buffer_holds_at_most_the_buffer_and_one_row_group() -> None:
    """Rows taken from the source but not yet handed out, at every batch handed out."""
    sizes, batch_size, buffer_rows = [50] * 40, 8, 120
    taken = [0]

    def source() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for group in numbered_groups(sizes):
            taken[0] += len(group[1])
            yield group

    given, most_held = 0, 0
    stream = shuffle_buffer_batches(
        source(), rng=np.random.default_rng(1), batch_size=batch_size, buffer_rows=buffer_rows
    )
    for _, labels in stream:
        given += len(labels)
        most_held = max(most_held, taken[0] - given)
    assert given == sum(sizes)
    assert most_held <= buffer_rows + max(sizes)
    assert most_held > buffer_rows  # it does fill up: the bound is not met by starving it


def test_streaming_memory_does_not_grow_with_the_table(tmp_path: Path) -> None:
    """NumPy memory held while streaming a table's epoch: the same for 10 and 100 row groups
    (Arrow's reads are outside tracemalloc; they hold one row group at a time)."""
    shape, group_rows, batch_size, buffer_rows = (16, 16, 3), 256, 32, 1024
    row_bytes = math.prod(shape)
    schema = table_schema(shape, ["a", "b"], "v")
    peaks = {}
    for groups in (10, 100):
        path = tmp_path / f"{groups}.parquet"
        with TableWriter(path, schema) as writer:
            pixels = np.random.default_rng(0).integers(0, 256, (group_rows, *shape), np.uint8)
            labels = np.zeros(group_rows, np.int16)
            for _ in range(groups):
                writer.write(record_batch(schema, pixels, labels, ["s"] * group_rows))
        stream = TableStream(path, shuffle_rows=buffer_rows)
        tracemalloc.start()
        try:
            rows = sum(len(y) for _, y in stream.shuffled_batches(batch_size, seed=0, epoch=0))
            peaks[groups] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert rows == groups * group_rows
    # the buffer (buffer + one row group), rows moving inside it (a row group at most), a batch,
    # and a few int64 and bool index arrays over the buffer's rows
    held = buffer_rows + group_rows
    bound = (held + group_rows + batch_size) * row_bytes + 4 * held * 8
    assert peaks[100] <= bound
    assert peaks[100] <= 1.1 * peaks[10]


def epoch_batches(stream: TableStream, batch_size: int, seed: int, epoch: int) -> list:
    """One epoch of a stream's shuffled batches, as lists of arrays."""
    return list(stream.shuffled_batches(batch_size, seed=seed, epoch=epoch))


def test_a_streamed_epoch_depends_only_on_seed_and_epoch(tables: Path) -> None:
    path = tables / "train.parquet"
    table = read_table(path, with_sources=False)
    first = TableStream(path, shuffle_rows=SHUFFLE_ROWS)
    assert len(first.group_rows) == math.ceil(len(table.labels) / ROWS_PER_GROUP)

    epoch_3 = epoch_batches(first, 32, seed=5, epoch=3)
    epoch_0 = epoch_batches(first, 32, seed=5, epoch=0)
    # a fresh stream (a resumed process) starting at epoch 3: the very same batches
    again = epoch_batches(TableStream(path, shuffle_rows=SHUFFLE_ROWS), 32, seed=5, epoch=3)
    assert len(again) == len(epoch_3) == math.ceil(len(table.labels) / 32)
    for (a_pixels, a_labels), (b_pixels, b_labels) in zip(again, epoch_3, strict=True):
        np.testing.assert_array_equal(a_pixels, b_pixels)
        np.testing.assert_array_equal(a_labels, b_labels)

    def flat(batches: list) -> np.ndarray:
        return np.concatenate([pixels for pixels, _ in batches])

    other_seed = epoch_batches(first, 32, seed=6, epoch=3)
    assert not np.array_equal(flat(epoch_3), flat(epoch_0))
    assert not np.array_equal(flat(epoch_3), flat(other_seed))
    # every image once, with its own label
    by_image = {p.tobytes(): y for p, y in zip(table.pixels, table.labels, strict=True)}
    for batches in (epoch_0, epoch_3, other_seed):
        images = [
            (p.tobytes(), y)
            for pixels, labels in batches
            for p, y in zip(pixels, labels, strict=True)
        ]
        assert sorted(p for p, _ in images) == sorted(p.tobytes() for p in table.pixels)
        assert all(by_image[p] == y for p, y in images)


def test_a_streamed_epoch_mixes_rows_of_different_row_groups(tables: Path) -> None:
    """Not just the row groups reordered: a batch holds rows from several of them."""
    path = tables / "train.parquet"
    table = read_table(path, with_sources=False)
    group_of = {p.tobytes(): i // ROWS_PER_GROUP for i, p in enumerate(table.pixels)}
    stream = TableStream(path, shuffle_rows=SHUFFLE_ROWS)
    groups_per_batch = [
        len({group_of[p.tobytes()] for p in pixels})
        for pixels, _ in epoch_batches(stream, 32, seed=0, epoch=0)
    ]
    assert np.median(groups_per_batch) >= 3


def test_ordered_batches_are_the_table_sliced_in_order(tables: Path) -> None:
    path = tables / "val.parquet"
    table = read_table(path, with_sources=False)
    stream = TableStream(path, shuffle_rows=SHUFFLE_ROWS)
    batches = list(stream.ordered_batches(48))  # 48 does not divide the row groups of 64
    assert len(batches) == stream.batch_count(48) == math.ceil(len(table.labels) / 48)
    for index, (pixels, labels) in enumerate(batches):
        rows = slice(48 * index, 48 * (index + 1))
        np.testing.assert_array_equal(pixels, table.pixels[rows])
        np.testing.assert_array_equal(labels, table.labels[rows])
    assert list(ordered_batches(iter(numbered_groups([])), 4)) == []


def test_head_reads_the_first_rows(tables: Path) -> None:
    path = tables / "train.parquet"
    table = read_table(path, with_sources=False)
    stream = TableStream(path, shuffle_rows=SHUFFLE_ROWS)
    for rows in (1, 64, 100, 5000):
        pixels, labels = stream.head(rows)
        np.testing.assert_array_equal(pixels, table.pixels[:rows])
        np.testing.assert_array_equal(labels, table.labels[:rows])


# --------------------------------------------------------------------------- training


def test_which_model_types_can_stream() -> None:
    """The train stage streams only for types that say they can; logreg (L-BFGS on the whole
    table) cannot."""
    assert {name: model_type(name).streams for name in ("dense", "cnn", "numpy_mlp", "logreg")} == {
        "dense": True,
        "cnn": True,
        "numpy_mlp": True,
        "logreg": False,
    }


def project_params(**train: object) -> Params:
    """The repository's params for the gray8 digit tables, with small, quick models."""
    raw = load_repo_params()
    raw["views"] = {"gray8": {"height": 8, "width": 8, "color": "grayscale"}}
    raw["models"] = {"dense": "gray8", "numpy_mlp": "gray8", "logreg": "gray8"}
    raw["train"].update(stream_over_mb=0, shuffle_rows=SHUFFLE_ROWS, **train)
    common = {"hidden_units": [64], "batch_size": 32, "epochs": 4, "learning_rate": 0.005}
    raw["dense"].update(common, label_smoothing=0.1)  # one-hot targets, made batch by batch
    raw["numpy_mlp"].update(common)
    return parse_params(raw)


def digits_data(tables: Path, *, train: bool, val: bool) -> TrainingData:
    """The digit tables, each streamed or read whole as asked."""
    return training_data(
        tables / "train.parquet",
        tables / "val.parquet",
        streamed={"train": train, "val": val},
        shuffle_rows=SHUFFLE_ROWS,
    )


def train(
    model_name: str,
    data: TrainingData,
    *,
    checkpoint: TrainingCheckpoint | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a model type of project_params() on data with seed 3; with stop_after, stop as a
    kill would once that epoch is reported (before its checkpoint)."""

    def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
        if epoch == stop_after:
            raise KeyboardInterrupt(f"stopped after epoch {epoch}")

    params = project_params()
    return model_type(model_name).train(
        params.model_section(model_name),
        data,
        seed=3,
        on_epoch_end=on_epoch_end,
        checkpoint=checkpoint,
        devices=1,
    )


def weights_of(result: TrainResult) -> list[np.ndarray]:
    """A trained model's weights, Keras or NumPy."""
    if hasattr(result.model, "get_weights"):
        return result.model.get_weights()
    return [array for pair in result.model.params for array in pair]


def assert_same_training(a: TrainResult, b: TrainResult) -> None:
    """Exactly the same history and weights."""
    assert a.history == b.history
    for left, right in zip(weights_of(a), weights_of(b), strict=True):
        np.testing.assert_array_equal(left, right)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["dense", "numpy_mlp"])
def test_streamed_training_learns_and_reruns_identically(tables: Path, model_name: str) -> None:
    data = digits_data(tables, train=True, val=True)
    assert data.train_size == 1200 and data.val_size == 300 and len(data.x_train) == 0
    first = train(model_name, data)
    second = train(model_name, digits_data(tables, train=True, val=True))
    assert_same_training(first, second)
    assert len(first.history["loss"]) == 4
    assert first.history["val_accuracy"][-1] > 0.8  # guessing: 0.1
    assert first.history["loss"][-1] < first.history["loss"][0]
    # it trains on the streamed order, not the in-memory one
    in_memory = train(model_name, digits_data(tables, train=False, val=False))
    assert in_memory.history["loss"] != first.history["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["dense", "numpy_mlp"])
def test_a_streamed_val_table_scores_as_the_same_table_in_memory(
    tables: Path, model_name: str
) -> None:
    """The same training (train table in memory), its val table streamed or read: the same
    validation metrics, to the bit."""
    streamed = train(model_name, digits_data(tables, train=False, val=True))
    read = train(model_name, digits_data(tables, train=False, val=False))
    assert_same_training(streamed, read)


@pytest.mark.slow
def test_a_streamed_keras_run_stopped_midway_resumes_exactly(tables: Path, tmp_path: Path) -> None:
    checkpoint = TrainingCheckpoint(tmp_path / "checkpoint", "same params and data")
    with pytest.raises(KeyboardInterrupt, match="stopped after epoch 2"):
        train(
            "dense", digits_data(tables, train=True, val=True), checkpoint=checkpoint, stop_after=2
        )
    resumed = train("dense", digits_data(tables, train=True, val=True), checkpoint=checkpoint)
    straight = train("dense", digits_data(tables, train=True, val=True))
    assert resumed.resumed_from_epoch == 2
    assert_same_training(resumed, straight)


@pytest.mark.slow
def test_cnn_times_its_precision_on_the_streamed_tables_first_rows(tables: Path) -> None:
    """precision auto with a streamed train table: both precisions timed on its first rows."""
    params = project_params()
    section = params.cnn.model_copy(
        update={"filters": [4], "head_units": 0, "batch_size": 32, "precision": "auto"}
    )
    data = digits_data(tables, train=True, val=True)
    choice = choose_precision(model_type("cnn"), section, data, hardware="pretend hardware")
    assert set(choice.step_seconds) == {"float32", "mixed_bfloat16"}
    assert all(0 < seconds < math.inf for seconds in choice.step_seconds.values())


def test_cnn_cutmix_on_a_streamed_train_table_says_what_to_change(tables: Path) -> None:
    section = project_params().cnn.model_copy(update={"cutmix": 0.5})
    data = digits_data(tables, train=True, val=False)
    cnn = model_type("cnn")
    targets = (np.zeros((0, 10), np.float32), cnn.targets(section, data.y_val, 10))
    with pytest.raises(StageError, match=r"raise train.stream_over_mb.*or set cnn.cutmix to 0"):
        cnn.epoch_input(section, data, targets, seed=0, epoch=0)


@pytest.mark.parametrize(("key", "value"), [("stream_over_mb", -1), ("shuffle_rows", -1)])
def test_negative_stream_params_are_refused(key: str, value: int) -> None:
    from imgpipe.params import ParamsError

    raw = load_repo_params()
    raw["train"][key] = value
    with pytest.raises(ParamsError, match=f"train.{key}"):
        parse_params(raw)


# --------------------------------------------------------------------------- the train stage


def write_project(folder: Path, **train_params: object) -> Path:
    """A project folder: digit tables in tables/gray8 and a params.yaml that streams them."""
    raw = load_repo_params()
    raw["views"] = {"gray8": {"height": 8, "width": 8, "color": "grayscale"}}
    raw["models"] = {"dense": "gray8", "numpy_mlp": "gray8", "logreg": "gray8"}
    raw["train"].update({"stream_over_mb": 0, "shuffle_rows": SHUFFLE_ROWS, **train_params})
    raw["dense"].update(hidden_units=[256, 128], epochs=10, learning_rate=0.005, batch_size=32)
    raw["numpy_mlp"].update(hidden_units=[32], epochs=2, batch_size=32)
    return write_train_project(folder, raw, ROWS_PER_GROUP)


def test_logreg_refuses_a_table_over_the_bound_and_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    project = write_project(tmp_path)
    monkeypatch.chdir(project)
    with pytest.raises(StageError, match="logreg cannot stream a table") as error:
        train_here("logreg")
    message = str(error.value)
    assert "0.077 MB of pixels > train.stream_over_mb 0" in message  # 1,200 x 64 bytes
    assert "raise train.stream_over_mb to at least 1 in params.yaml" in message
    assert "remove logreg from `models:`" in message
    assert not (project / "models").exists()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments)  # refused before a run was started


@pytest.mark.slow
@pytest.mark.parametrize("bound", [0, 1])
def test_the_train_stage_streams_the_tables_over_the_bound_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, bound: int
) -> None:
    """train.stream_over_mb 0 streams both digit tables (0.077 and 0.019 MB of pixels), 1 reads
    them whole; numpy_mlp trains either way, on its streamed or in-memory epochs."""
    import mlflow

    from imgpipe.training import pixel_megabytes

    project = write_project(tmp_path, stream_over_mb=bound)
    assert pixel_megabytes(project / "tables/gray8/train.parquet") == pytest.approx(1200 * 64 / 1e6)
    monkeypatch.chdir(project)
    with caplog.at_level(logging.INFO, logger="imgpipe"):
        train_here("numpy_mlp")
    streamed_train = (
        "train table 0.077 MB of pixels > train.stream_over_mb 0: streaming it by row group "
        f"through a {SHUFFLE_ROWS}-row shuffle buffer"
    )
    streamed_val = "val table 0.019 MB of pixels > train.stream_over_mb 0: streaming it by row "
    assert (streamed_train in caplog.text) == (bound == 0)
    assert (streamed_val in caplog.text) == (bound == 0)
    history = json.loads((project / "models/numpy_mlp/history.json").read_text())["history"]
    assert len(history["val_accuracy"]) == 2
    assert "1200 train and 300 val images" in caplog.text
    run_id = json.loads((project / "models/numpy_mlp/mlflow_run.json").read_text())["run_id"]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    logged = client.get_run(run_id).data.params
    assert logged["chosen.streamed"] == ("train, val" if bound == 0 else "none")
    assert logged["train.stream_over_mb"] == str(bound)


@pytest.mark.slow
def test_a_streamed_train_stage_killed_midway_resumes_to_the_uninterrupted_result(
    tmp_path: Path,
) -> None:
    project = write_project(tmp_path)
    checkpoint = kill_midway(project)
    killed_log = (project / "killed.log").read_text()
    assert (
        "train table 0.077 MB of pixels > train.stream_over_mb 0: streaming it by row group "
        "through a 256-row shuffle buffer" in killed_log
    )
    assert "val table 0.019 MB of pixels > train.stream_over_mb 0" in killed_log
    killed_at = checkpoint_epochs(checkpoint)
    assert 3 <= killed_at < 10

    output, _ = resume_and_train_straight(project)
    assert f"resuming from checkpoint checkpoints/dense after epoch {killed_at} of 10" in output
    resumed, straight = histories_of_equal_models(project)
    assert resumed["resumed_from_epoch"] == killed_at
    assert resumed["history"] == straight["history"]  # every epoch, every metric, exactly
    assert straight["history"]["val_accuracy"][-1] > 0.8
