"""Generate text from any checkpoint ``load_checkpoint`` reads, from its recurrent state.

    supra run generate --config tiny/generate prompt="The with statement"
    supra run generate --config mistral_7b/generate checkpoint=checkpoints/mistral-supra prompt="..."

Prints the text as it is generated, then prefill and decode tokens/s and the state size.
"""

import math
import time
from typing import List, Optional

import torch
from omegaconf import DictConfig

from supra.checkpoint import load_checkpoint
from supra.config import Rule, parse_recipe_args
from supra.generation import generate
from supra.loading import DTYPES, default_add_bos, resolve_checkpoint, resolve_device, resolve_dtype, resolve_tokenizer
from supra.modules import is_linear_layer

DEFAULTS = {
    "checkpoint": None,
    "tokenizer": None,
    "prompt": "Hello",
    "max_new_tokens": 64,
    "temperature": 0.0,
    "top_k": None,
    "top_p": None,
    "repetition_penalty": 1.0,
    "seed": 0,
    "stop_at_eos": True,
    "compile": False,
    "device": "auto",
    "dtype": None,
    "verify_checksums": True,
}
# What the defaults' types do not say: ranges, choices, and the keys that may be null.
RULES = {
    "checkpoint": Rule(str, nullable=True),
    "tokenizer": Rule(str, nullable=True),
    "max_new_tokens": Rule(int, low=1),
    "temperature": Rule(float, low=0),
    "top_k": Rule(int, low=1, nullable=True),
    "top_p": Rule(float, low=0, high=1, low_open=True, nullable=True),
    "repetition_penalty": Rule(float, low=0, low_open=True),
    "seed": Rule(int, low=0, nullable=True),
    "dtype": Rule(choices=[*DTYPES, "auto"], nullable=True),
}


def recurrent_state_bytes(model: torch.nn.Module, batch_size: int = 1) -> int:
    """Bytes of float32 recurrent state for ``batch_size`` sequences: constant in context length."""
    return sum(math.prod(layer.attn.state_shape(batch_size)) * 4 for layer in model.layers if is_linear_layer(layer))


def recipe_main(cfg: DictConfig) -> List[int]:
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    tokenizer = resolve_tokenizer(cfg.tokenizer, checkpoint)
    model = load_checkpoint(checkpoint, dtype=resolve_dtype(cfg.dtype), device=resolve_device(cfg.device),
                            verify_checksums=cfg.verify_checksums)
    prompt = ([tokenizer.bos_id] if default_add_bos(tokenizer) else []) + tokenizer.encode(cfg.prompt)
    stop = [tokenizer.eos_id] if cfg.stop_at_eos and getattr(tokenizer, "eos_id", None) is not None else None

    generated: List[int] = []
    # Decoding the new tokens with the prompt keeps the space a sentencepiece piece opens with
    # (decoded alone, a leading space is dropped); only what follows the prompt's text is shown.
    prompt_text = tokenizer.decode(prompt)
    shown = ""
    times = []

    def stream(step: int, tokens: torch.Tensor) -> None:
        nonlocal shown
        times.append(time.perf_counter())
        generated.append(int(tokens[0]))
        text = tokenizer.decode(prompt + generated)[len(prompt_text):]
        if text.endswith("\ufffd"):
            # A multi-byte character split across tokens: wait for its remaining bytes.
            return
        print(text[len(shown):], end="", flush=True)
        shown = text

    print(cfg.prompt, end="", flush=True)
    start = time.perf_counter()
    generate(
        model, [prompt], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, stop_tokens=stop, seed=cfg.seed,
        callback=stream, compile=cfg.compile,
    )
    print()
    prefill_s = times[0] - start
    # With compile=true the first decode step compiles: time the steady state after it.
    timed = times[1:] if cfg.compile and len(times) > 2 else times
    decode_s = timed[-1] - timed[0]
    decode_rate = (len(timed) - 1) / decode_s if decode_s > 0 else float("nan")
    print(f"prefill: {len(prompt)} tokens in {prefill_s:.3f} s ({len(prompt) / prefill_s:.0f} tokens/s); "
          f"decode: {len(times)} tokens at {decode_rate:.1f} tokens/s")
    if timed is not times:
        print(f"compilation: the first decode step took {times[1] - times[0]:.1f} s (not counted in tokens/s)")
    print(f"recurrent state: {recurrent_state_bytes(model) / 2**20:.2f} MiB per sequence, whatever the context length")
    return generated


def parse_args(argv: Optional[List[str]] = None) -> DictConfig:
    return parse_recipe_args(__doc__, DEFAULTS, 'prompt="Once upon a time"', argv, rules=RULES)


if __name__ == "__main__":
    try:
        recipe_main(parse_args())
    except ValueError as error:
        raise SystemExit(f"generate: {error}") from error
