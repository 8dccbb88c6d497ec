"""imgpipe-predict's core: classify image files and pixel tables, on this machine or on Ray.

The inputs are cut into pieces of work (a batch of files, or one row group of a Parquet table
written by tabulate) and each piece is classified by `classify_work`. The `local` engine runs the
pieces one after the other in this process; the `ray` engine hands them to Ray Data, whose
workers each load the model once and classify pieces in parallel, and gets the results back in
input order. Both engines run the same function on the same pieces: the same rows, in the same
order, with the same figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow.parquet as pq

from imgpipe.images import is_system_file
from imgpipe.runtime import StageError

if TYPE_CHECKING:
    from imgpipe.classifier import Classifier

ENGINES = ("local", "ray")


class Outcome(NamedTuple):
    """One input's result: its label and probability, or why it was not classified."""

    path: str
    label: str = ""
    probability: float = 0.0
    problem: str = ""  # e.g. "skipped: not an image"; "" when classified


@dataclass(frozen=True)
class Work:
    """A piece of work: up to a batch of files, or one row group of a pixel table.

    Paths are as the user gave them (the CSV shows them so); `base` is the folder they are
    relative to, so that a worker started elsewhere (a Ray worker) finds them too.
    """

    base: str
    files: tuple[str, ...] = ()
    table: str = ""
    row_group: int = -1

    def to_json(self) -> str:
        """The piece as one JSON string (one Ray Data row)."""
        return json.dumps([self.base, self.files, self.table, self.row_group])

    @classmethod
    def from_json(cls, text: str) -> Work:
        base, files, table, row_group = json.loads(text)
        return cls(base, tuple(files), table, row_group)


def is_table(path: Path) -> bool:
    """A Parquet file named on the command line is read as a pixel table, not as an image."""
    return path.suffix.lower() == ".parquet" and path.is_file()


def iter_image_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named directly, and every non-hidden file under named folders, in sorted order."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not is_system_file(child.relative_to(path).as_posix()):
                    yield child
        else:
            yield path


def check_table(path: Path, input_shape: tuple[int, int, int]) -> int:
    """The row groups of a pixel table whose view is the model's; a StageError otherwise."""
    from imgpipe.tables import table_info

    try:
        shape, _, view, _ = table_info(path)
        groups = pq.read_metadata(path).num_row_groups
    except (OSError, ValueError) as error:  # unreadable, or not Parquet
        raise StageError(f"cannot read {path} as a Parquet table: {error}") from None
    except (KeyError, TypeError):  # Parquet without a pixel table's metadata
        raise StageError(
            f"{path} is not a pixel table written by the tabulate stage: name "
            "data/tables/<view>/<split>.parquet, or image files and folders"
        ) from None
    if tuple(shape) != tuple(input_shape):
        raise StageError(
            f"{path} holds {_shape_text(shape)} pixels (view {view}) but the model reads "
            f"{_shape_text(input_shape)}: name the table of the model's view "
            "(models/<model>/meta.json says which)"
        )
    return groups


def _shape_text(shape: Iterable[int]) -> str:
    height, width, channels = shape
    return f"{height}x{width}x{channels}"


def plan_work(inputs: list[Path], batch_size: int, input_shape: tuple[int, int, int]) -> list[Work]:
    """The pieces of work for these inputs, in the order their results are written.

    Files (named or found in folders) go in batches of `batch_size`; each row group of a named
    Parquet table is a piece. A table of another view than the model's is refused up front.
    """
    base = os.getcwd()
    work: list[Work] = []
    files: list[str] = []

    def flush() -> None:
        for start in range(0, len(files), batch_size):
            work.append(Work(base, files=tuple(files[start : start + batch_size])))
        files.clear()

    for path in inputs:
        if is_table(path):
            flush()
            groups = check_table(path, input_shape)
            work.extend(Work(base, table=str(path), row_group=g) for g in range(groups))
        else:
            files.extend(str(p) for p in iter_image_paths([path]))
    flush()
    return work


def classify_work(classifier: Classifier, work: Work) -> list[Outcome]:
    """Classify one piece of work: an Outcome for each file or table row, in order."""
    if work.table:
        return _classify_rows(classifier, work)
    outcomes: list[Outcome | None] = []
    payloads: list[bytes] = []
    for name in work.files:
        try:
            with open(os.path.join(work.base, name), "rb") as handle:
                payloads.append(handle.read())
            outcomes.append(None)  # filled in below
        except OSError as error:
            outcomes.append(Outcome(name, problem=f"cannot read: {error.strerror}"))
    results = iter(classifier.classify_bytes(payloads))
    done: list[Outcome] = []
    for name, outcome in zip(work.files, outcomes, strict=True):
        if outcome is None:
            result = next(results)
            outcome = (
                Outcome(name, problem=f"skipped: {result}")
                if isinstance(result, str)
                else Outcome(name, result[0], result[1])
            )
        done.append(outcome)
    return done


def _classify_rows(classifier: Classifier, work: Work) -> list[Outcome]:
    """One row group of a pixel table; each row is named `<table>:<source>`."""
    from imgpipe.classifier import best_labels
    from imgpipe.tables import pixels_from_column

    with pq.ParquetFile(os.path.join(work.base, work.table)) as parquet:
        group = parquet.read_row_group(work.row_group, columns=["pixels", "source"])
    pixels = pixels_from_column(group.column("pixels"), classifier.input_shape)
    sources = group.column("source").to_pylist()
    answers = best_labels(classifier.predict_proba(pixels), classifier.meta.class_names)
    return [
        Outcome(f"{work.table}:{source}", label, probability)
        for source, (label, probability) in zip(sources, answers, strict=True)
    ]


def predict_local(classifier: Classifier, work: list[Work]) -> Iterator[Outcome]:
    """The `local` engine: every piece in turn, in this process."""
    for piece in work:
        yield from classify_work(classifier, piece)


class RayClassifier:
    """Ray Data's callable for the `ray` engine: loads the model once per worker (actor)."""

    def __init__(self, model_dir: str) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from imgpipe.classifier import Classifier

        self.classifier = Classifier.load(model_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of pieces (JSON strings) -> one row per input, in order."""
        outcomes = [
            outcome
            for text in batch["work"]
            for outcome in classify_work(self.classifier, Work.from_json(str(text)))
        ]
        return {
            "path": np.array([o.path for o in outcomes], dtype=object),
            "label": np.array([o.label for o in outcomes], dtype=object),
            "probability": np.array([o.probability for o in outcomes], dtype=np.float64),
            "problem": np.array([o.problem for o in outcomes], dtype=object),
        }


def predict_ray(model_dir: Path, work: list[Work], workers: int) -> Iterator[Outcome]:
    """The `ray` engine: `workers` Ray actors (0: one per node with a CPU), each holding the
    model, classify the pieces; the results come back in input order (preserve_order).

    Call inside raycluster.ray_cluster(). Every node must read the model folder and the inputs
    at the same paths (a shared file system).
    """
    import ray

    from imgpipe.raycluster import cpu_nodes

    if not work:
        return
    actors = workers or cpu_nodes()
    dataset = ray.data.from_items(
        [{"work": piece.to_json()} for piece in work], override_num_blocks=len(work)
    ).map_batches(
        RayClassifier,
        fn_constructor_kwargs={"model_dir": str(model_dir.resolve())},
        batch_size=1,
        batch_format="numpy",
        concurrency=max(1, min(actors, len(work))),
        num_cpus=1,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for path, label, probability, problem in zip(
            batch["path"], batch["label"], batch["probability"], batch["problem"], strict=True
        ):
            yield Outcome(str(path), str(label), float(probability), str(problem))
