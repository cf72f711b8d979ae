"""The training job end to end on a shrunken tiny preset: main, metrics, exact resume, signals, sampling.

Every run here uses the same model and optimizer settings, so they share one compilation of the train and
eval steps (`train.steps.build_steps` caches per model/optimizer config).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import secrets
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import SHRUNK, assert_close, shrunk_config

from omnimoe_jax import TransformerLM
from train import cli, sample
from train import memory as memory_lib
from train import metrics as metrics_lib
from train import steps as steps_lib
from train.checkpoint import Checkpoints
from train.data import decode, encode
from train.flops import model_flops_per_token
from train.loop import load_config, run
from train.metrics import read_metrics
from train.run_directory import RunDirectoryError
from train.steps import abstract_state, build_steps, make_init_state, make_optimizer, make_train_step

TRAIN_FIELDS = {
    "step",
    "loss",
    "grad_norm",
    "learning_rate",
    "dropped_pairs",
    "tokens_per_s",
    "tokens_seen",
    "elapsed_s",
}
EVAL_FIELDS = {"step", "val_loss", "bits_per_byte", "tokens", "dropped_pairs", "routing", "routing_per_layer"}
ROUTING_FIELDS = {"experts_used", "max_load", "load_entropy", "router_entropy"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> pathlib.Path:
    """One run of `python -m train` (real main, default stdlib corpus) with the shrunken tiny preset."""
    seed = int(os.environ.get("OMNIMOE_TEST_SEED", secrets.randbits(31))) % 2**16
    print(f"trained_run seed={seed} (rerun with OMNIMOE_TEST_SEED={seed})")
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    assert cli.main(["--run-dir", str(run_dir), *SHRUNK, f"--seed={seed}"]) == 0
    return run_dir


def test_main_writes_the_documented_metrics(trained_run):
    records = read_metrics(trained_run)
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "start" and kinds[-1] == "end"
    start = records[0]
    assert start["step"] == 0 and start["resumed"] is False
    assert start["corpus"]["source"].startswith("stdlib:") and start["corpus"]["byte_level"]
    assert start["parameters"]["active"] < start["parameters"]["total"]
    assert start["model_flops_per_token"] == model_flops_per_token(shrunk_config().model)["model_flops_per_token"]
    assert start["peak_flops_per_device"] is None
    assert start["config"] == json.loads((trained_run / "config.json").read_text())
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10]
    for record in train:
        assert set(record) == TRAIN_FIELDS | {"kind", "mfu"}
        assert all(math.isfinite(record[k]) for k in TRAIN_FIELDS)
        assert record["mfu"] is None  # a CPU has no datasheet bf16 peak in train.flops
        assert record["tokens_seen"] == record["step"] * 8 * 32
        assert record["dropped_pairs"] == 0  # one device: every routed pair is computed
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10]
    for record in evals:
        assert set(record) == EVAL_FIELDS | {"kind"}
        assert record["dropped_pairs"] == 0
        # A loose bound: it catches blow-ups, not slow starts (a random model begins above ln(vocab)).
        assert math.isfinite(record["val_loss"]) and record["val_loss"] < 2 * math.log(256)
        # Every target but the rare document separators is a byte, so bits per byte is about the loss in bits.
        assert record["bits_per_byte"] == pytest.approx(record["val_loss"] / math.log(2), rel=0.02)
        assert set(record["routing"]) == ROUTING_FIELDS
        assert [layer["layer"] for layer in record["routing_per_layer"]] == [0, 1]
        routing = record["routing"]
        assert 0 < routing["experts_used"] <= 1 and routing["max_load"] >= 1
        assert 0 < routing["load_entropy"] <= 1 and 0 < routing["router_entropy"] <= 1
    # The byte model starts near uniform (8 bits per byte) and learns within 10 steps.
    assert evals[-1]["val_loss"] < math.log(259)
    assert [r["step"] for r in records if r["kind"] == "checkpoint"] == [5, 10]
    assert records[-1]["reason"] == "done" and records[-1]["step"] == 10
    assert Checkpoints(trained_run).all_steps() == [5, 10]


def test_loss_decreases_on_a_repeated_batch(key):
    steps = build_steps(shrunk_config())
    state = steps.init_state(key)
    batch = jax.random.randint(jax.random.fold_in(key, 1), (1, 8, 33), 0, 256)  # [accum, micro, L + 1]
    losses = []
    for _ in range(8):
        state, metrics = steps.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.9 * losses[1], losses  # step 0 has learning rate 0 (warmup starts at 0)
    assert int(state.step) == 8


class BagOfBytes(nn.Module):
    """A stand-in language model (embedding then a dense layer): cheap to compile, no batch statistics."""

    vocab_size: int = 259

    @nn.compact
    def __call__(self, tokens, *, train=False):
        del train
        return nn.Dense(self.vocab_size)(jnp.tanh(nn.Embed(self.vocab_size, 16)(tokens)))  # [B, L, V]


def test_gradient_accumulation_averages_micro_batches(key):
    config = shrunk_config("--learning_rate=1e-2")
    model, optimizer = BagOfBytes(), make_optimizer(config)
    train_step = jax.jit(make_train_step(model, optimizer, config))
    init_state = make_init_state(model, optimizer, config)(jax.random.key(0))
    batch = jax.random.randint(key, (8, 33), 0, 256)
    results = []
    for micro_batches in (1, 4):
        state, history = init_state, []
        for _ in range(3):  # the first step has learning rate 0
            state, metrics = train_step(state, batch.reshape(micro_batches, 8 // micro_batches, 33))
            history.append([float(metrics["loss"]), float(metrics["grad_norm"])])
        params = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(state.params)])
        results.append((np.array(history), params))
    (history_whole, params_whole), *splits = results
    for history, params in splits:
        np.testing.assert_allclose(history, history_whole, rtol=1e-5)  # same loss, same averaged gradient
        assert_close(params, params_whole, jnp.float32, what="params after 3 accumulated steps")


def test_resume_is_exact(tmp_path, small_corpus, seed):
    config = shrunk_config(f"--data={small_corpus}", f"--seed={seed % 2**16}")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(config, straight, log=print)["step"] == 10
    assert run(config, split, stop_at_step=5, log=print)["reason"] == "stop_at_step"
    assert Checkpoints(split).all_steps() == [5]
    assert cli.main(["--run-dir", str(split), "--resume"]) == 0  # the real command line
    assert load_config(split) == config
    states = []
    for run_dir in (straight, split):
        with Checkpoints(run_dir) as checkpoints:
            states.append(checkpoints.restore(10, abstract_state(config)))
    (state_a, data_a), (state_b, data_b) = states
    assert data_a == data_b  # the sampler's RNG ended in the same place: the same batches were drawn
    leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
    assert len(leaves_a) == len(leaves_b) > 10
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise: params, opt_state, batch_stats
    losses = [{r["step"]: r["loss"] for r in read_metrics(d) if r["kind"] == "train"} for d in (straight, split)]
    assert losses[0] == losses[1]
    resumed_start = [r for r in read_metrics(split) if r["kind"] == "start"][-1]
    assert resumed_start["resumed"] is True and resumed_start["step"] == 5


def test_resume_can_extend_a_finished_run(tmp_path, small_corpus, capsys):
    config = shrunk_config(f"--data={small_corpus}")
    run_dir = tmp_path / "run"
    assert run(config, run_dir, log=print)["step"] == 10
    records = len(read_metrics(run_dir))
    assert cli.main(["--run-dir", str(run_dir), "--resume"]) == 0  # finished: says so, compiles nothing
    assert "is complete at step 10 of 10; --steps=N continues it" in capsys.readouterr().out
    assert len(read_metrics(run_dir)) == records
    with pytest.raises(SystemExit):
        cli.main(["--run-dir", str(run_dir), "--resume", "--steps=8"])
    assert "--steps=8 is below the run's latest checkpoint, step 10" in capsys.readouterr().err
    assert cli.main(["--run-dir", str(run_dir), "--resume", "--steps=12", "--log_every=1", "--eval_every=2"]) == 0
    assert "changed on resume: steps 10 -> 12, eval_every 5 -> 2, log_every 2 -> 1" in capsys.readouterr().out
    assert load_config(run_dir) == dataclasses.replace(config, steps=12, log_every=1, eval_every=2)
    after = read_metrics(run_dir)[records:]
    assert [r["step"] for r in after if r["kind"] == "train"] == [11, 12]
    assert [r["step"] for r in after if r["kind"] == "eval"] == [12]
    assert Checkpoints(run_dir).latest_step() == 12


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_stops(tmp_path, small_corpus, signum):
    config = shrunk_config(f"--data={small_corpus}", "--log_every=1")
    before = signal.getsignal(signum)

    def log(line: str) -> None:
        print(line)
        if line.startswith("step ") and line.split()[1].startswith("3/"):
            os.kill(os.getpid(), signum)  # handled by the loop: finish the step, save, stop

    summary = run(config, tmp_path / "run", log=log)
    name = signal.Signals(signum).name
    assert summary["reason"] == name and summary["step"] == 3
    assert Checkpoints(tmp_path / "run").all_steps() == [3]
    assert read_metrics(tmp_path / "run")[-1] == {**read_metrics(tmp_path / "run")[-1], "reason": name}
    assert signal.getsignal(signum) is before  # the previous handler is back


def test_time_limit_stops_with_a_checkpoint(tmp_path, small_corpus):
    config = shrunk_config(f"--data={small_corpus}", "--time_limit_minutes=1e-9")
    summary = run(config, tmp_path / "run", log=print)
    assert summary["reason"] == "time limit" and summary["step"] == 0
    assert Checkpoints(tmp_path / "run").all_steps() == [0]


def test_run_directory_misuse_is_refused(tmp_path, small_corpus, capsys):
    config = shrunk_config(f"--data={small_corpus}", "--time_limit_minutes=1e-9")
    run(config, tmp_path / "used", log=print)
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        run(config, tmp_path / "used", log=print)
    with pytest.raises(RunDirectoryError, match="not a run directory"):
        load_config(tmp_path / "nowhere")
    # A run that never saved a checkpoint (it died compiling): --resume starts it from step 0.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config.to_dict()))
    assert cli.main(["--run-dir", str(tmp_path / "empty"), "--resume"]) == 0
    assert "never saved a checkpoint: starting it again from step 0" in capsys.readouterr().out
    assert Checkpoints(tmp_path / "empty").all_steps() == [0]
    with pytest.raises(SystemExit):
        cli.main(["--run-dir", str(tmp_path / "used"), "--resume", "--learning_rate=1", "--steps=20"])
    assert "it can change only steps, ffn.expert_parallel_layout, eval_every, " in (err := capsys.readouterr().err)
    assert "not ['learning_rate'] (to change those, start a new run)" in err


def test_an_unusable_run_directory_is_refused_before_compiling(tmp_path, small_corpus, monkeypatch):
    # Compiling the step (once per grad_accum "auto" tries) can take minutes: the directory is checked first.
    config = shrunk_config(f"--data={small_corpus}", "--time_limit_minutes=1e-9")
    run(config, tmp_path / "used", log=print)
    (tmp_path / "empty").mkdir()

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the run directory was checked")

    monkeypatch.setattr(memory_lib, "fit_train_step", no_compiling)
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        run(config, tmp_path / "used", log=print)
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        run(dataclasses.replace(config, grad_accum="auto"), tmp_path / "used", log=print)
    with pytest.raises(RunDirectoryError, match=r"holds a run with another config \(learning_rate differ\)"):
        run(dataclasses.replace(config, learning_rate=3e-3), tmp_path / "used", resume=True, log=print)
    with pytest.raises(RunDirectoryError, match="not a run directory"):
        run(config, tmp_path / "empty", resume=True, log=print)


def test_bad_data_fails_before_compiling(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["--run-dir", str(run_dir), "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not run_dir.exists()


def test_sample_command_prints_the_requested_tokens(trained_run, capsys):
    assert sample.main(["--run", str(trained_run), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    model, variables, step = sample.load_model(trained_run)
    assert step == 10
    # What the command printed is the prompt and the decoded 20 tokens the same sampling draws.
    expected = sample.generate(
        model, variables, encode("def ")[:-1].tolist(), max_new_tokens=20, temperature=0.8, top_p=0.95, seed=3
    )
    assert expected.shape == (20,)
    assert out == "def " + decode(expected) + "\n"
    prompt = encode("import os\n" * 5)[:-1].tolist()  # 51 tokens: longer than the 32-token window
    new = sample.generate(model, variables, prompt, max_new_tokens=20, temperature=0.0)
    assert new.shape == (20,) and new.dtype == np.int32
    assert int(new.min()) >= 0 and int(new.max()) < model.config.vocab_size
    again = sample.generate(model, variables, prompt, max_new_tokens=20, temperature=0.0)
    np.testing.assert_array_equal(new, again)  # greedy is deterministic
    assert isinstance(decode(new), str)
    assert sample.main(["--run", str(trained_run), "--step", "7"]) == 2
    assert "available steps: [5, 10]" in capsys.readouterr().err


def test_sample_token_respects_temperature_and_top_p(key):
    logits = jnp.array([2.0, 1.9, -1.0, -3.0, 0.5])
    keys = jax.random.split(key, 2000)
    greedy = jax.vmap(lambda k: sample.sample_token(logits, k, temperature=0.0, top_p=1.0))(keys)
    assert set(np.asarray(greedy).tolist()) == {0}
    nucleus = jax.vmap(lambda k: sample.sample_token(logits, k, temperature=1.0, top_p=0.5))(keys)
    assert set(np.asarray(nucleus).tolist()) == {0, 1}  # p(0) = 0.46 < 0.5: the second token joins
    tiny_p = jax.vmap(lambda k: sample.sample_token(logits, k, temperature=1.0, top_p=1e-6))(keys)
    assert set(np.asarray(tiny_p).tolist()) == {0}
    full = np.asarray(jax.vmap(lambda k: sample.sample_token(logits, k, temperature=1.0, top_p=1.0))(keys))
    counts = np.bincount(full, minlength=5) / len(full)
    # 2000 draws: the standard error of a frequency near 0.45 is 0.011, so 0.06 is over 5 of them.
    np.testing.assert_allclose(counts, jax.nn.softmax(logits), atol=0.06)


@pytest.mark.parametrize("temperature", [1e-38, 1e-45])
def test_a_vanishing_temperature_is_greedy(key, temperature):
    # Dividing the raw logits by 1e-38 overflowed them all to +-inf: NaN probabilities, tokens 0 or 1.
    logits = jnp.array([-10.0, 5.0, 20.0, 25.0, 10.0, -30.0])
    keys = jax.random.split(key, 200)
    for top_p in (1.0, 0.9):
        draw = functools.partial(sample.sample_token, logits, temperature=temperature, top_p=top_p)
        assert set(np.asarray(jax.vmap(draw)(keys)).tolist()) == {3}


@pytest.mark.parametrize("temperature", [math.inf, math.nan, -1.0])
def test_sample_refuses_a_bad_temperature(temperature):
    model = TransformerLM(shrunk_config().model)
    with pytest.raises(ValueError, match=f"temperature={temperature!r} must be a finite number >= 0"):
        sample.generate(model, {}, [1, 2], max_new_tokens=1, temperature=temperature)


@pytest.mark.parametrize("max_new_tokens", [True, 0, 2.0])
def test_sample_refuses_a_bad_max_new_tokens(max_new_tokens):
    # True is an int to Python: it used to generate one token.
    model = TransformerLM(shrunk_config().model)
    with pytest.raises(ValueError, match=f"max_new_tokens={max_new_tokens!r} must be a positive int"):
        sample.generate(model, {}, [1, 2], max_new_tokens=max_new_tokens)


def test_sample_refuses_a_run_on_pre_tokenised_files(tmp_path, capsys):
    # Only the start record matters: the check runs before any checkpoint is read.
    start = {"kind": "start", "step": 0, "corpus": {"source": "tokens.npy", "byte_level": False}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(start) + "\n")
    assert sample.main(["--run-dir", str(tmp_path), "--prompt", "hello"]) == 2
    assert "trained on pre-tokenised files (tokens.npy), not byte tokens" in capsys.readouterr().err


@pytest.fixture
def fresh_steps():
    """Steps built again for the test and forgotten after it (`build_steps` caches per config, and a test that
    changes what the steps compute must not hand its compilation to another)."""
    steps_lib._build_steps.cache_clear()
    yield
    steps_lib._build_steps.cache_clear()


def test_a_train_field_declared_in_its_table_reaches_the_records_and_the_console(
    tmp_path, small_corpus, monkeypatch, fresh_steps
):
    # One entry in train.metrics.TRAIN_FIELDS, nothing else: the step computes it, the loop reduces it over the
    # window, the train (and end) records hold it and the progress line shows it.
    update_norm = metrics_lib.TrainField(
        "global norm of the optimizer's update", lambda v: optax.tree.norm(v["updates"]), "update norm {:.3g}"
    )
    steps_taken = metrics_lib.TrainField(
        "steps since the previous train record", lambda v: jnp.ones((), jnp.int32), "{:d} steps", window="sum"
    )
    monkeypatch.setitem(metrics_lib.TRAIN_FIELDS, "update_norm", update_norm)
    monkeypatch.setitem(metrics_lib.TRAIN_FIELDS, "steps_taken", steps_taken)
    config = shrunk_config(f"--data={small_corpus}", "--steps=5", "--log_every=2", "--eval_every=5")
    lines = []
    assert run(config, tmp_path / "run", log=lines.append)["step"] == 5
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 5]
    assert [r["steps_taken"] for r in train] == [2, 2, 1]
    assert all(r["update_norm"] > 0 and math.isfinite(r["update_norm"]) for r in train)
    assert records[-1]["kind"] == "end" and records[-1]["steps_taken"] == 0  # every step was in a train record
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) == 3 and all(" | update norm " in line for line in progress)
    assert " | 2 steps | " in progress[0] and " | 1 steps | " in progress[2]


def test_a_routing_statistic_declared_in_its_table_reaches_the_eval_record_and_the_console(monkeypatch):
    # One entry in train.metrics.ROUTING_STATISTICS for a statistic a layer sows: the eval step's sums, the
    # record's routing fields and the eval line read it from there.
    hottest = metrics_lib.RoutingStatistic(
        "the hottest expert's share of the assignments",
        ("hottest_share",),
        lambda total, layer: (float(total / np.sum(layer.counts)),),
        "hottest {hottest_share:.0%}",
    )
    monkeypatch.setitem(metrics_lib.ROUTING_STATISTICS, "hottest_count", hottest)
    sown = {
        f"layer_{i}": {"ffn": {"expert_counts": (np.array(counts),), "hottest_count": (np.int32(max(counts)),)}}
        for i, counts in ((0, [6, 2, 0, 0]), (1, [2, 2, 2, 2]))
    }
    sums = {k: np.asarray(v) for k, v in metrics_lib.sown_statistics(sown, (0, 1)).items()}
    assert sums["hottest_count"].tolist() == [6, 2]
    report = metrics_lib.routing_report({**sums, "tokens": np.float64(4)}, (0, 1), num_batches=1)
    assert [layer["hottest_share"] for layer in report["routing_per_layer"]] == [0.75, 0.25]
    assert report["routing"]["hottest_share"] == 0.5
    lines = []
    result = {"val_loss": 1.0, "bits_per_byte": None, "tokens": 4, "dropped_pairs": 0, **report}
    metrics_lib.log_eval(metrics_lib.MetricsLog(".", enabled=False), lines.append, step=3, result=result)
    assert lines[0].endswith(" | load entropy 0.703 | hottest 50%"), lines[0]
