"""The compute precision a Keras model trains in: float32, or mixed_bfloat16 where something
computes bfloat16 natively and `auto` times it as the faster for this model on this machine.

TensorFlow is imported where it is used, not with this module.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgpipe.runtime import cpu_count

if TYPE_CHECKING:
    from imgpipe.keras_models import KerasModelType, KerasParams
    from imgpipe.registry import TrainingData

# Keras dtype policies a model trains in (the first is the reference)
PRECISIONS = ("float32", "mixed_bfloat16")
# x86 CPU flags of native bfloat16 arithmetic (AVX-512 BF16, Intel AMX)
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# the CPU flags a model card names: vector width and native bfloat16 decide training speed
MACHINE_FLAGS = ("avx2", "avx512f", *BFLOAT16_CPU_FLAGS)
# precision auto: training steps run untimed (graph tracing, caches) and then timed, per
# precision, in TIMED_ROUNDS interleaved rounds (float32, bfloat16, float32, ...): the machine
# may change speed for minutes at a time, and one slow stretch must not decide the choice
WARMUP_STEPS = 3
TIMED_STEPS = 20
TIMED_ROUNDS = 4


@dataclass(frozen=True)
class PrecisionChoice:
    """The compute precision a training run uses, why, and what was timed to choose it."""

    precision: str  # one of PRECISIONS
    reason: str
    step_seconds: dict[str, float]  # seconds per training step of each precision timed


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def machine() -> dict[str, Any]:
    """The machine a model trains on, for its model card: CPU model, cores, memory, the CPU
    flags that set a model's speed (MACHINE_FLAGS) and NVIDIA GPUs, without importing TensorFlow."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if os.name == "posix" else 0
    gpus = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        with contextlib.suppress(OSError):
            lines = info.read_text(errors="replace").splitlines()
            gpus += [ln.partition(":")[2].strip() for ln in lines if ln.startswith("Model")]
    return {
        "cpu": cpu,
        "cores": cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "cpu_flags": sorted(cpu_flags() & set(MACHINE_FLAGS)),
        "gpus": gpus,
    }


def bfloat16_hardware() -> str | None:
    """What computes bfloat16 natively here (GPUs, or the CPU flags), or None: then bfloat16 is
    emulated and far slower than float32."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"{len(gpus)} GPU(s)"
    native = sorted(cpu_flags() & set(BFLOAT16_CPU_FLAGS))
    return f"CPU flags {', '.join(native)}" if native else None


def choose_precision(
    model_type: KerasModelType, params: KerasParams, data: TrainingData, hardware: str | None
) -> PrecisionChoice:
    """params.precision, or for `auto` the faster precision for this model type and data.

    Where nothing computes bfloat16 natively (hardware None) it is float32 untimed: emulated
    bfloat16 is several times slower. Otherwise WARMUP_STEPS and then TIMED_STEPS training
    steps of each precision are run on the first training images, timed in interleaved
    rounds; each precision's fastest round counts, and the faster precision wins.
    """
    if params.precision != "auto":
        return PrecisionChoice(params.precision, "as params.yaml sets it", {})
    if hardware is None:
        reason = (
            "auto, and no GPU or CPU flag of native bfloat16 "
            f"({' or '.join(BFLOAT16_CPU_FLAGS)}) here: bfloat16 would be emulated"
        )
        return PrecisionChoice(PRECISIONS[0], reason, {})
    seconds = _step_seconds(model_type, params, data)
    fastest = min(seconds, key=seconds.__getitem__)
    return PrecisionChoice(fastest, f"auto, the faster of the two on {hardware}", seconds)


def _step_seconds(
    model_type: KerasModelType, params: KerasParams, data: TrainingData
) -> dict[str, float]:
    """Seconds of one training step in each precision: the mean of its fastest round."""
    models = {
        precision: model_type.compiled_model(
            params,
            data.image_shape,
            data.num_classes,
            train_size=data.train_size,
            precision=precision,
        )
        for precision in PRECISIONS
    }
    size = params.batch_size
    x_head, y_head = data.train_head((WARMUP_STEPS + TIMED_STEPS) * size)  # no more is read
    y_head = model_type.targets(params, y_head, data.num_classes)
    batches = [
        (x_head[i : i + size], y_head[i : i + size]) for i in range(0, len(x_head) - size + 1, size)
    ]
    for model in models.values():
        for x, y in batches[:WARMUP_STEPS]:
            model.train_on_batch(x, y)
    timed = batches[WARMUP_STEPS:] or batches[-1:]  # a tiny data set: time what there is
    rounds = [timed[i::TIMED_ROUNDS] for i in range(TIMED_ROUNDS) if timed[i::TIMED_ROUNDS]]
    best = dict.fromkeys(PRECISIONS, float("inf"))
    for steps in rounds:
        for precision, model in models.items():
            started = time.perf_counter()
            for x, y in steps:
                model.train_on_batch(x, y)
            mean = (time.perf_counter() - started) / len(steps)
            best[precision] = min(best[precision], mean)
    return best
