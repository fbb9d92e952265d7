"""Starting or joining Ray: the one place that imports it and turns its absence into a user error.

Without an address a local Ray is started with the given number of CPUs and stopped at the end; with one
(`ray://host:10001`, `host:6379` or `auto`) the driver joins that cluster and leaves it running. Since Ray 2.50
a local start turns on token authentication and stores the token in ~/.ray/auth_token; a cluster that uses tokens
needs the same token on the driver (RAY_AUTH_TOKEN or that file), which is Ray's business, not ours.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

from distillad.errors import ConfigError

RAY_EXTRA_HINT = "pip install 'distillad[ray]'"


def import_ray() -> Any:
    """The ray module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--engine ray needs Ray: {RAY_EXTRA_HINT}") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on an address nobody listens at (Ray itself retries for minutes). `auto` is Ray's own."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({error})") from None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                log_to_driver: bool = True) -> Iterator[Any]:
    """Yield the ray module with Ray running: a fresh local instance (shut down afterwards) or a joined cluster.

    An already initialised Ray (e.g. a caller's own `ray.init`) is used as it is and left running."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"the number of Ray CPUs must be >= 1, got {num_cpus}")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": log_to_driver,
                              "configure_logging": True, "logging_level": "WARNING"}
    if address:
        _check_reachable(address)
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ConfigError(f"could not start {where}: {error}") from None
    try:
        yield ray
    finally:
        ray.shutdown()
