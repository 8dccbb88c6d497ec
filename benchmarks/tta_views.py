"""Test-time views of a trained CNN: what each set buys and costs.

For a trained `cnn` model folder, the trained net is given each set of views the params allow
(`cnn.flip_tta`, `cnn.tta_shift`) as `CnnType.inference_model` builds them, and each is
measured on the validation and test tables: accuracy, and images/s of prediction (the test
split through `CnnType.predict_proba`, `evaluate.batch_size` views a forward pass). The net
alone, with no views, is the baseline, measured in the same run. Training is not repeated: a
model folder trained with any views holds the same net.

    python benchmarks/tta_views.py --model models/cnn --tables data/tables/rgb128
    python benchmarks/tta_views.py --model models/cnn --tables data/tables/rgb128 --shifts 0.05

No targets: it prints figures for a person to weigh (docs/results.md, "test-time views").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # imgpipe and benchmarks

from benchmarks import harness
from benchmarks.harness import REPO


def trained_net(model: Any) -> Any:
    """The net inside a saved model's test-time views (the saved model itself without them)."""
    nested = [layer for layer in model.layers if hasattr(layer, "layers")]
    return nested[0] if nested else model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "cnn")
    parser.add_argument("--tables", type=Path, default=REPO / "data" / "tables" / "rgb128")
    parser.add_argument(
        "--shifts", type=float, nargs="+", default=[0.05, 0.1], help="cnn.tta_shift values"
    )
    args = parser.parse_args(argv)

    import logging

    import numpy as np

    from imgpipe.models.cnn import views_per_image
    from imgpipe.params import load_params
    from imgpipe.registry import model_type
    from imgpipe.tables import read_table

    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # a retracing notice per view set
    harness.print_machine("tensorflow", "keras")
    params = load_params(REPO / "params.yaml")
    cnn = model_type("cnn")
    net = trained_net(cnn.load(args.model / cnn.weights_file))
    splits = {
        split: read_table(args.tables / f"{split}.parquet", with_sources=False)
        for split in ("val", "test")
    }
    print(
        f"{args.model}: the trained net of {net.count_params():,} parameters; "
        f"{len(splits['val'].labels):,} validation and {len(splits['test'].labels):,} test "
        f"images of {args.tables}",
        flush=True,
    )
    sets = [(False, 0.0), (True, 0.0)]
    sets += [(flip, shift) for shift in args.shifts for flip in (False, True)]
    rows = []
    baseline = None
    for flip, shift in sets:
        section = params.cnn.model_copy(update={"flip_tta": flip, "tta_shift": shift})
        model = cnn.inference_model(net, section)
        batch = params.evaluate.batch_size
        cnn.predict_proba(model, splits["test"].pixels[:batch], batch)  # traced before timing
        scores = {}
        for split, table in splits.items():
            started = time.perf_counter()
            proba = cnn.predict_proba(model, table.pixels, batch)
            seconds = time.perf_counter() - started
            scores[split] = float(np.mean(proba.argmax(axis=1) == table.labels))
        speed = len(splits["test"].labels) / seconds
        baseline = baseline or speed
        rows.append(
            [
                f"flip_tta {str(flip).lower()}, tta_shift {shift:g}",
                str(views_per_image(section)),
                f"{scores['val']:.4f}",
                f"{scores['test']:.4f}",
                f"{speed:,.0f}",
                f"{speed / baseline:.2f}x",
            ]
        )
        print(f"  {rows[-1][0]}: done", flush=True)
    harness.print_table(
        ["views", "per image", "validation accuracy", "test accuracy", "test images/s", "speed"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
