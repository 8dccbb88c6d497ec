"""The small pure helpers of the train and evaluate stages' cores."""

from __future__ import annotations

import csv
import io

import numpy as np

from imgpipe.evaluation import grid_sample, rows_csv
from imgpipe.model_folder import history_csv


def test_history_csv_has_one_row_per_epoch_counted_from_one() -> None:
    history = {"loss": [0.9, 0.5, 0.25], "val_loss": [1.0, 0.75, 0.5]}
    rows = list(csv.DictReader(io.StringIO(history_csv(history))))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["val_loss"]) for r in rows] == history["val_loss"]


def test_history_csv_of_empty_history_is_empty() -> None:
    assert history_csv({}).strip() == "epoch"


def test_rows_csv_round_trips_dicts() -> None:
    rows = [{"actual": "cat", "predicted": "dog"}, {"actual": "dog", "predicted": "dog"}]
    parsed = list(csv.DictReader(io.StringIO(rows_csv(rows).decode())))
    assert parsed == rows
    assert rows_csv([]) == b""


def test_grid_sample_is_seeded_sorted_unique_and_bounded() -> None:
    labels = np.zeros(50, dtype=np.int64)
    first = grid_sample(labels, 16, seed=7)
    assert np.array_equal(first, grid_sample(labels, 16, seed=7))
    assert not np.array_equal(first, grid_sample(labels, 16, seed=8))
    assert len(set(first.tolist())) == 16 and np.all(np.diff(first) > 0)
    assert len(grid_sample(labels[:5], 16, seed=7)) == 5
