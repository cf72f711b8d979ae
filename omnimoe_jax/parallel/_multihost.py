"""Joining a multi-process (multi-host) JAX job: jax.distributed plus cross-process CPU collectives."""

from __future__ import annotations

import jax

from omnimoe_jax._config_fields import is_int


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_device_count: int | None = None,
    initialization_timeout: int = 300,
) -> None:
    """Connect this process to the others; afterwards `jax.devices()` lists the devices of every process.

    Call it first, before anything touches a JAX backend. Process 0 hosts the coordinator service at
    `coordinator_address` ("host:port", reachable from every process); every process passes the same
    address and `num_processes` and its own `process_id`.

    `local_device_count` splits this process's CPU into that many devices (the CPU stand-in for one
    process per host with several GPUs; it does not change GPU devices). CPU collectives across processes
    go through gloo over TCP, set here explicitly so a CPU job never runs without them.
    `initialization_timeout` (seconds) bounds the wait for the other processes.
    """
    host, sep, port = coordinator_address.rpartition(":") if isinstance(coordinator_address, str) else ("", "", "")
    if not (host and sep and port.isdigit()):
        raise ValueError(f"coordinator_address={coordinator_address!r} must be 'host:port', e.g. '10.0.0.1:1234'")
    for name, value in (("num_processes", num_processes), ("process_id", process_id)):
        if not is_int(value):
            raise TypeError(f"{name}={value!r} must be an int")
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if local_device_count is not None:
        if not is_int(local_device_count) or local_device_count < 1:
            raise ValueError(f"local_device_count={local_device_count!r} must be None or a positive int")
        jax.config.update("jax_num_cpu_devices", local_device_count)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )
