"""Stage `weights`: one record per model under `models:` of the weights its training starts
from, data/weights/<model>.json; train@<model> depends on its own record only.

DVC hashes the weights/ folder for this stage, and a record holds a weights file's SHA-256, so
new bytes in pretrained's file change pretrained.json alone: train@pretrained reruns, no other
model does. Every other model type starts from seeded random numbers (`"weights": "none"`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imgpipe.models.pretrained import weights_record
from imgpipe.params import load_params
from imgpipe.runtime import atomic_directory, setup_logging, stage_errors, write_json_atomic


def main(argv: list[str] | None = None) -> None:
    """Write data/weights/<model>.json for every model under `models:`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--folder", required=True, type=Path, help="where weights files live (weights)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/weights)")
    args = parser.parse_args(argv)
    log = setup_logging("weights")
    with stage_errors("weights"):
        params = load_params()
        records = {name: {"model": name, "weights": "none"} for name in params.models}
        if "pretrained" in records:
            records["pretrained"].update(weights_record(params.pretrained, args.folder))
        with atomic_directory(args.out) as out:
            for name, record in records.items():
                write_json_atomic(out / f"{name}.json", record)
    log.info(
        "wrote %s/ (%s)",
        args.out,
        "; ".join(f"{name}: {record['weights']}" for name, record in records.items()),
    )


if __name__ == "__main__":
    main()
