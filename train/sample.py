"""Generate text from a trained run: `python -m train.sample --run DIR --prompt "def " --max-new-tokens 200`.

Decoding recomputes the model over a fixed window of the last `context_length` tokens for every new
token (no KV cache): one compiled shape, exact under causal attention (the window is right-padded with
PAD, which positions before it never see), and fast enough for the presets' small contexts. Beyond
`context_length` tokens the window slides, so the model never sees positions it was not trained on.

The prompt is encoded as [BOS, its UTF-8 bytes] (or [BOS, its ids] through the tokenizer a run trained
with, the run directory's tokenizer.json); the output is exactly `max_new_tokens` tokens, printed as text
with special tokens left out. `--temperature 0` is greedy; otherwise tokens are sampled from the
softmax at that temperature, restricted to the smallest set of tokens whose probability reaches `--top-p`.
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe_jax._config_fields import is_int
from omnimoe_jax._model import TransformerLM
from train import data as data_lib
from train import tokenizer as tokenizer_lib
from train.checkpoint import Checkpoints
from train.loop import load_config
from train.metrics import read_metrics
from train.run_directory import RunDirectoryError
from train.steps import abstract_state
from train.tokenizer import TextTokenizer


def load_model(run_dir: str | pathlib.Path, step: int | None = None) -> tuple[TransformerLM, dict[str, Any], int]:
    """(model, {"params", "batch_stats"}, step) of a run's checkpoint (the latest unless `step` is given)."""
    config = load_config(run_dir)
    with Checkpoints(run_dir, keep=config.keep_checkpoints) as checkpoints:
        available = checkpoints.all_steps()
        if not available:
            raise RunDirectoryError(f"{checkpoints.directory} holds no checkpoint")
        if step is None:
            step = available[-1]
        elif step not in available:
            raise RunDirectoryError(f"step={step} has no checkpoint; available steps: {available}")
        state, _ = checkpoints.restore(step, abstract_state(config))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return TransformerLM(config.model), variables, step


def run_tokenizer(run_dir: str | pathlib.Path) -> TextTokenizer | None:
    """The tokenizer a run trained with (its directory's copy, `train.tokenizer`), or None for byte tokens."""
    path = pathlib.Path(run_dir) / tokenizer_lib.RUN_DIR_FILE
    return TextTokenizer(path) if path.is_file() else None


def _require_text_tokens(run_dir: str | pathlib.Path) -> None:
    """ValueError unless the run trained on byte tokens or a stored tokenizer: a text prompt is encoded, and
    the output decoded, with one of those; a run on pre-tokenised .npy/.bin files used a tokenizer the run
    directory does not hold."""
    if not (pathlib.Path(run_dir) / "metrics.jsonl").is_file():
        return  # not a run directory: load_model says so
    if (pathlib.Path(run_dir) / tokenizer_lib.RUN_DIR_FILE).is_file():
        return
    starts = [r for r in read_metrics(run_dir) if r["kind"] == "start"]
    if starts and not starts[0]["corpus"]["byte_level"]:
        raise ValueError(
            f"{str(run_dir)!r} trained on pre-tokenised files ({starts[0]['corpus']['source']}), not byte tokens: "
            "this command encodes prompts and decodes output as bytes; call train.sample.generate with your "
            "tokenizer's ids instead"
        )


def sample_token(logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
    """One token id [] int32 from logits [V]: argmax if temperature == 0, else nucleus (top-p) sampling."""
    if temperature == 0:
        return jnp.argmax(logits).astype(jnp.int32)
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then sends the others to -inf
    # (greedy, as the limit should be) instead of every logit to +-inf, whose softmax is NaN.
    logits = (logits - jnp.max(logits)) / temperature
    if top_p < 1:
        sorted_logits = jnp.sort(logits)[::-1]  # [V], descending
        probs = jax.nn.softmax(sorted_logits)  # [V]
        mass_before = jnp.cumsum(probs) - probs  # [V], probability of the more likely tokens
        keep = jnp.sum(mass_before < top_p)  # >= 1: the most likely token is always kept
        logits = jnp.where(logits < sorted_logits[keep - 1], -jnp.inf, logits)  # [V]
    return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_p"))
def _next_token(model, variables, window, length, key, *, temperature, top_p):
    # window: [1, L] int32, right-padded; length: [] int32 valid tokens -> [] int32
    logits = model.apply(variables, window)[0, length - 1]  # [V]
    return sample_token(logits, key, temperature=temperature, top_p=top_p)


def generate(
    model: TransformerLM,
    variables: dict[str, Any],
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    pad: int = data_lib.PAD,
) -> np.ndarray:
    """The `max_new_tokens` token ids [max_new_tokens] that follow `prompt` (a non-empty list of ids).

    pad: the id filling the window past the context (never seen by it); a tokenizer run's `TextTokenizer.pad`.
    """
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    if len(prompt) == 0:
        raise ValueError("prompt must hold at least one token (the BOS of an encoded prompt)")
    window_size = model.config.context_length
    tokens = list(prompt)
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    for key in keys:
        context = tokens[-window_size:]
        window = np.full((1, window_size), pad, np.int32)  # [1, L]
        window[0, : len(context)] = context
        new = _next_token(model, variables, window, np.int32(len(context)), key, temperature=temperature, top_p=top_p)
        tokens.append(int(new))
    return np.asarray(tokens[len(prompt) :], np.int32)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.sample",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--run", "--run-dir", dest="run", required=True, help="run directory written by python -m train"
    )
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    try:
        _require_text_tokens(args.run)
        tokenizer = run_tokenizer(args.run)
        model, variables, _ = load_model(args.run, args.step)
        codec = data_lib if tokenizer is None else tokenizer
        prompt = codec.encode(args.prompt)[:-1]  # [BOS, tokens...] without the EOS
        new = generate(
            model,
            variables,
            prompt.tolist(),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            pad=data_lib.PAD if tokenizer is None else tokenizer.pad,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.prompt + codec.decode(new))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
