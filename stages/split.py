"""Stage `split`: raw images -> data/split/{train,val,test}/<class>/, plus a report of skips."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgpipe.images import printable
from imgpipe.params import load_params
from imgpipe.runtime import setup_logging, stage_errors
from imgpipe.splitting import SPLITS, split_images


def main(argv: list[str] | None = None) -> None:
    """Split the raw images named by data.raw into train/val/test folders."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/split)")
    parser.add_argument("--report", required=True, type=Path, help="JSON report path")
    args = parser.parse_args(argv)
    log = setup_logging("split")
    with stage_errors("split"):
        params = load_params()
        outcome = split_images(params.data.raw, args.out, args.report, params.split)
    report = outcome.report
    log.info(
        "read %d files from %s; wrote %d classes (%s images, %.1f MB) to %s and %s in %.1f s",
        report["files_found"],
        report["source"],
        len(report["classes"]),
        ", ".join(f"{s} {report['totals'][s]}" for s in SPLITS),
        outcome.bytes_written / 1e6,
        args.out,
        args.report,
        outcome.seconds,
    )
    if outcome.skipped:
        log.warning(
            "skipped %d unreadable or unlabelled files: see %s", len(outcome.skipped), args.report
        )
        for item in outcome.skipped[:5]:
            log.warning("  %s: %s", printable(item.path), item.reason)


if __name__ == "__main__":
    main()
