"""Stage `tabulate`: data/split -> data/tables/<view>/{train,val,test}.parquet of uint8 pixels."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgpipe.params import load_params
from imgpipe.runtime import setup_logging, stage_errors
from imgpipe.tabulating import SKIPPED_REPORT, tabulate_views


def main(argv: list[str] | None = None) -> None:
    """Write one Parquet table per view and split."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", required=True, type=Path, help="split folder (data/split)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/tables)")
    args = parser.parse_args(argv)
    log = setup_logging("tabulate")
    with stage_errors("tabulate"):
        params = load_params()
        outcome = tabulate_views(args.split, args.out, params.views, params.tabulate)
    for failure in outcome.failures:
        log.warning("skipped %s (%s): %s", failure["path"], failure["view"], failure["reason"])
    if outcome.failures:
        log.warning(
            "%d image(s) could not be decoded and are not in the tables: see %s",
            len(outcome.failures),
            args.out / SKIPPED_REPORT,
        )
    processed = outcome.images * len(params.views)
    log.info(
        "read %d images from %s; wrote %d rows (%.1f MB) to %s in %.1f s (%.0f images/s)",
        outcome.images,
        args.split,
        outcome.rows,
        outcome.megabytes,
        args.out,
        outcome.seconds,
        processed / max(outcome.seconds, 1e-9),
    )


if __name__ == "__main__":
    main()
