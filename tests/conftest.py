"""Fixtures: a fresh random seed per test (printed, and fixed by OMNIMOE_TEST_SEED to reproduce)."""

from __future__ import annotations

import json
import os
import pathlib
import secrets

import jax
import pytest

# References are compared at full f32 precision; on GPUs XLA's default f32 matmul may use TF32.
# Pallas kernels set the precision of their own dots, so this only affects the plain-XLA side.
jax.config.update("jax_default_matmul_precision", "highest")
# Eight CPU devices for the data/expert-parallel tests (tests/test_parallel_*.py). Must be set before any
# backend starts; computations that do not ask for a mesh still run on one device (the default).
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def seed(request) -> int:
    value = int(os.environ.get("OMNIMOE_TEST_SEED", secrets.randbits(31)))
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (rerun with OMNIMOE_TEST_SEED={value})")
    return value


@pytest.fixture
def key(seed) -> jax.Array:
    return jax.random.key(seed)


@pytest.fixture
def small_corpus(tmp_path) -> str:
    """About 100 kB of real Python in one file (split by position; faster to load than the whole stdlib), for
    the training runs of tests/test_train_loop.py and tests/test_run_integrity.py."""
    root = pathlib.Path(json.__file__).parent.parent  # the stdlib directory
    names = ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "fnmatch.py", "bisect.py")
    corpus = tmp_path / "corpus.py"
    corpus.write_bytes(b"\n".join((root / name).read_bytes() for name in names))
    return str(corpus)


def pytest_runtest_makereport(item, call):
    # Name the seed in the failure report so a failing random draw can be replayed.
    if call.when == "call" and call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                item.add_report_section("call", "seed", f"OMNIMOE_TEST_SEED={value}")
