"""Whether a compiled train step fits in the device's memory, and the micro-batching (`grad_accum`) that does.

XLA plans every buffer of a compiled executable ahead of time; `memory_estimate` reads that plan
(`Compiled.memory_analysis()`): arguments + outputs + temporaries, less the outputs aliased to donated
arguments (the TrainState, updated in place). `fit_train_step` compiles the run's train step before its first
step and

- for an int `grad_accum`, refuses (`StepDoesNotFitError`) a step whose estimate exceeds the device's memory
  limit, which would otherwise fail with an out-of-memory error deep inside XLA;
- for `grad_accum="auto"`, compiles it for grad_accum = 1, 2, 4, ... (those that divide batch_size into
  micro-batches the mesh can split), then for the smallest micro-batch the mesh splits if no power of two
  gives it (grad_accum 12 of batch_size 12), and takes the first whose estimate is at most `FIT_FRACTION` of
  the limit, or refuses with the estimate of that smallest micro-batch's step.

In a multi-process job every process fits the smallest limit of the job (`agreed_memory_limit`), so all of
them compile the same step. Either way the executable it returns is the one the loop trains with, so nothing
is compiled twice. "auto"
costs one compilation per grad_accum tried.

Not covered: the eval step, which runs on whole batches of batch_size sequences (`train.metrics.evaluate`),
is neither micro-batched nor checked here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from train import mesh as mesh_lib
from train.config import AUTO_GRAD_ACCUM, TrainConfig
from train.steps import Steps, build_steps, compiled_train_step

# "auto" takes a grad_accum only if its estimate is at most this share of the limit. The estimate covers the
# train step's own buffers; beside them the device holds what the loop keeps between steps (the eval step's
# temporaries, the batches the prefetcher puts on the device ahead of the step) and loses some to the
# allocator's fragmentation. The tenth left over is a judgement, not a measurement. An explicit int is
# refused only when its estimate exceeds the whole limit: it cannot run, whereas "auto" chooses with room.
FIT_FRACTION = 0.9

GB = 1e9
MIB = 2**20


class StepDoesNotFitError(Exception):
    """The train step's memory estimate exceeds what the device has (an int grad_accum), or no grad_accum
    brings it within `FIT_FRACTION` of that ("auto"): `estimate_bytes` (of the largest grad_accum tried) and
    `limit_bytes` say by how much."""

    def __init__(self, message: str, *, estimate_bytes: int | None, limit_bytes: int):
        super().__init__(message)
        self.estimate_bytes, self.limit_bytes = estimate_bytes, limit_bytes


def memory_estimate(compiled: Any) -> int | None:
    """Bytes XLA plans for one call of `compiled` (a `jax.stages.Compiled`) per device: arguments + outputs +
    temporaries, less the outputs aliased to donated arguments; None where the backend reports no analysis."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if analysis is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    total = sum(getattr(analysis, f, 0) or 0 for f in fields)
    return total - (getattr(analysis, "alias_size_in_bytes", 0) or 0)


def device_memory_limit(device: jax.Device | None = None) -> int:
    """Bytes one device (default: this process's first) may allocate: its allocator's `bytes_limit` where it
    reports memory stats (a GPU), else the host's physical memory shared by the host's devices of its kind (a
    CPU, whose memory_stats is None)."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // len(jax.local_devices(backend=device.platform))


def agreed_memory_limit(limit_bytes: int) -> int:
    """The smallest of every process's `limit_bytes` in a multi-process job (the limit itself in one process),
    so that every process compiles the same grad_accum: each would otherwise choose by its own device's limit,
    and processes whose hosts differ (CPU hosts with other amounts of memory) would train different steps."""
    if jax.process_count() == 1:
        return limit_bytes
    # In MiB as int32: jax arrays are 32-bit unless x64 is on, and bytes overflow int32 past 2 GiB.
    mib = np.int32(limit_bytes // MIB)
    return int(np.min(multihost_utils.process_allgather(mib))) * MIB


def grad_accum_candidates(batch_size: int, batch_shards: int = 1) -> list[int]:
    """grad_accum = 1, 2, 4, ... that divide `batch_size` into micro-batches of a multiple of `batch_shards`
    sequences (the devices a mesh splits each micro-batch over), in increasing order, and last the one of the
    smallest such micro-batch (`batch_shards` sequences) where it is no power of two: "auto" refuses only
    once the smallest micro-batch does not fit. Empty where batch_size is no multiple of batch_shards."""
    candidates, grad_accum = [], 1
    while grad_accum <= batch_size:
        if batch_size % grad_accum == 0 and (batch_size // grad_accum) % batch_shards == 0:
            candidates.append(grad_accum)
        grad_accum *= 2
    smallest = batch_size // batch_shards  # grad_accum of micro-batches of batch_shards sequences
    if batch_size % batch_shards == 0 and smallest not in candidates:
        candidates.append(smallest)  # larger than every power of two above: the order stays increasing
    return candidates


@dataclasses.dataclass(frozen=True)
class MemoryFit:
    """How the run's micro-batching was settled.

    Attributes:
      requested: the config's grad_accum, an int or "auto".
      grad_accum: the grad_accum compiled and trained with.
      estimate_bytes: XLA's estimate of its step (`memory_estimate`), None where the backend has none.
      limit_bytes: the device's limit (`device_memory_limit`).
      tried: (grad_accum, estimate_bytes) for each compilation, in order (one for an int grad_accum).
    """

    requested: int | str
    grad_accum: int
    estimate_bytes: int | None
    limit_bytes: int
    tried: tuple[tuple[int, int | None], ...]

    def to_dict(self) -> dict[str, Any]:
        """The start record's "memory" field (gigabytes, 1e9 bytes, to three significant digits)."""
        return {
            "requested_grad_accum": self.requested,
            "grad_accum": self.grad_accum,
            "estimate_gb": _gb(self.estimate_bytes),
            "limit_gb": _gb(self.limit_bytes),
            "tried": [[grad_accum, _gb(estimate)] for grad_accum, estimate in self.tried],
        }

    def summary(self) -> str:
        """The console's words for it: "grad_accum 4 (auto), step estimated at 12.3 GB of 80 GB"."""
        how = " (auto)" if self.requested == AUTO_GRAD_ACCUM else ""
        estimate = (
            "no memory estimate"
            if self.estimate_bytes is None
            else f"step estimated at {_gb_text(self.estimate_bytes)}"
        )
        return f"grad_accum {self.grad_accum}{how}, {estimate} of {_gb_text(self.limit_bytes)}"


def _gb(size: int | None) -> float | None:
    """Bytes as gigabytes to three significant digits (a small test step's estimate is not 0.00 GB)."""
    return None if size is None else float(f"{size / GB:.3g}")


def _gb_text(size: int) -> str:
    return f"{size / GB:.3g} GB"


def fit_train_step(
    config: TrainConfig, mesh: Mesh | None = None, *, limit_bytes: int | None = None, resuming: bool = False
) -> tuple[TrainConfig, Steps, Callable, MemoryFit]:
    """(config with grad_accum an int, its `build_steps`, its train step compiled for batches [grad_accum, micro,
    L + 1], the MemoryFit) for a run of `config` on `mesh` (or one device).

    `limit_bytes`: the memory limit to fit (default `device_memory_limit()`). StepDoesNotFitError when an int
    grad_accum's estimate exceeds it, or when no grad_accum of "auto" comes within FIT_FRACTION of it (with
    the largest one's estimate). Trace under `jax.set_mesh(mesh)` as for the steps themselves. `resuming`:
    `config` is a stored run's, whose grad_accum a resume keeps (the refusal then says what to do instead).
    """
    limit = agreed_memory_limit(device_memory_limit() if limit_bytes is None else limit_bytes)
    if config.grad_accum != AUTO_GRAD_ACCUM:
        steps, compiled, estimate = _compile(config, mesh)
        fit = MemoryFit(config.grad_accum, config.grad_accum, estimate, limit, ((config.grad_accum, estimate),))
        if estimate is not None and estimate > limit:
            raise StepDoesNotFitError(
                f"the train step of grad_accum={config.grad_accum} (micro-batches of {config.micro_batch_size} "
                f"sequences) needs an estimated {_gb_text(estimate)}, more than the device's {_gb_text(limit)}; "
                + (
                    "a resumed run keeps its grad_accum (config.json): resume it on a device with more memory, "
                    "or start a new run with --grad_accum=auto"
                    if resuming
                    else "try --grad_accum=auto or a larger grad_accum"
                ),
                estimate_bytes=estimate,
                limit_bytes=limit,
            )
        return config, steps, compiled, fit
    shards = 1 if mesh is None else mesh_lib.batch_shards(mesh)
    candidates = grad_accum_candidates(config.batch_size, shards)
    if not candidates:  # check_mesh's message for the largest micro-batch, which says why none divides
        mesh_lib.check_mesh(dataclasses.replace(config, grad_accum=1), mesh)
    tried = []
    for grad_accum in candidates:
        resolved = dataclasses.replace(config, grad_accum=grad_accum)
        if mesh is not None:
            mesh_lib.check_mesh(resolved, mesh)
        steps, compiled, estimate = _compile(resolved, mesh)
        tried.append((grad_accum, estimate))
        if estimate is None:
            raise StepDoesNotFitError(
                f'grad_accum="auto" needs XLA\'s memory estimate, which the {jax.default_backend()} backend does '
                "not report; give grad_accum as an int",
                estimate_bytes=None,
                limit_bytes=limit,
            )
        if estimate <= FIT_FRACTION * limit:
            return resolved, steps, compiled, MemoryFit(AUTO_GRAD_ACCUM, grad_accum, estimate, limit, tuple(tried))
    largest, estimate = tried[-1]
    raise StepDoesNotFitError(
        f'grad_accum="auto": no micro-batching of batch_size={config.batch_size} fits: the largest tried, '
        f"grad_accum={largest} (micro-batches of {config.batch_size // largest} sequences), needs an estimated "
        f"{_gb_text(estimate)}, more than {FIT_FRACTION:.0%} of the device's {_gb_text(limit)} "
        f"(estimates by grad_accum: {', '.join(f'{g}: {_gb_text(e)}' for g, e in tried)}); "
        "try a smaller batch_size or model, or more devices",
        estimate_bytes=estimate,
        limit_bytes=limit,
    )


def _compile(config: TrainConfig, mesh: Mesh | None) -> tuple[Steps, Callable, int | None]:
    """(steps, compiled train step, its memory estimate) of `config`, whose grad_accum is an int."""
    steps = build_steps(config, mesh)
    shape = (config.grad_accum, config.micro_batch_size, config.model.context_length + 1)
    compiled = compiled_train_step(steps, shape)
    return steps, compiled, memory_estimate(compiled)
