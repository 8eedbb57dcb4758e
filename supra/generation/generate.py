"""Generation from the recurrent state: one chunked prefill, then one recurrent step per token."""

import contextlib
import math
import numbers
import weakref
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import delete_kv_caches

from supra.generation.sampling import apply_repetition_penalty, sample_next
from supra.modules import is_linear_layer

# model -> its compiled decode step (compiled once, reused by later calls).
_COMPILED = weakref.WeakKeyDictionary()
# A one-token step is a few hundred tiny operations: inductor runs elementwise kernels under this many
# elements per thread on one CPU thread (waking a second one costs more than the work), and calls
# its kernels from C++ rather than Python (a step's worth of Python calls is about a millisecond).
_CPU_COMPILE_OPTIONS = {"cpp.min_chunk_size": 32768, "cpp_wrapper": True}

Callback = Callable[[int, torch.Tensor], None]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Optional[Sequence[int]] = None,
    seed: Optional[Union[int, Sequence[Optional[int]]]] = None,
    pad_id: int = 0,
    callback: Optional[Callback] = None,
    compile: bool = False,
) -> List[List[int]]:
    """Generates continuations of a batch of prompts of any lengths.

    Prompts are left-padded into one batch; pad tokens never enter the recurrent state and
    positions count real tokens only, so each prompt gets exactly what it gets alone. The whole
    prompt is prefilled by one chunked parallel forward whose final state seeds the cache; every
    new token then costs one recurrent step, whatever the context length. Softmax layers of a
    hybrid model keep a KV cache. The model is left as found: caches set up here are deleted,
    caches that existed are reset, and the train/eval mode is restored.

    Args:
        model (nn.Module): a ``SupraDecoder`` (all-linear or hybrid).
        prompts (Sequence[Sequence[int]]): token ids, one non-empty list per request.
        max_new_tokens (int): tokens to generate per request (>= 1).
        temperature (float): 0 is greedy; > 0 samples from softmax(logits / temperature).
        top_k (Optional[int]): sample among the k most likely tokens (>= 1).
        top_p (Optional[float]): nucleus sampling, in (0, 1].
        repetition_penalty (float): > 0; HF's rule over prompt and generated tokens (1.0 = off).
        stop_tokens (Optional[Sequence[int]]): a request ends after producing one of them (included).
        seed (int or per-request list): seeds the sampling; a per-request seed gives that request the
            same tokens alone or in any batch. None draws from the global RNG.
        pad_id (int): the id used for left padding (any valid id: pads are masked out).
        callback (Optional[Callable[[int, Tensor], None]]): called with (step, tokens [B]) as each
            step's tokens are chosen, for streaming. Finished requests show ``pad_id``.
        compile (bool): run the decode step through ``torch.compile`` (fullgraph, static shapes;
            CUDA graphs via ``mode="reduce-overhead"`` on GPU; single-threaded tiny kernels and a
            C++ wrapper on CPU). Compiled once per model; steps after a call's first one skip
            the guard checks.

    Returns:
        List[List[int]]: the new tokens of each request, up to and including its stop token.

    Raises:
        ValueError: for prompts that are not lists of integer ids (text, a flat list, floats), an
            empty prompt, ids outside the vocabulary, a temperature that is negative or not finite,
            top_p outside (0, 1], top_k or max_new_tokens not an integer >= 1,
            repetition_penalty <= 0, or a batch larger than the caches already set up.
    """
    vocab_size = model.tok_embeddings.num_embeddings
    _check_arguments(prompts, vocab_size, max_new_tokens, temperature, top_k, top_p, repetition_penalty, pad_id)
    device = model.tok_embeddings.weight.device
    batch_size, prompt_len = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((batch_size, prompt_len), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros(batch_size, prompt_len, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        prompt_mask[row, prompt_len - len(prompt):] = True
    total_len = prompt_len + max_new_tokens
    generators = _generators(seed, batch_size, device)
    stop = torch.tensor(list(stop_tokens or []), dtype=torch.long, device=device)

    with prepared_caches(model, batch_size, total_len):
        softmax = [layer for layer in model.layers if not is_linear_layer(layer)]
        hybrid = HybridInputs(prompt_mask, max_new_tokens, softmax[0].attn.kv_cache.k_cache.shape[2]) if softmax else None
        prefill_kwargs = hybrid.prefill() if hybrid else {}
        logits = model(tokens, padding_mask=prompt_mask, logits_to_keep=1, **prefill_kwargs)[:, -1]
        step_fn = _decode_step(model, compile)
        # Pads scatter into an extra column, so a pad id that is also a real token never collides.
        seen = torch.zeros(batch_size, vocab_size + 1, dtype=torch.bool, device=device)
        seen = seen.scatter_(1, tokens.masked_fill(~prompt_mask, vocab_size), True)[:, :vocab_size]
        done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        outputs = []
        for step in range(max_new_tokens):
            scores = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
            next_tokens = sample_next(scores, temperature=temperature, top_k=top_k, top_p=top_p, generators=generators)
            next_tokens = torch.where(done, torch.full_like(next_tokens, pad_id), next_tokens)
            outputs.append(next_tokens)
            seen.scatter_(1, next_tokens[:, None], True)
            if callback is not None:
                callback(step, next_tokens)
            if len(stop):
                done |= torch.isin(next_tokens, stop)
                # The one host synchronization per step, and only when stop tokens are in play.
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                decode_kwargs = hybrid.decode(step) if hybrid else {}
                with _skipping_guards(compile and step > 0):
                    logits = step_fn(next_tokens[:, None], **decode_kwargs)[:, -1]
    generated = torch.stack(outputs, dim=1).tolist()
    return [_cut_at_stop(row, set(stop.tolist())) for row in generated]


class HybridInputs:
    """Masks and positions that torchtune's softmax layers (with KV caches) need in a hybrid model.

    Args:
        prompt_mask (torch.Tensor): [B, T] bool, True for real prompt tokens.
        max_new_tokens (int): decode steps to come.
        cache_len (int): the KV caches' length (masks span all of it).
    """

    def __init__(self, prompt_mask: torch.Tensor, max_new_tokens: int, cache_len: int) -> None:
        self.prompt_len = prompt_mask.shape[1]
        full = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], max_new_tokens)], dim=1)
        self.masks = get_causal_mask_from_padding_mask(full, target_seq_len=cache_len)
        self.positions = get_position_ids_from_padding_mask(full)

    def prefill(self) -> dict:
        return {"mask": self.masks[:, : self.prompt_len], "input_pos": self.positions[:, : self.prompt_len]}

    def decode(self, step: int) -> dict:
        """Inputs for the token chosen at ``step`` (it sits at position prompt_len + step)."""
        at = self.prompt_len + step
        return {"mask": self.masks[:, at : at + 1], "input_pos": self.positions[:, at : at + 1]}


@contextlib.contextmanager
def prepared_caches(model: nn.Module, batch_size: int, total_len: int) -> Iterator[None]:
    """Empty caches for ``batch_size`` sequences of up to ``total_len`` tokens, in eval mode, for the
    duration of a ``with`` block; afterwards the model is as it was (caches deleted or reset, its
    train/eval mode restored).

    Raises:
        ValueError: if existing caches are too small for the batch or (softmax layers) the length.
    """
    was_training = model.training
    had_caches = model.caches_are_setup()
    if had_caches:
        _check_cache_capacity(model, batch_size, total_len)
        model.reset_caches()
    else:
        dtype = next(model.parameters()).dtype
        model.setup_caches(batch_size=batch_size, dtype=dtype, decoder_max_seq_len=total_len)
    model.eval()
    try:
        yield
    finally:
        if had_caches:
            model.reset_caches()
        else:
            delete_kv_caches(model)
        model.train(was_training)


def _check_cache_capacity(model: nn.Module, batch_size: int, total_len: int) -> None:
    for i, layer in enumerate(model.layers):
        cache = layer.attn.kv_cache
        capacity = cache.batch_size if is_linear_layer(layer) else cache.k_cache.shape[0]
        if batch_size > capacity:
            raise ValueError(
                f"a batch of {batch_size} prompts exceeds the caches set up for {capacity} sequences (layer {i}); "
                "delete them (torchtune.modules.common_utils.delete_kv_caches) or set them up again"
            )
        if not is_linear_layer(layer) and (batch_size != capacity or total_len > cache.k_cache.shape[2]):
            raise ValueError(
                f"layer {i} is softmax attention with a KV cache of batch {capacity} and {cache.k_cache.shape[2]} "
                f"tokens; this call needs batch {batch_size} and {total_len} tokens"
            )


def _decode_step(model: nn.Module, compile: bool) -> Callable[..., torch.Tensor]:
    if not compile:
        return model
    if model not in _COMPILED:
        if next(model.parameters()).is_cuda:
            _COMPILED[model] = torch.compile(model, fullgraph=True, dynamic=False, mode="reduce-overhead")
        else:
            _COMPILED[model] = torch.compile(model, fullgraph=True, dynamic=False, options=_CPU_COMPILE_OPTIONS)
    return _COMPILED[model]


def _skipping_guards(skip: bool) -> contextlib.AbstractContextManager:
    """Skips the compiled step's guard checks (a large share of a small step's overhead) after the
    first step of a generate call: the model, its caches and every input shape stay as that first
    step checked them until the loop ends. Guards that choose between compiled variants still run."""
    if not skip:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def _generators(seed, batch_size: int, device: torch.device) -> Optional[List[Optional[torch.Generator]]]:
    if seed is None:
        return None
    seeds = [seed + row for row in range(batch_size)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch_size:
        raise ValueError(f"seed must be an int or one seed per prompt ({batch_size}); got {len(seeds)}")
    return [None if s is None else torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _cut_at_stop(tokens: List[int], stop: set) -> List[int]:
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[: i + 1]
    return tokens


def _is_int(value) -> bool:
    """A Python or NumPy integer, or a 0-d integer tensor; never a bool or a float."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_arguments(prompts, vocab_size, max_new_tokens, temperature, top_k, top_p, repetition_penalty, pad_id) -> None:
    if isinstance(prompts, (str, bytes)):
        raise ValueError(f"prompts must be token ids, one list per prompt; got the text {prompts[:40]!r}: encode it "
                         "with the tokenizer and pass [ids]")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt (a list of token ids)")
    for i, prompt in enumerate(prompts):
        if _is_int(prompt) or isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
            raise ValueError(f"prompts must be a list of prompts, each a list of token ids; prompt {i} is {prompt!r}: "
                             "wrap a single prompt as [ids]")
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        not_ids = [t for t in prompt if not _is_int(t)]
        if not_ids:
            raise ValueError(f"prompt {i} holds values that are not integer token ids: {not_ids[:5]} (floats are "
                             "not truncated: pass ints)")
        bad = [int(t) for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if not _is_int(pad_id) or not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id must be an integer in the vocabulary [0, {vocab_size}); got {pad_id!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    if not _is_real(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None); got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (or None); got {top_p!r}")
    if not _is_real(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = off); got {repetition_penalty!r}")
