"""Command `imgpipe-predict`: classify image files, folders or pixel tables with a trained model."""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from imgpipe.batch_predict import ENGINES, Outcome, iter_image_paths

__all__ = ["iter_image_paths", "main"]


def main(argv: list[str] | None = None) -> int:
    """Print `path,label,probability` for each image; unreadable files get a message on stderr."""
    parser = argparse.ArgumentParser(
        prog="imgpipe-predict",
        description="Classify images with a model folder written by the train stage "
        "(models/<model>, e.g. models/cnn).",
    )
    parser.add_argument("model_dir", type=Path, help="a trained model folder, e.g. models/cnn")
    parser.add_argument(
        "images",
        type=Path,
        nargs="+",
        help="image files, folders of images, or pixel tables of the model's view "
        "(data/tables/<view>/<split>.parquet)",
    )
    parser.add_argument("--out", type=Path, help="also write the results to this CSV file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process; ray: Ray workers on the cluster RAY_ADDRESS names, or on a "
        'local Ray (pip install -e ".[ray]"). The same rows either way.',
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="ray: model copies classifying at once (0: one per node of the cluster)",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:  # 0 would crash range(); a negative size would classify nothing
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        parser.error(f"--workers must be 0 (one per node) or more, got {args.workers}")
    if args.out and args.out.is_symlink():  # checked before any work; never written through
        parser.error(
            f"--out {args.out} is a symlink: give the path of the file itself (or remove the "
            "link); imgpipe-predict does not write through links"
        )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from imgpipe.runtime import StageError

    try:
        return _predict(args)
    except (StageError, OSError, ValueError) as error:
        print(f"imgpipe-predict: {error}", file=sys.stderr)
        return 2


def _predict(args: argparse.Namespace) -> int:
    """Classify args.images with the chosen engine; print and write the rows as they come."""
    from imgpipe.batch_predict import plan_work, predict_local, predict_ray
    from imgpipe.classifier import Classifier

    classifier = Classifier.load(args.model_dir)
    work = plan_work(args.images, args.batch_size, classifier.input_shape)
    if not work:
        print(
            "imgpipe-predict: no files found in " + ", ".join(map(str, args.images)),
            file=sys.stderr,
        )
        return 1
    if args.engine == "local":
        return _report(predict_local(classifier, work), args.out)
    from imgpipe.raycluster import ray_cluster

    with ray_cluster(os.cpu_count() or 1) as where:
        print(f"imgpipe-predict: classifying on {where}", file=sys.stderr)
        return _report(predict_ray(args.model_dir, work, args.workers), args.out)


def _report(outcomes: Iterator[Outcome], out: Path | None) -> int:
    """Print each row (problems on stderr), write --out; the exit status."""
    rows: list[tuple[str, str, str]] = []
    failures = total = 0
    printing = True  # False once the reader of stdout has gone away (`| head`)
    for outcome in outcomes:
        total += 1
        if outcome.problem:
            failures += 1
            print(f"{outcome.path}: {outcome.problem}", file=sys.stderr)
            continue
        row = (outcome.path, outcome.label, f"{outcome.probability:.4f}")
        rows.append(row)
        if printing:
            printing = _print_row(",".join(row))
    if out:
        _write_csv(out, rows)
    if failures:
        print(
            f"imgpipe-predict: {failures} of {total} files could not be classified",
            file=sys.stderr,
        )
    return 1 if failures and not rows else 0


def _write_csv(out: Path, rows: list[tuple[str, str, str]]) -> None:
    """Write --out atomically: a reader sees the old file or the whole new one."""
    from imgpipe.runtime import write_bytes_atomic

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "label", "probability"])
    writer.writerows(rows)
    write_bytes_atomic(out, text.getvalue().encode())


def _print_row(line: str) -> bool:
    """Print one result line; False when stdout's reader has gone away (e.g. `| head -3`).

    Then stdout is pointed at /dev/null, so that Python's final flush does not fail either, and
    the command goes on: it still classifies every file and writes --out.
    """
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
