"""The `small` preset on one GPU: the training stack's GPU tests, then a time-bounded training run.

    PYTHONPATH=. python benchmarks/train_small.py [--minutes 4] [--key=value ...]

1. Runs `pytest -m gpu tests/test_train_gpu.py` (cuDNN attention vs XLA, bf16 train steps).
2. Trains the `small` preset (default overrides: --steps=1000 --eval_every=100, so the learning-rate
   schedule completes in a few minutes; more --key=value overrides may follow) with a wall-time limit,
   attention "auto" (cuDNN) unless its test in step 1 did not pass, then "xla" (recorded in the results).
3. Samples 200 tokens from the final checkpoint.
4. Writes train_small.json (environment, config, every metrics record, summary, sample),
   train_small_metrics.jsonl, train_small_loss.png and train_gpu_tests.xml under $OUT (or
   benchmarks/results/). The run's checkpoints stay in a temporary directory: they are gigabytes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from xml.etree import ElementTree

import jax

from benchmarks.common import RESULTS, environment, print_table
from train import sample
from train.config import apply_overrides, parse_overrides
from train.data import decode, encode
from train.loop import run
from train.metrics import read_metrics
from train.presets import get_preset

DEFAULT_OVERRIDES = ["--steps=1000", "--warmup_steps=100", "--eval_every=100", "--checkpoint_every=1000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-time limit of the training run")
    args, rest = parser.parse_known_args()
    out = pathlib.Path(os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    junit = out / "train_gpu_tests.xml"
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", f"--junitxml={junit}", "tests/test_train_gpu.py"],
        capture_output=True,
        text=True,
        check=False,
    )
    print(tests.stdout[-3000:], tests.stderr[-2000:], sep="\n")
    cudnn_broken = not _passed(junit, "test_cudnn_attention_matches_xla")
    overrides = [*DEFAULT_OVERRIDES, f"--time_limit_minutes={args.minutes}", *rest]
    if cudnn_broken:
        overrides.append("--attention=xla")
    config = apply_overrides(get_preset("small"), parse_overrides(overrides))

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = pathlib.Path(tmp) / "small"
        summary = run(config, run_dir)
        records = read_metrics(run_dir)
        model, variables, _ = sample.load_model(run_dir)
        new = sample.generate(
            model, variables, encode("def ")[:-1].tolist(), max_new_tokens=200, temperature=0.8, top_p=0.95
        )
        text = "def " + decode(new)
    (out / "train_small_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    steady = train[1:] or train  # the first window includes the first steps' warm-up
    tokens_per_s = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]
    result = {
        **environment(),
        "gpu_tests": {"returncode": tests.returncode, "tail": tests.stdout[-1500:]},
        "attention_fallback_to_xla": cudnn_broken,
        "implementation": config.model.implementation,
        "config": config.to_dict(),
        "start": records[0],
        "summary": summary,
        "median_tokens_per_s": tokens_per_s,
        "records": records,
        "sample": text,
    }
    (out / "train_small.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(train, evals, out / "train_small_loss.png", title=f"small preset on {environment()['device']}")

    print_table(
        [{k: r.get(k) for k in ("step", "val_loss", "bits_per_byte")} | r.get("routing", {}) for r in evals],
        ["step", "val_loss", "bits_per_byte", "experts_used", "max_load", "load_entropy", "router_entropy"],
    )
    print(f"median tokens/s {tokens_per_s:,.0f}; {summary['reason']} at step {summary['step']}")
    print(f"compile {records[0]['compile_s']} s; devices {jax.devices()}")
    print("sample:", text)
    print("wrote", sorted(p.name for p in out.iterdir()))


def _passed(junit: pathlib.Path, test: str) -> bool:
    """Whether `test` ran and passed according to pytest's JUnit XML report."""
    if not junit.exists():
        return False
    cases = [c for c in ElementTree.parse(junit).iter("testcase") if c.get("name") == test]
    return len(cases) == 1 and not any(child.tag in ("failure", "error", "skipped") for child in cases[0])


def _plot(train: list[dict], evals: list[dict], path: pathlib.Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (nats/token)")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss (nats/token)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
