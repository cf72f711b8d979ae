"""benchmarks/compare.py's bookkeeping (no device work, nothing timed): the plan each variant's worker gets,
the targets computed from rows, the one-line-per-configuration summary, the merging of several runs."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # benchmarks/ is a folder of scripts, not a package


def test_plan_puts_the_target_point_first_and_skips_the_default_table_size():
    specs, refused = compare.plan(["omnimoe", "deepseekmoe-capacity"], [1024, 4096, 16384], [16384, 102400], "paper")
    omni, capacity = specs
    assert omni["jobs"] == [[4096, None], [1024, None], [16384, None], [4096, 16384]]  # 102400 is the default
    assert capacity["jobs"] == [[4096, None]]  # a one-point variant, no N sweep
    assert refused == [] and omni["modes"] == ["fwd", "fwdbwd"]


def test_plan_records_table_sizes_a_config_refuses():
    specs, refused = compare.plan(["peer-reference"], [4096], [100], "paper")  # 100 < 125 experts per head
    assert specs[0]["jobs"] == [[4096, None]]
    assert [r["mode"] for r in refused] == ["fwd", "fwdbwd"]
    assert all("experts_per_head=125 must be <= num_experts=100" in r["error"] for r in refused)


def _row(variant, mode, ms, tokens=4096):
    return {"variant": variant, "sweep": "tokens", "tokens": tokens, "N": 0, "active_params": 1, "mode": mode, "ms": ms}


def test_targets_compare_this_runs_rows_at_the_target_point():
    rows = [
        _row("omnimoe", "fwd", 2.0),
        _row("peer-reference", "fwd", 30.0),
        _row("deepseekmoe-matched", "fwd", 1.5),
        _row("omnimoe", "fwdbwd", 5.0),
        _row("peer-reference", "fwdbwd", 40.0, tokens=8192),  # another point: no data at the target
        {**_row("deepseekmoe-matched", "fwdbwd", None), "error": "OOM"},
    ]
    del rows[-1]["ms"]
    claims = {c["claim"]: c for c in compare.targets(rows, 4096)}
    peer = claims["omnimoe at least 10.9x faster than peer-reference at T=4096 (fwd)"]
    assert peer["speedup"] == pytest.approx(15.0) and peer["met"] is True
    deepseek = claims["omnimoe faster than deepseekmoe-matched at T=4096 (fwd)"]
    assert deepseek["speedup"] == pytest.approx(0.75) and deepseek["met"] is False
    assert claims["omnimoe at least 10.9x faster than peer-reference at T=4096 (fwdbwd)"]["met"] is None
    assert claims["omnimoe faster than deepseekmoe-matched at T=4096 (fwdbwd)"]["met"] is None


def test_summary_puts_both_modes_of_a_configuration_on_one_line():
    rows = [_row("dense", "fwd", 1.0), {**_row("dense", "fwdbwd", None), "error": "RESOURCE_EXHAUSTED"}]
    del rows[1]["ms"]
    (line,) = compare.summary(rows)
    assert line["fwd ms"] == 1.0 and line["fwdbwd ms"] is None
    assert line["note"] == "fwdbwd: RESOURCE_EXHAUSTED"


def _skipped(variant, mode, tokens=4096):
    row = {**_row(variant, mode, None, tokens), "error": "skipped: the variant's time share ran out"}
    del row["ms"]
    return row


def test_combine_keeps_a_measured_row_over_a_skipped_one_and_the_later_of_two_measured():
    first = {"rows": [_row("omnimoe", "fwd", 2.0), _skipped("omnimoe", "fwdbwd"), _row("pkm", "fwd", 30.0)]}
    second = {"rows": [_skipped("omnimoe", "fwd"), _row("omnimoe", "fwdbwd", 7.0), _row("pkm", "fwd", 31.0)]}
    merged = {(r["variant"], r["mode"]): r for r in compare.combine([first, second])}
    assert len(merged) == 3
    assert merged["omnimoe", "fwd"]["ms"] == 2.0 and merged["omnimoe", "fwd"]["source"] == 0  # measured wins
    assert merged["omnimoe", "fwdbwd"]["ms"] == 7.0 and merged["omnimoe", "fwdbwd"]["source"] == 1
    assert merged["pkm", "fwd"]["ms"] == 31.0 and merged["pkm", "fwd"]["source"] == 1  # the later run wins


def test_combine_refuses_runs_from_different_devices(tmp_path, monkeypatch):
    monkeypatch.setattr(compare.common, "RESULTS", tmp_path)
    base = {"setting": "paper", "rows": [], "checks": [], "configs": {}, "variants": {}}
    for name, device in (("a", "NVIDIA H100 80GB HBM3"), ("b", "NVIDIA H200")):
        (tmp_path / f"{name}.json").write_text(compare.json.dumps({**base, "device": device}))
    with pytest.raises(SystemExit, match="different devices"):
        compare.write_combined(["a", "b"], "merged")
    with pytest.raises(SystemExit, match="does not exist"):
        compare.write_combined(["a", "missing"], "merged")


def test_combine_only_from_takes_a_variants_rows_from_one_run_alone():
    old = {"rows": [_row("pkm", "fwd", 30.0), _row("pkm", "fwd", 60.0, tokens=8192), _row("omnimoe", "fwd", 2.0)]}
    new = {"rows": [_row("pkm", "fwd", 8.0), _skipped("pkm", "fwd", tokens=8192)]}
    merged = {(r["variant"], r["tokens"]): r for r in compare.combine([old, new], {"pkm": {1}})}
    assert merged["pkm", 4096]["ms"] == 8.0
    assert "ms" not in merged["pkm", 8192]  # the old code's measurement does not stand in for the new one
    assert merged["omnimoe", 4096]["ms"] == 2.0 and merged["omnimoe", 4096]["source"] == 0


def test_combine_ranks_a_failure_above_a_skip_and_keeps_checks_by_name():
    first = {
        "rows": [{**_row("deepseekmoe", "fwdbwd", None), "error": "RESOURCE_EXHAUSTED: Out of memory"}],
        "checks": [{"check": "omnimoe: auto vs xla", "passed": True}, {"check": "checks worker", "passed": False}],
    }
    del first["rows"][0]["ms"]
    second = {
        "rows": [_skipped("deepseekmoe", "fwdbwd")],
        "checks": [{"check": "pkm: auto vs xla", "passed": True}],  # a run whose checks all finished
    }
    (row,) = compare.combine([first, second])
    assert "Out of memory" in row["error"]  # an out-of-memory says more than a skip
    checks = {c["check"]: c["source"] for c in compare.combine_checks([first, second])}
    assert checks == {"omnimoe: auto vs xla": 0, "pkm: auto vs xla": 1}  # the timed-out worker is superseded
    only_new_pkm = {c["check"] for c in compare.combine_checks([second, first], {"pkm": {1}})}
    assert "pkm: auto vs xla" not in only_new_pkm  # PKM's checks follow its rows to run 1, which has none
