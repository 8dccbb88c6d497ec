"""How fast the CNN trains on this machine, against a reference timed in the same run.

Machines differ by a factor of four and more (AVX2 only, or AVX-512 with bfloat16), so the CNN's
time budget is stated in units of E_ref: the wall time of one training epoch of the reference
CNN (REFERENCE below: four VGG blocks 32-64-128-256 with one convolution each, batch norm,
global average pooling, 64x64 RGB, flip, rotation, zoom and shift augmentation, float32, batch
64) on the 16,000 training images of ../shared/data/dogs-vs-cats/train.zip. For the reference
and for the CNN that params.yaml trains (on its own view, `models.cnn`; with progressive
resizing, an epoch of each phase: the smaller images' and the full view's), in float32 (the
precision both targets are judged in) and, where `auto` resolves to bfloat16 as `train@cnn`
resolves it, in bfloat16 too, it prints
images/s, forward FLOPs per image counted from the model, the training GFLOP/s that makes (3x
forward: forward, input gradients, weight gradients) and its share of the machine's peak in
that precision, measured in the same run with a large Conv2D and a large matmul in TensorFlow.
Then where a training step's time goes, by ablation: forward, backward, optimizer update,
augmentation, and the gather of each batch's rows. The nets' epochs are timed in turn, --repeats
times, and an epoch counts as the sum of its fifths' fastest times (see epoch_seconds): this
VM's speed changes under it. Every target ends with `met` or `MISSED`; the exit
status is 1 when one is missed.

  python benchmarks/train_speed.py                  # 16,000 training images, 3 epochs of each net
  python benchmarks/train_speed.py --images 2000    # a quick look
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # imgpipe and benchmarks

from benchmarks import harness
from benchmarks.harness import REPO

# The reference CNN (docs/presets.md has it as `dvc exp run -S` values): the default that
# scored 0.828 on the full data, kept reachable whatever the default becomes.
REFERENCE = {
    "stem": "none",
    "filters": [32, 64, 128, 256],
    "convs_per_block": 1,
    "residual": False,
    "batch_norm": True,
    "batch_norm_momentum": 0.9,
    "pooling": "global_average",
    "head_units": 128,
    "dropout": 0.3,
    "augment": {"flip": "horizontal", "rotation": 0.05, "zoom": 0.1, "shift": 0.1, "crop": 0.0},
    "flip_tta": False,
    "tta_shift": 0.0,
    "ema": 0.0,
    "progressive": {"fraction": 0.0, "scale": 0.5},
    "cutmix": 0.0,
    "optimizer": "adam",
    "learning_rate": 0.001,
    "weight_decay": 0.0,
    "schedule": "cosine",
    "warmup_epochs": 0.0,
    "label_smoothing": 0.0,
    "batch_size": 64,
    "epochs": 11,
    "precision": "float32",
}
AUTO = "params.yaml's cnn, as auto trains it"
PARTS = 5  # slices of an epoch, timed in turn (see epoch_seconds)


def forward_flops(model: Any) -> int:
    """Multiply-adds x 2 of one image's forward pass: Conv2D and Dense layers (the rest is
    element-wise and below 1%)."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, height, width, out_channels = layer.output.shape
            in_channels = layer.input.shape[-1]
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            total += 2 * height * width * out_channels * in_channels * kernel
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)


def peak_gflops(precision: str) -> dict[str, float]:
    """GFLOP/s of a large matmul and a large 3x3 Conv2D in this precision, best of 5."""
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "mixed_bfloat16" else tf.float32
    a = tf.random.normal((2048, 2048), dtype=tf.float32)
    a = tf.cast(a, dtype)
    images = tf.cast(tf.random.normal((64, 32, 32, 128)), dtype)  # (N, H, W, C)
    kernel = tf.cast(tf.random.normal((3, 3, 128, 128)), dtype)
    matmul = tf.function(lambda: tf.matmul(a, a))
    conv = tf.function(lambda: tf.nn.conv2d(images, kernel, 1, "SAME"))
    work = {"matmul": 2 * 2048**3, "conv2d": 2 * 64 * 32 * 32 * 128 * 128 * 9}
    best: dict[str, float] = {}
    for name, op in (("matmul", matmul), ("conv2d", conv)):
        op().numpy()  # trace and warm up
        times = []
        for _ in range(5):
            started = time.perf_counter()
            op().numpy()
            times.append(time.perf_counter() - started)
        best[name] = work[name] / min(times) / 1e9
    return best


@dataclass(frozen=True)
class Timed:
    """One net timed: its section, precision and training images, and the epoch whose set-up
    (CnnType.prepare_epoch: progressive resizing's image size) its epochs get."""

    section: Any
    precision: str
    data: Any
    epoch: int

    @property
    def small(self) -> bool:
        """Whether this epoch trains on smaller images (progressive resizing's first phase)."""
        return self.epoch < self.section.small_epochs

    @property
    def scale(self) -> float:
        """The share of the view's height and width this epoch trains on."""
        return self.section.progressive.scale if self.small else 1.0

    @property
    def epochs(self) -> int:
        """How many of the run's epochs are like this one (its phase's)."""
        small = self.section.small_epochs
        return small if self.small else self.section.epochs - small


def warm_model(section: Any, data: Any, precision: str, epoch: int = 0) -> tuple[Any, Any]:
    """The model compiled as train@cnn compiles it, readied for epoch `epoch`, and its training
    targets (all images).

    Three batches go through `fit` first: `fit` traces its own step function (not the one
    `train_on_batch` traces) once per training run, and that one-off trace, seconds for a deep
    graph, is not part of an epoch's time.
    """
    from imgpipe.keras_training import in_memory_batches, seed_everything
    from imgpipe.registry import model_type

    seed_everything(0)
    cnn = model_type("cnn")
    targets = cnn.targets(section, data.y_train, data.num_classes)  # one-hot if smoothed
    model = cnn.compiled_model(
        section,
        tuple(data.x_train.shape[1:]),
        data.num_classes,
        train_size=len(data.x_train),
        precision=precision,
    )
    cnn.prepare_epoch(model, section, epoch, train_size=len(data.x_train))
    warm = 3 * section.batch_size
    pixels = cnn.training_pixels(section, data, epoch)  # the epoch's images, of its size
    batches = in_memory_batches(pixels[:warm], targets[:warm], section.batch_size)
    model.fit(batches, shuffle=False, verbose=0)
    return model, targets


def epoch_seconds(
    configs: dict[str, Timed], repeats: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Each net's training epoch (no validation) in seconds, and its model.

    This VM runs stretches of seconds to minutes at one of two speeds, about 2x apart, at random,
    so one whole epoch against another compares a net at one speed with another at the other.
    So the nets' epochs are timed in turn, `repeats` times over, each as one `fit` call as
    train@cnn makes it, with the time at the end of every batch; an epoch is cut into PARTS
    slices of consecutive batches (the first with `fit`'s start-up, the last with its wind-down),
    and a net's epoch is the sum of each slice's fastest time over the repeats, as timeit takes
    the best: every net gets the same chances at the fast speed.
    """
    import keras
    import numpy as np

    from imgpipe.registry import model_type

    cnn = model_type("cnn")
    models, targets = {}, {}
    for name, timed in configs.items():
        models[name], targets[name] = warm_model(
            timed.section, timed.data, timed.precision, timed.epoch
        )

    class Stamps(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.times.append(time.perf_counter())

    slices: dict[str, list[float]] = {name: [float("inf")] * PARTS for name in configs}
    for repeat in range(repeats):
        for name, timed in configs.items():
            stamps = Stamps()
            started = time.perf_counter()
            # the epoch's input exactly as train@cnn makes it (data has no val rows)
            data, epoch = timed.data, timed.epoch
            fed = cnn.epoch_input(
                timed.section, data, (targets[name], data.y_val), seed=0, epoch=epoch
            )
            models[name].fit(**fed, verbose=0, callbacks=[stamps])
            ended = time.perf_counter()
            # slice k ends with batch cuts[k]; the last slice also holds fit's wind-down
            cuts = np.linspace(0, len(stamps.times), PARTS + 1).astype(int)[1:] - 1
            edges = [started, *(stamps.times[c] for c in cuts[:-1]), ended]
            for part in range(PARTS):
                seconds = edges[part + 1] - edges[part]
                slices[name][part] = min(slices[name][part], seconds)
            print(f"  {name}, epoch {repeat + 1}/{repeats}: {ended - started:.1f} s", flush=True)
    return {name: sum(best) for name, best in slices.items()}, models


def step_breakdown(
    section: Any, data: Any, precision: str, steps: int = 25, rounds: int = 5
) -> dict[str, float]:
    """Milliseconds per batch of each part of a training step, by ablation.

    Each part is run `steps` times in all after two untimed runs, in `rounds` rounds that take
    the parts in turn; a part's time is the mean of its fastest round (this VM's speed changes
    under it, so parts timed one after the other would be compared at different speeds).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from imgpipe.keras_training import epoch_order
    from imgpipe.registry import model_type

    size = section.batch_size
    shape = tuple(data.x_train.shape[1:])
    cnn = model_type("cnn")
    plain = section.model_copy(
        update={
            "augment": section.augment.model_copy(
                update={"flip": "none", "rotation": 0.0, "zoom": 0.0, "shift": 0.0, "crop": 0.0}
            )
        }
    )
    x = tf.constant(data.x_train[:size])
    y = tf.constant(cnn.targets(section, data.y_train[:size], data.num_classes))
    functions = {}
    for name, variant in (("with augmentation", section), ("without augmentation", plain)):
        model = cnn.compiled_model(
            variant, shape, data.num_classes, train_size=len(data.x_train), precision=precision
        )
        loss_fn = keras.losses.get(model.loss)  # what compile() was given
        forward = tf.function(lambda model=model: model(x, training=True))

        @tf.function
        def gradients(model=model, loss_fn=loss_fn):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            return tape.gradient(loss, model.trainable_variables)

        functions[f"forward ({name})"] = lambda forward=forward: forward().numpy()
        functions[f"forward + backward ({name})"] = lambda gradients=gradients: [
            g.numpy() for g in gradients()
        ]
        functions[f"whole step ({name})"] = lambda model=model: model.train_on_batch(x, y)
    for function in functions.values():
        function()  # trace
        function()
    per_round = max(steps // rounds, 1)
    parts = dict.fromkeys(functions, float("inf"))
    for _ in range(rounds):
        for part, function in functions.items():
            started = time.perf_counter()
            for _ in range(per_round):
                function()
            parts[part] = min(parts[part], (time.perf_counter() - started) / per_round * 1000)
    order = epoch_order(len(data.x_train), 0, 0)
    batches = int(np.ceil(len(data.x_train) / size))
    started = time.perf_counter()
    for start in range(0, len(order), size):
        _ = data.x_train[order[start : start + size]]
    gather = (time.perf_counter() - started) * 1000
    parts["input: the batch's uint8 rows gathered from the table"] = gather / batches
    return parts


def first_phase(name: str, small: int) -> str:
    """The name under which a net's epoch on smaller images is timed."""
    return f"{name}, first {small} epochs"


def run_x_e_ref(
    results: dict[str, dict[str, float]], name: str, small: int, once: float = 0.0
) -> float:
    """A net's whole run in units of E_ref: its full-view epochs, its epochs on smaller images
    where it has them, and `once`, what the run does once (resizing the table for them)."""
    phases = [name, first_phase(name, small)] if small else [name]
    return sum(results[phase]["x_e_ref"] for phase in phases) + once


def main(argv: list[str] | None = None) -> int:
    parser = harness.argument_parser(
        __doc__,
        repeats=3,
        repeats_help="timed epochs of each net, in turn (each fifth's best counts)",
    )
    args = parser.parse_args(argv)
    raw = harness.existing_raw(args.raw)
    harness.print_machine("tensorflow", "keras")

    from imgpipe.models.cnn import CnnParams
    from imgpipe.params import load_params
    from imgpipe.precision import bfloat16_hardware, choose_precision
    from imgpipe.registry import TrainingData, model_type
    from imgpipe.tables import read_table

    params = load_params(REPO / "params.yaml")
    current = params.cnn
    shape = params.views[params.models["cnn"]]
    if shape.height != shape.width:
        raise SystemExit(f"train_speed.py times square views; models.cnn's is {shape}")
    views = {"reference": harness.View(64, "rgb"), "cnn": harness.View(shape.height, shape.color)}
    data = {}
    with tempfile.TemporaryDirectory(prefix="imgpipe-train-speed-") as work:
        for view in dict.fromkeys(views.values()):  # each view tabulated once
            tables = harness.tabulated_project(
                Path(work) / view.name,
                Path(work) / "stages.log",
                raw=raw,
                view=view,
                images=args.images,
            )
            train = read_table(tables / "train.parquet", with_sources=False)
            data[view] = TrainingData(
                train.pixels,
                train.labels,
                train.pixels[:0],
                train.labels[:0],
                len(train.class_names),
            )
            print(f"data: {len(train.labels):,} training images of {view.name}", flush=True)
    reference_data, cnn_data = data[views["reference"]], data[views["cnn"]]

    reference = CnnParams.model_validate({**current.model_dump(), **REFERENCE}, strict=False)
    choice = choose_precision(model_type("cnn"), current, cnn_data, bfloat16_hardware())
    print(
        f"params.yaml's cnn: precision {current.precision} -> {choice.precision} ({choice.reason})"
    )

    peaks = {p: peak_gflops(p) for p in {"float32", choice.precision}}
    # The time budget and the utilisation target are judged in float32, the reference's precision
    # and what a CPU without bfloat16 runs; where `auto` picks bfloat16, that is timed too.
    default = "params.yaml's cnn"
    small = current.small_epochs  # epochs on smaller images first (progressive resizing)
    last = current.epochs - 1  # an epoch on the full view
    configs = {
        "reference (E_ref)": Timed(reference, "float32", reference_data, 0),
        default: Timed(current, "float32", cnn_data, last),
    }
    resize_seconds = 0.0
    if small:
        # the smaller images, resized once as train@cnn resizes them, and kept apart from the
        # full view's epochs (which would free them)
        small_data = dataclasses.replace(cnn_data, derived={})
        started = time.perf_counter()
        model_type("cnn").training_pixels(current, small_data, 0)
        resize_seconds = time.perf_counter() - started
        configs[first_phase(default, small)] = Timed(current, "float32", small_data, 0)
    if choice.precision != "float32":
        configs[AUTO] = Timed(current, choice.precision, cnn_data, last)
        if small:
            configs[first_phase(AUTO, small)] = Timed(current, choice.precision, small_data, 0)
    same = reference.model_dump(exclude={"precision"}) == current.model_dump(
        exclude={"precision"}
    ) and (views["reference"] == views["cnn"])
    if same:
        print("params.yaml's cnn is the reference here: timed once in float32, reported for both")
    timed = {k: v for k, v in configs.items() if not (same and k == default)}
    epochs, models = epoch_seconds(timed, args.repeats)
    if same:
        epochs[default] = epochs["reference (E_ref)"]
        models[default] = models["reference (E_ref)"]
    e_ref = epochs["reference (E_ref)"]
    rows = []
    results = {}
    for name, config in configs.items():
        seconds, model = epochs[name], models[name]
        # the layers' shapes are the full view's: a smaller image's work shrinks with its area
        flops = forward_flops(model) * config.scale**2
        images_per_second = len(config.data.x_train) / seconds
        achieved = 3 * flops * images_per_second / 1e9
        peak = max(peaks[config.precision].values())
        results[name] = {
            "seconds": seconds,
            "utilisation": achieved / peak,
            "x_e_ref": config.epochs * seconds / e_ref,  # this phase of the run, in E_ref
        }
        rows.append(
            [
                name,
                config.precision,
                f"{config.data.x_train.shape[1]}x{config.data.x_train.shape[2]}"
                + (f" at {config.scale:g}" if config.small else ""),
                f"{seconds:.1f}",
                f"{images_per_second:.0f}",
                f"{flops / 1e6:.1f}",
                f"{achieved:.1f}",
                f"{peak:.1f}",
                f"{100 * achieved / peak:.1f}%",
                f"{config.epochs}",
                f"{results[name]['x_e_ref']:.1f}",
            ]
        )
    harness.print_table(
        [
            "CNN",
            "precision",
            "images",
            "epoch s",
            "images/s",
            "fwd MFLOP/image",
            "train GFLOP/s",
            "peak GFLOP/s",
            "utilisation",
            "epochs",
            "epochs x epoch / E_ref",
        ],
        rows,
    )
    for precision, peak in sorted(peaks.items()):
        print(
            f"peak {precision}: matmul 2048^3 {peak['matmul']:.1f} GFLOP/s, "
            f"3x3 Conv2D 64x32x32x128 {peak['conv2d']:.1f} GFLOP/s (best of 5)"
        )

    print(
        "\nwhere a training step of params.yaml's cnn goes (ms per batch of "
        f"{current.batch_size}, {choice.precision}, the fastest of 5 interleaved rounds of 5):"
    )
    parts = step_breakdown(current, cnn_data, choice.precision)
    for part, ms in parts.items():
        print(f"  {part:<55} {ms:8.1f}")
    whole = parts["whole step (with augmentation)"]
    shares = {
        "augmentation (forward with it - without)": parts["forward (with augmentation)"]
        - parts["forward (without augmentation)"],
        "forward through the network": parts["forward (without augmentation)"],
        "backward (forward + backward - forward)": parts["forward + backward (with augmentation)"]
        - parts["forward (with augmentation)"],
        "optimizer update (whole step - forward + backward)": whole
        - parts["forward + backward (with augmentation)"],
    }
    print("  so, of the whole step with augmentation:")
    for part, ms in shares.items():
        print(f"    {part:<53} {ms:8.1f}  {100 * ms / whole:5.1f}%")

    reference_use = results["reference (E_ref)"]["utilisation"]
    float32 = results[default]
    once = resize_seconds / e_ref
    budget = run_x_e_ref(results, default, small, once)
    print(f"\nE_ref = {e_ref:.1f} s on this machine")
    if small:
        print(
            f"progressive resizing: the table resized once in {resize_seconds:.1f} s "
            f"({once:.2f} x E_ref, in the budget)"
        )
    print("targets:")
    targets = harness.Targets()
    targets.check(
        "train@cnn within 20 x E_ref, float32 forced (epochs x epoch time, validation not counted)",
        budget <= 20,
        f"{budget:.1f} x E_ref",
    )
    ratio = float32["utilisation"] / reference_use
    targets.check(
        "params.yaml's cnn's training utilisation at least 1.5x the reference's (both float32)",
        ratio >= 1.5,
        f"{ratio:.2f}x ({100 * float32['utilisation']:.1f}% against {100 * reference_use:.1f}%)",
    )
    if AUTO in results:
        auto = results[AUTO]
        whole = run_x_e_ref(results, AUTO, small, once)
        targets.info(
            f"in {choice.precision}, as `auto` trains here: "
            f"{whole:.1f} x E_ref; utilisation "
            f"{100 * auto['utilisation']:.1f}% of the {choice.precision} peak, "
            f"{auto['utilisation'] / reference_use:.2f}x the reference's share of the float32 peak"
        )
    return targets.summary()


if __name__ == "__main__":
    sys.exit(main())
