"""`python -m train.plot RUN_DIR [RUN_DIR ...] [--out FILE]`: a PNG of one or more runs' curves.

Four panels against tokens seen, read from each run's metrics.jsonl (fields in `train.metrics`):

- training loss (nats per token) and, dashed, the validation loss;
- validation bits per byte (byte-level corpora and tokenizers; validation loss for pre-tokenised ids);
- training throughput in tokens/s, with MFU on a second axis where the records have an `mfu` field;
- routing health at each evaluation (mean over the sparse layers): experts used, load entropy and, for
  OmniMoE, router entropy (all fractions of their ideal 1; see `train.metrics`).

Several runs overlay, one colour each, named in the legend by their directory. A resumed run's records for
steps it trained again after its last checkpoint replace the earlier ones. Default output:
<first RUN_DIR>/curves.png.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

ROUTING_CURVES = (("experts_used", "-"), ("load_entropy", "--"), ("router_entropy", ":"))


def run_curves(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """{"train": {tokens, loss, tokens_per_s[, mfu]}, "eval": {tokens, val_loss, bits_per_byte, <routing>}}
    from one run's metrics records, each series sorted by step with the latest record of a step kept."""
    starts = [r for r in records if r["kind"] == "start"]
    if not starts:
        raise ValueError("metrics.jsonl has no start record: not a run of python -m train")
    config = starts[0]["config"]  # batch and context are fixed for a run (--resume cannot change them)
    tokens_per_step = config["batch_size"] * config["model"]["context_length"]
    curves = {}
    for kind in ("train", "eval"):
        by_step = {r["step"]: r for r in records if r["kind"] == kind}  # later records (a resume) win
        rows = [by_step[s] for s in sorted(by_step)]
        series: dict[str, list[float]] = {"tokens": [r["step"] * tokens_per_step for r in rows]}
        if kind == "train":
            series["loss"] = [r["loss"] for r in rows]
            series["tokens_per_s"] = [r["tokens_per_s"] for r in rows]
            # A CPU run records mfu as null (no datasheet peak): no MFU curve then.
            if rows and all(r.get("mfu") is not None for r in rows):
                series["mfu"] = [r["mfu"] for r in rows]
        else:
            series["val_loss"] = [r["val_loss"] for r in rows]
            series["bits_per_byte"] = [r.get("bits_per_byte") for r in rows]
            for name, _ in ROUTING_CURVES:
                if rows and all(name in r.get("routing", {}) for r in rows):
                    series[name] = [r["routing"][name] for r in rows]
        curves[kind] = series
    return curves


def _labels(run_dirs: Sequence[pathlib.Path]) -> list[str]:
    names = [d.resolve().name for d in run_dirs]
    # Two runs named alike (a/run, b/run) are told apart by their whole path.
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def plot_runs(run_dirs: Sequence[str | pathlib.Path], out: str | pathlib.Path) -> pathlib.Path:
    """Write the PNG of the runs' curves to `out`; returns its path. ValueError naming a directory without
    readable metrics."""
    import matplotlib.pyplot as plt

    fig = make_figure(run_dirs)
    out = pathlib.Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def make_figure(run_dirs: Sequence[str | pathlib.Path]):
    """The matplotlib Figure of the runs' curves (2 x 2 panels, see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")  # a file, not a window: works over ssh and in CI
    import matplotlib.pyplot as plt

    from train.metrics import read_metrics

    run_dirs = [pathlib.Path(d) for d in run_dirs]
    runs = []
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            raise ValueError(f"run_dir={str(run_dir)!r} holds no metrics.jsonl: not a run directory of python -m train")
        try:
            runs.append(run_curves(read_metrics(run_dir)))
        except (ValueError, KeyError) as error:
            raise ValueError(f"run_dir={str(run_dir)!r}: cannot read its metrics.jsonl ({error!r})") from None
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    (ax_loss, ax_bpb), (ax_speed, ax_routing) = axes
    ax_mfu = None
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, curves) in enumerate(zip(_labels(run_dirs), runs, strict=True)):
        colour = colours[i % len(colours)]
        train, evals = curves["train"], curves["eval"]
        ax_loss.plot(train["tokens"], train["loss"], color=colour, label=f"{label} train")
        ax_loss.plot(evals["tokens"], evals["val_loss"], color=colour, ls="--", marker=".", label=f"{label} val")
        bits = evals["bits_per_byte"]
        if bits and all(b is not None for b in bits):
            ax_bpb.plot(evals["tokens"], bits, color=colour, marker=".", label=label)
            ax_bpb.set_ylabel("validation bits / byte")
        else:  # pre-tokenised ids: no byte count to divide by
            ax_bpb.plot(evals["tokens"], evals["val_loss"], color=colour, marker=".", label=f"{label} (nats/token)")
            ax_bpb.set_ylabel("validation bits / byte (or nats / token)")
        ax_speed.plot(train["tokens"], train["tokens_per_s"], color=colour, label=label)
        if "mfu" in train:
            ax_mfu = ax_mfu or ax_speed.twinx()
            ax_mfu.plot(train["tokens"], train["mfu"], color=colour, ls="--", label=f"{label} MFU")
            ax_mfu.set_ylabel("MFU (dashed)")
        for name, style in ROUTING_CURVES:
            if name in evals:
                ax_routing.plot(
                    evals["tokens"], evals[name], color=colour, ls=style, marker=".", label=f"{label} {name}"
                )
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.set_title("training loss (solid), validation loss (dashed)")
    ax_bpb.set_title("validation bits per byte")
    ax_speed.set_ylabel("tokens / s")
    ax_speed.set_title("training throughput")
    ax_routing.set_ylabel("fraction of ideal (1)")
    ax_routing.set_title("routing health: experts used (-), load entropy (--), router entropy (:)")
    for ax in axes.flat:
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if not ax_routing.lines:
        ax_routing.text(
            0.5, 0.5, "no routing records (dense FFN)", ha="center", va="center", transform=ax_routing.transAxes
        )
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of python -m train")
    parser.add_argument("--out", metavar="FILE", help="the PNG to write (default: <first RUN_DIR>/curves.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.run_dirs, args.out or pathlib.Path(args.run_dirs[0]) / "curves.png")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
