"""lm-evaluation-harness adapter: any checkpoint ``load_checkpoint`` reads, as lm-eval model ``supra``.

Log-likelihoods come from parallel forwards over right-padded batches (``supra.eval.scoring``);
generation uses ``supra.generation.generate`` (one chunked prefill, then recurrent decode).
Importing this module registers the model under the name ``supra``::

    import supra.eval.harness  # noqa: F401  (registers "supra")
    lm_eval.simple_evaluate(model="supra", model_args="checkpoint=ckpt,tokenizer=bytes", tasks=[...])

The ``lm_eval`` command cannot discover models outside its package (0.4.x reads no entry
points), so ``python -m supra.eval`` is that command with ``supra`` registered.
"""

import inspect
import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from torch import nn
from torchtune.generation import generate as torchtune_generate
from tqdm import tqdm

from supra.data.python_docs import ByteTokenizer
from supra.loading import (
    default_add_bos,
    load_model,
    resolve_checkpoint,
    resolve_device,
    resolve_dtype,
    resolve_tokenizer,
)
from supra.eval.scoring import is_recurrent, score_continuations
from supra.generation import generate
from supra.modules import SupraDecoder

logger = logging.getLogger(__name__)

MODEL_NAME = "supra"
# Generation options lm-eval tasks pass that ``generate`` takes under the same name.
SAMPLING_OPTIONS = ("top_k", "top_p", "repetition_penalty")


def _as_int(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer; got {value!r}") from None


class SupraLM(TemplateLM):
    """A supra model and its tokenizer as an lm-eval ``TemplateLM``.

    Args:
        checkpoint (Optional[str]): a folder or file ``load_checkpoint`` reads, or an uptrain
            ``output_dir`` (its latest checkpoint). Give this or ``model``.
        model (Optional[nn.Module]): an already built decoder (``model(tokens)`` -> logits
            [B, T, V]): a ``SupraDecoder`` or a plain torchtune softmax ``TransformerDecoder``.
        tokenizer: ``"bytes"``, a tokenizer path, a tokenizer object (``encode``/``decode``/
            ``eos_id``/``bos_id``), or None: the tokenizer files inside ``checkpoint``.
        batch_size (int): sequences per forward (scoring and generation).
        device (str): ``auto`` (CUDA when available), ``cpu``, ``cuda:0``, ...
        dtype (Optional[str]): ``bf16``, ``fp16``, ``fp32``; None or ``auto`` keeps the stored dtype.
        max_length (Optional[int]): longest context, left-truncated beyond it. Default: the
            model's ``max_seq_len`` when it has softmax layers; unbounded for all-linear models
            (their state does not grow), so rolling log-likelihoods score each document whole.
        max_gen_toks (int): new tokens per generation request when the task does not say.
        add_bos (Optional[bool]): prepend BOS to every context. Default: when the tokenizer
            itself would, as lm-eval's ``hf`` model leaves it to the tokenizer (a GGUF file's
            ``add_bos_token``, an HF ``tokenizer.json``'s post-processor; a bare sentencepiece
            model adds BOS, the byte tokenizer none): see ``supra.loading.default_add_bos``.
        chunk_size (Optional[int]): all-linear models score sequences longer than this in chunks
            that carry the recurrent state (memory of one chunk's logits).
        linearize (Optional[bool]): load a softmax (hf) checkpoint as a freshly linearized model.
        max_batch_size: accepted (lm-eval passes it) and ignored.

    Raises:
        ValueError: for a missing or unloadable checkpoint, both or neither of ``checkpoint`` and
            ``model``, a tokenizer without EOS or with more ids than the model's vocabulary,
            unknown arguments, or a non-integer ``batch_size``.
    """

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        model: Optional[nn.Module] = None,
        tokenizer: Any = None,
        batch_size: Union[int, str] = 8,
        device: Optional[str] = "auto",
        dtype: Optional[str] = None,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        add_bos: Optional[bool] = None,
        chunk_size: Optional[int] = 4096,
        linearize: Optional[bool] = None,
        max_batch_size: Optional[int] = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            valid = [name for name in inspect.signature(SupraLM).parameters if name != "unknown"]
            raise ValueError(f"unknown supra model argument(s) {sorted(unknown)}; valid: {valid}")
        if (checkpoint is None) == (model is None):
            raise ValueError("give exactly one of checkpoint= (a path) and model= (a module)")
        # Everything cheap is checked before a model that may take minutes to load.
        if str(batch_size).startswith("auto"):
            raise ValueError(f"batch_size={batch_size!r}: automatic batch sizes are not supported; pass a number")
        self.batch_size = _as_int("batch_size", batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        self._max_length = None if max_length is None else _as_int("max_length", max_length)
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.chunk_size = None if chunk_size is None else _as_int("chunk_size", chunk_size)
        self._device = resolve_device(device)
        folder = None if checkpoint is None else resolve_checkpoint(checkpoint)
        named = tokenizer is None or isinstance(tokenizer, str)
        self.tokenizer = resolve_tokenizer(tokenizer, folder) if named else tokenizer
        self.add_bos = default_add_bos(self.tokenizer, add_bos)
        if model is None:
            model = load_model(folder, dtype=resolve_dtype(dtype), device=self._device, linearize=linearize)
        else:
            model = model.to(device=self._device, dtype=resolve_dtype(dtype))
        self.model = model.eval()
        self._check_tokenizer()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[Dict[str, Any]] = None) -> "SupraLM":
        """``--model_args`` as a string (``checkpoint=...,dtype=bf16``); see ``create_from_arg_obj``."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: Dict[str, Any], additional_config: Optional[Dict[str, Any]] = None) -> "SupraLM":
        """The model from the user's ``model_args`` (strict: a misspelled name would silently change
        the scores) and lm-eval's own settings (``batch_size``, ``device``, ...; tolerant: a newer
        lm-eval may pass settings this adapter does not know, which are ignored with a warning)."""
        known = set(inspect.signature(cls).parameters) - {"unknown"}
        settings = {key: value for key, value in (additional_config or {}).items() if value is not None}
        ignored = sorted(set(settings) - known)
        if ignored:
            logger.warning("supra: ignoring lm-eval settings %s (not used by the supra model)", ignored)
        return cls(**{**arg_dict, **{key: value for key, value in settings.items() if key in known}})

    def _check_tokenizer(self) -> None:
        if getattr(self.tokenizer, "eos_id", None) is None:
            raise ValueError(f"tokenizer {self.tokenizer!r} has no EOS token: lm-eval needs one (end of text, empty contexts)")
        vocab = self.model.tok_embeddings.num_embeddings
        size = getattr(self.tokenizer, "vocab_size", None)
        if size is not None and size > vocab:
            raise ValueError(
                f"tokenizer {self.tokenizer!r} has {size} ids but the model's vocabulary has {vocab}: they do not "
                "belong together; set tokenizer= to the model's own tokenizer"
            )

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """Conditions the first scored token of an empty context (and of rolling windows): the
        tokenizer's BOS whenever it has one, as lm-eval's ``hf`` model does (even when BOS is not
        prepended to contexts), else EOS. The byte tokenizer conditions on EOS: supra's byte-level
        corpora carry no BOS, so a model trained on them has never seen it."""
        bos = getattr(self.tokenizer, "bos_id", None)
        if self.add_bos or (bos is not None and not isinstance(self.tokenizer, ByteTokenizer)):
            return bos
        return self.eot_token_id

    @property
    def max_length(self) -> Optional[int]:
        if self._max_length is not None:
            return self._max_length
        return None if is_recurrent(self.model) else self.model.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        """Fingerprints lm-eval's request caches: stable across runs (file digests, not addresses)."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return "bytes"
        return getattr(self.tokenizer, "fingerprint", None) or type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> List[int]:
        """Token ids of ``string``, after BOS when ``add_bos`` (or ``add_special_tokens=True``)."""
        ids = list(self.tokenizer.encode(string))
        bos = add_special_tokens if add_special_tokens is not None else self.add_bos
        return [self.tokenizer.bos_id, *ids] if bos else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _score(self, requests: Sequence[Tuple[Any, List[int], List[int]]], disable_tqdm: bool) -> List[Tuple[float, bool]]:
        sequences = []
        for _, context, continuation in requests:
            whole = list(context) + list(continuation)
            if self.max_length is not None:
                whole = whole[-(self.max_length + 1):]
            sequences.append((whole, min(len(continuation), len(whole) - 1)))
        return score_continuations(
            self.model, sequences, batch_size=self.batch_size, chunk_size=self.chunk_size,
            pad_id=self.eot_token_id, progress=not disable_tqdm,
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> List[Tuple[float, bool]]:
        """(summed log-probability, all tokens greedy) of each continuation given its context."""
        results = self._score(requests, disable_tqdm)
        for (pair, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Log-likelihood of whole documents (after ``prefix_token_id``), in ``max_length`` windows;
        one window when the context is unbounded."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            window = self.max_length or len(tokens) + 1
            pairs = lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, max_seq_len=window, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _generation_settings(self, gen_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """lm-eval's ``gen_kwargs`` as ``generate`` arguments plus the ``until`` strings."""
        options = dict(gen_kwargs)
        until = options.pop("until", None) or [self.tok_decode([self.eot_token_id])]
        settings = {
            "until": [until] if isinstance(until, str) else list(until),
            "max_new_tokens": _as_int("max_gen_toks", options.pop("max_gen_toks", self.max_gen_toks)),
            "temperature": float(options.pop("temperature", 0.0)),
        }
        if not options.pop("do_sample", False):
            settings["temperature"] = 0.0
        settings.update({name: options.pop(name) for name in SAMPLING_OPTIONS if name in options})
        if options:
            logger.warning("supra: ignoring generation options %s (supported: until, max_gen_toks, temperature, "
                           "do_sample, %s)", sorted(options), ", ".join(SAMPLING_OPTIONS))
        return settings

    def _prompt(self, context: str, max_new_tokens: int) -> List[int]:
        prompt = self.tok_encode(context) or [self.prefix_token_id]
        if self.max_length is not None:
            prompt = prompt[-max(1, self.max_length - max_new_tokens):]
        return prompt

    def _generate_batch(self, prompts: List[List[int]], settings: Dict[str, Any]) -> List[List[int]]:
        options = {k: v for k, v in settings.items() if k != "until"}
        if isinstance(self.model, SupraDecoder):
            return generate(self.model, prompts, stop_tokens=[self.eot_token_id], pad_id=self.eot_token_id, **options)
        # A plain torchtune decoder (a softmax teacher): torchtune's loop, one prompt at a time
        # (its batching treats pad_id as padding wherever it occurs).
        unsupported = sorted(set(options) - {"max_new_tokens", "temperature", "top_k"})
        if unsupported:
            raise ValueError(f"generation options {unsupported} need a SupraDecoder; this model is a {type(self.model).__name__}")
        outputs = []
        for prompt in prompts:
            tokens, _ = torchtune_generate(
                self.model, torch.tensor([prompt], device=self.device), max_generated_tokens=options["max_new_tokens"],
                temperature=options["temperature"], top_k=options.get("top_k"), stop_tokens=[self.eot_token_id],
                pad_id=self.eot_token_id,
            )
            new = tokens[0, len(prompt):].tolist()
            outputs.append(new[: new.index(self.eot_token_id) + 1] if self.eot_token_id in new else new)
        return outputs

    def _cut(self, tokens: List[int], until: List[str]) -> str:
        text = self.tok_decode([t for t in tokens if t != self.eot_token_id])
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy (or sampled, with ``do_sample``) continuations, cut before the first ``until`` string.

        Requests with the same options are batched, longest prompt first; each batch is one
        chunked prefill, then one recurrent step per new token.
        """
        groups: Dict[str, List[int]] = {}
        settings_of = [self._generation_settings(req.args[1]) for req in requests]
        for index, settings in enumerate(settings_of):
            groups.setdefault(json.dumps(settings, sort_keys=True), []).append(index)
        results: List[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm)
        for indices in groups.values():
            settings = settings_of[indices[0]]
            prompts = {i: self._prompt(requests[i].args[0], settings["max_new_tokens"]) for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for i, tokens in zip(batch, self._generate_batch([prompts[i] for i in batch], settings)):
                    results[i] = self._cut(tokens, settings["until"])
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(batch))
        bar.close()
        return results


def register() -> None:
    """Registers ``SupraLM`` as lm-eval model ``supra`` (idempotent).

    lm-eval fills its registry of built-in models only when the registry is empty, so those are
    loaded first; registering ``supra`` into an empty registry would hide ``hf`` and the rest.
    """
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    model_registry.register(MODEL_NAME, target=SupraLM)


register()
