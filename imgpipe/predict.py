"""Command `imgpipe-predict`: classify image files or folders with a trained model folder."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from imgpipe.images import is_system_file


def iter_image_paths(paths: list[Path]) -> Iterator[Path]:
    """Files named directly, and every non-hidden file under named folders, in sorted order."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not is_system_file(child.relative_to(path).as_posix()):
                    yield child
        else:
            yield path


def main(argv: list[str] | None = None) -> int:
    """Print `path,label,probability` for each image; unreadable files get a message on stderr."""
    parser = argparse.ArgumentParser(
        prog="imgpipe-predict",
        description="Classify images with a model folder written by the train stage "
        "(models/<model>, e.g. models/cnn).",
    )
    parser.add_argument("model_dir", type=Path, help="a trained model folder, e.g. models/cnn")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders of images")
    parser.add_argument("--out", type=Path, help="also write the results to this CSV file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    args = parser.parse_args(argv)
    if args.batch_size < 1:  # 0 would crash range(); a negative size would classify nothing
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from imgpipe.classifier import Classifier
    from imgpipe.runtime import StageError

    try:
        classifier = Classifier.load(args.model_dir)
    except (StageError, OSError, ValueError) as error:
        print(f"imgpipe-predict: {error}", file=sys.stderr)
        return 2
    paths = list(iter_image_paths(args.images))
    if not paths:
        print(
            "imgpipe-predict: no files found in " + ", ".join(map(str, args.images)),
            file=sys.stderr,
        )
        return 1
    rows: list[tuple[str, str, str]] = []
    failures = 0
    printing = True  # False once the reader of stdout has gone away (`| head`)
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start : start + args.batch_size]
        readable: list[Path] = []
        payloads: list[bytes] = []
        for path in batch:
            try:
                payloads.append(path.read_bytes())
                readable.append(path)
            except OSError as error:
                failures += 1
                print(f"{path}: cannot read: {error.strerror}", file=sys.stderr)
        for path, result in zip(readable, classifier.classify_bytes(payloads), strict=True):
            if isinstance(result, str):
                failures += 1
                print(f"{path}: skipped: {result}", file=sys.stderr)
                continue
            label, probability = result
            rows.append((str(path), label, f"{probability:.4f}"))
            if printing:
                printing = _print_row(f"{path},{label},{probability:.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "probability"])
            writer.writerows(rows)
    if failures:
        print(
            f"imgpipe-predict: {failures} of {len(paths)} files could not be classified",
            file=sys.stderr,
        )
    return 1 if failures and not rows else 0


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
