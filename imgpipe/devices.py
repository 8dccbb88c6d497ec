"""The devices a Keras model trains on: train.devices planned against this machine, the
MirroredStrategy over several, and the averaging of what each device keeps on its own.

TensorFlow is imported where it is used, not with this module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from imgpipe.runtime import StageError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


@dataclass(frozen=True)
class DevicePlan:
    """The devices a Keras model trains on (train.devices on this machine), and why."""

    devices: tuple[str, ...]  # TensorFlow device names: ("/cpu:0",), ("/gpu:0", "/gpu:1"), ...
    cpu_split: int  # logical devices to make of the CPU before TensorFlow starts; 0 = none
    reason: str

    @property
    def replicas(self) -> int:
        """Copies of the model that train side by side, one per device."""
        return len(self.devices)


def plan_devices(devices: Literal["auto"] | int, gpus: int, batch_size: int) -> DevicePlan:
    """The devices train.devices names on a machine with `gpus` GPUs, for a global batch of
    batch_size images.

    auto: every GPU, or the one device there is (a GPU, or the CPU); N: the first N GPUs, or on
    a machine without GPUs the CPU split into N logical devices. Asking for more GPUs than there
    are, or a batch that does not split evenly over the devices, is an error.
    """
    if devices == "auto":
        if gpus > 1:
            names = tuple(f"/gpu:{i}" for i in range(gpus))
            plan = DevicePlan(names, 0, f"train.devices auto: all {gpus} GPUs here")
        elif gpus:
            plan = DevicePlan(("/gpu:0",), 0, "train.devices auto: the one GPU here")
        else:
            plan = DevicePlan(("/cpu:0",), 0, "train.devices auto, and no GPU here")
    elif gpus:
        if devices > gpus:
            raise StageError(
                f"train.devices is {devices} but this machine has {gpus} GPU"
                f"{'s' if gpus > 1 else ''}: set train.devices to {gpus} or fewer in params.yaml, "
                "or to auto (every GPU)"
            )
        names = tuple(f"/gpu:{i}" for i in range(devices))
        plan = DevicePlan(names, 0, f"train.devices {devices}: the first {devices} of {gpus} GPUs")
    elif devices == 1:
        plan = DevicePlan(("/cpu:0",), 0, "train.devices 1, and no GPU here")
    else:
        plan = DevicePlan(
            tuple(f"/cpu:{i}" for i in range(devices)),
            devices,
            f"train.devices {devices}, and no GPU here: the CPU split into {devices} logical "
            "devices",
        )
    if batch_size % plan.replicas:  # Keras' fit fails on a batch split unevenly over replicas
        lower = batch_size // plan.replicas * plan.replicas
        nearest = [n for n in (lower, lower + plan.replicas) if n]
        raise StageError(
            f"batch_size {batch_size} does not split evenly over {plan.replicas} devices "
            f"({plan.reason}): batch_size is the global batch, shared equally by the devices; "
            f"set the model's batch_size in params.yaml to a multiple of {plan.replicas} "
            f"({' or '.join(map(str, nearest))}), or change train.devices"
        )
    return plan


def split_cpu(count: int) -> None:
    """Make `count` logical devices of the CPU, which TensorFlow allows only before its first
    operation in a process (a process that already has them keeps them)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    made = tf.config.get_logical_device_configuration(cpu)
    if made is not None and len(made) == count:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        has = len(tf.config.list_logical_devices("CPU"))
        raise StageError(
            f"train.devices {count} splits the CPU into {count} logical devices, which "
            "TensorFlow allows only before its first operation, and this process has already "
            f"run TensorFlow on {has} CPU device{'s' if has > 1 else ''}: train in a fresh "
            "process (the train stage does)"
        ) from None


def distribution(plan: DevicePlan) -> tf.distribute.Strategy | None:
    """A MirroredStrategy over the plan's devices (the CPU split first where it says so), or
    None for a single device: no strategy at all, training exactly as without this option."""
    if plan.cpu_split:
        split_cpu(plan.cpu_split)
    if plan.replicas == 1:
        return None
    return _mirrored_strategy(plan.devices)


@functools.cache
def _mirrored_strategy(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per set of devices and process: a second one would number its
    cross-device reductions from the same keys as the first and collide with them (TensorFlow
    stops with 'Shape mismatch in the collective instance')."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(devices))


def average_replica_copies(model: keras.Model) -> None:
    """Give each variable that every device updates on its own (batch normalisation's moving
    statistics) the mean of its copies on all devices: the copies are equal again, as a model
    trained on one device has one value."""
    for variable in model.non_trainable_variables:
        copies = getattr(variable.value, "values", ())  # a MirroredVariable's per-device copies
        if len(copies) > 1 and np.issubdtype(copies[0].dtype.as_numpy_dtype, np.floating):
            variable.assign(np.mean([np.asarray(copy) for copy in copies], axis=0))
