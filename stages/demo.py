"""Stage `demo`: write scikit-learn's bundled digits as PNG files, one folder per class."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from imgpipe.demo import write_demo_images
from imgpipe.runtime import setup_logging


def main(argv: list[str] | None = None) -> None:
    """Write data/demo/<digit>/<index>.png."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/demo)")
    args = parser.parse_args(argv)
    log = setup_logging("demo")
    started = time.perf_counter()
    images, classes = write_demo_images(args.out)
    log.info(
        "wrote %d digit images in %d classes to %s in %.1f s",
        images,
        classes,
        args.out,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
