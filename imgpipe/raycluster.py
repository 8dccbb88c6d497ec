"""The `ray` engines' connection to a Ray cluster (tabulate.engine: ray, imgpipe-predict --engine
ray): join the cluster that RAY_ADDRESS names, or start a local one for this process.

Ray is an optional extra (`pip install -e ".[ray]"`): nothing imports it unless a ray engine is
chosen. Every node must be able to import imgpipe (the same install) and read the files named to
it by path (a shared file system, or the same paths on every node).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from imgpipe.runtime import StageError

if TYPE_CHECKING:
    import ray

INSTALL_HINT = 'pip install -e ".[ray]"'
# seconds to wait for RAY_ADDRESS's port to accept a connection
CONNECT_SECONDS = 5.0


def import_ray() -> ray:
    """The ray module, or a StageError that says how to install it."""
    try:
        import ray
        import ray.data  # the engines use Ray Data
    except ImportError as error:
        raise StageError(
            f"the ray engine needs Ray, which is not installed ({error}): run `{INSTALL_HINT}`, "
            "or use the local engine"
        ) from error
    return ray


def check_reachable(address: str, timeout: float = CONNECT_SECONDS) -> None:
    """A StageError at once when nothing answers at a `host:port` RAY_ADDRESS (`ray.init`
    itself retries for minutes before it gives up)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # e.g. "auto": Ray resolves it
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise StageError(
            f"nothing answers at RAY_ADDRESS={address} ({error}): start the cluster "
            "(`ray start --head` on the head node), fix RAY_ADDRESS, or unset it to run on a "
            "local Ray"
        ) from None


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to."""
    import ray

    return int(ray.cluster_resources().get("CPU", 0))


def cpu_nodes() -> int:
    """Live nodes of the Ray cluster this process is connected to that have a CPU."""
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1)


@contextmanager
def ray_cluster(cpus: int) -> Iterator[str]:
    """Connect this process to Ray for the duration of the block; yields where it runs.

    With RAY_ADDRESS set (e.g. `ray://head:10001` or `head:6379`), joins that cluster and uses
    its CPUs; otherwise starts a local Ray instance with `cpus` CPUs, stopped again at the end.
    Ray Data keeps the order of rows (preserve_order): the engines' outputs are in input order.
    """
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            else:
                ray.init(
                    address="local",  # a new instance, even where a cluster runs on this machine
                    num_cpus=cpus,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    configure_logging=True,
                )
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
            raise StageError(
                f"could not start or join {where}: {error}; check that the cluster is up "
                "(`ray status`); a cluster with token authentication (what `ray start` makes "
                "where ~/.ray/auth_token exists) needs RAY_AUTH_MODE=token here and its token "
                "(`ray get-auth-token` on the head node, into ~/.ray/auth_token or "
                "RAY_AUTH_TOKEN); or unset RAY_ADDRESS to run on a local Ray"
            ) from error
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # the engines run one map each: Ray Data's default reservation of resources per operator left
    # one of two CPUs idle much of the time (tabulate on 2 cores: map 12.4 s with it, 6.4 s
    # without, for the same 11 s of decoding)
    context.op_resource_reservation_enabled = False
    context.enable_progress_bars = False  # the stage shows its own bar
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    where = (
        f"the Ray cluster at {address}" if address else "a local Ray instance"
    ) + f" ({cluster_cpus()} CPUs on {sum(n['Alive'] for n in ray.nodes())} node(s))"
    try:
        yield where
    finally:
        if started_here:
            ray.shutdown()
