"""transformers causal LMs backed by a supra decoder: parallel forward, recurrent generate,
``from_pretrained`` through supra's loader, ``save_pretrained`` in supra's own format."""

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn
from torchtune.generation import get_position_ids_from_padding_mask
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

import supra.models
from supra.checkpoint import build_from_spec, detect_format, load_checkpoint, save_checkpoint
from supra.checkpoint.openlm import normalize_openlm_config, openlm_decoder_kwargs
from supra.hf import _loading
from supra.hf.cache import SupraCache, lent_states
from supra.hf.configuration import OpenLMConfig, SupraConfig

# transformers 5 names the output's cache field ``cache``, 4.x ``past_key_values``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# forward() keyword arguments handed to transformers' loss function (Trainer passes num_items_in_batch).
_LOSS_ARGUMENTS = ("num_items_in_batch", "ignore_index", "shift_labels")
# generate() arguments that turn on speculative decoding (drafts verified, rejected ones rolled back).
_SPECULATIVE_ARGUMENTS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


class SupraForCausalLM(PreTrainedModel, GenerationMixin):
    """A supra model (``supra.modules.SupraDecoder``: all-SUPRA or hybrid) as a transformers causal LM.

    ``model(input_ids, attention_mask=...)`` runs one parallel (chunked) forward; ``generate``
    prefills the prompt in one chunked pass into a ``SupraCache`` and then decodes one recurrent
    step per token. Left padding only: a SUPRA layer's state must not see pads after real tokens.

    Args:
        config (SupraConfig): the config; its ``supra_spec`` builds the decoder when none is given.
        decoder (Optional[nn.Module]): an existing supra decoder to wrap (its weights are kept).
    """

    config_class = SupraConfig
    base_model_prefix = "model"
    # The recurrent state cannot be rolled back: transformers refuses assisted decoding clearly.
    _is_stateful = True
    # The decoder ties its embeddings itself (torchtune's TiedLinear); transformers has nothing to tie.
    _tied_weights_keys = None
    _checkpoint_format = "supra"

    def __init__(self, config: SupraConfig, decoder: Optional[nn.Module] = None) -> None:
        super().__init__(config)
        self.model = decoder if decoder is not None else self._build_decoder(config)
        self.post_init()

    @classmethod
    def from_decoder(cls, decoder: nn.Module, **config: Any) -> "SupraForCausalLM":
        """Wraps a supra decoder (built by ``supra.models`` or ``supra.checkpoint.load_checkpoint``),
        keeping its weights and train/eval mode.

        Args:
            decoder (nn.Module): the ``SupraDecoder``.
            **config: further config attributes (``eos_token_id``, ...).
        """
        return cls(SupraConfig.from_model(decoder, **config), decoder=decoder).train(decoder.training)

    @classmethod
    def _build_decoder(cls, config: SupraConfig) -> nn.Module:
        if not config.supra_spec:
            raise ValueError(
                "SupraConfig has no supra_spec to build a model from: use SupraConfig.from_model(model) "
                "or a config.json written by save_pretrained"
            )
        return build_from_spec(config.supra_spec, source="SupraConfig.supra_spec")

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to do: supra's builders initialize new models, checkpoints fill loaded ones."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate must not make a DynamicCache: forward makes a SupraCache when use_cache is on.
        return False

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_embeddings

    def get_output_embeddings(self) -> Optional[nn.Module]:
        """The output projection; None when it is tied to the input embeddings."""
        output = self.model.output
        return output if isinstance(output, nn.Module) else None

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        cache_position: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Union[CausalLMOutputWithPast, Tuple]:
        """
        Args:
            input_ids (torch.LongTensor): [B, T] token ids (only the new ones when a cache is passed).
            attention_mask (Optional[torch.Tensor]): [B, S] with 1 for real tokens and 0 for pads, pads on
                the left; S = T, or the whole sequence so far with a cache (its last T columns are used).
            position_ids (Optional[torch.LongTensor]): [B, T] (or longer: the last T are used) RoPE
                positions; by default each sequence counts its real tokens.
            cache (Optional[Cache]): a ``SupraCache`` to continue from and update (``past_key_values``
                is the transformers 4.x name). An empty transformers cache is replaced by a SupraCache.
            inputs_embeds: not supported (the decoder embeds its tokens).
            labels (Optional[torch.LongTensor]): [B, T] targets for the next-token loss, -100 ignored
                (transformers' causal LM loss: labels are shifted inside).
            use_cache (Optional[bool]): return a SupraCache holding the states after these tokens; by
                default only when autograd is off (as in ``generate``): a training forward needs no
                state, and states updated in place would chain successive forwards into one graph.
            output_attentions: not supported (linear attention forms no attention matrix).
            output_hidden_states (Optional[bool]): also return the embeddings, each layer's output and
                the normalized last one (transformers' convention), each [B, T, D].
            return_dict (Optional[bool]): a ``CausalLMOutputWithPast`` (default) or a tuple.
            logits_to_keep (Union[int, torch.Tensor]): only the last k positions' logits (0: all), or
                those at the given indices.
            cache_position: ignored (transformers 4.x passes it; positions come from the cache).
            token_type_ids: ignored (generic tokenizers return them; the model has no segment embeddings).
            **kwargs: ``num_items_in_batch``, ``ignore_index``, ``shift_labels`` for the loss; others
                (transformers' generate passes some, such as ``tokenizer``) are ignored.

        Returns:
            CausalLMOutputWithPast: ``loss`` (with labels), ``logits`` [B, T or kept, V] float32,
            the cache (with ``use_cache``), ``hidden_states``.

        Raises:
            ValueError: for inputs_embeds, output_attentions, right padding, a mask of the wrong
                shape, labels with logits_to_keep, or a foreign non-empty cache.
        """
        _check_unsupported(input_ids, inputs_embeds, output_attentions, labels, logits_to_keep)
        batch_size, num_tokens = input_ids.shape
        cache = self._resolve_cache(cache, past_key_values, use_cache)
        if cache is not None and not cache.is_initialized:
            cache.allocate(self.model, batch_size)
        if cache is not None and cache.batch_size != batch_size:
            raise ValueError(
                f"the cache holds {cache.batch_size} sequences but input_ids has {batch_size} rows; "
                "pass one row per cached sequence, or a new cache"
            )
        chunk_mask = _chunk_padding_mask(attention_mask, num_tokens, cached=cache is not None and cache.seen_tokens > 0)
        decoder_inputs = _decoder_inputs(cache, chunk_mask, position_ids, num_tokens)
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))

        # The decoder skips the vocabulary projection of the positions not kept; hidden states need
        # the final norm of every position, so with them the logits are sliced afterwards.
        native_keep = logits_to_keep if isinstance(logits_to_keep, int) and not output_hidden_states else 0
        attns = [layer.attn for layer in self.model.layers]
        states = cache.layers if cache is not None else [None] * len(attns)
        with lent_states(attns, states), _hidden_states(self.model, output_hidden_states) as normed:
            out = self.model(input_ids, logits_to_keep=native_keep, **decoder_inputs)
        if cache is not None:
            cache.advance(chunk_mask, num_tokens)
        hidden_states, logits = (tuple(out[:-1]) + tuple(normed), out[-1]) if output_hidden_states else (None, out)
        if not native_keep:
            logits = _keep_positions(logits, logits_to_keep)

        loss = None
        if labels is not None:
            loss_arguments = {key: value for key, value in kwargs.items() if key in _LOSS_ARGUMENTS}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **loss_arguments)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states, **{_CACHE_FIELD: cache})
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' ``generate``, taking a cache as ``past_key_values`` or ``cache`` whatever
        the transformers version (it renamed the argument in 5.2x).

        Raises:
            ValueError: if both names are given, or for assisted / prompt-lookup decoding.
        """
        # Speculative decoding rolls rejected draft tokens back; a recurrent state cannot be rolled
        # back (transformers' own check of this moved between releases, so it is made here).
        speculative = sorted(name for name in _SPECULATIVE_ARGUMENTS if kwargs.get(name) is not None)
        if speculative:
            raise ValueError(
                f"{speculative}: assisted and prompt-lookup decoding need a cache that can drop rejected "
                "draft tokens; a SUPRA model's recurrent state is stateful and cannot be rolled back"
            )
        other = "past_key_values" if _CACHE_FIELD == "cache" else "cache"
        if other in kwargs:
            if _CACHE_FIELD in kwargs:
                raise ValueError("pass the cache as cache or past_key_values, not both")
            kwargs[_CACHE_FIELD] = kwargs.pop(other)
        return super().generate(*args, **kwargs)

    def _resolve_cache(self, cache, past_key_values, use_cache) -> Optional[SupraCache]:
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as cache or past_key_values, not both")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, SupraCache):
            if not (isinstance(cache, Cache) and cache.get_seq_length() == 0):
                raise ValueError(
                    f"a {type(cache).__name__} cannot hold a SUPRA model's recurrent states; pass a "
                    "supra.hf.SupraCache (or None: the model makes one)"
                )
            cache = SupraCache()
        if use_cache is None:
            # Training forwards need no state; generate runs under no_grad.
            use_cache = bool(getattr(self.config, "use_cache", True)) and not torch.is_grad_enabled()
        if cache is None and use_cache:
            cache = SupraCache()
        return cache

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, Path],
        *model_args: Any,
        config: Optional[Any] = None,
        dtype: Any = None,
        torch_dtype: Any = None,
        device_map: Any = None,
        subfolder: str = "",
        **kwargs: Any,
    ) -> "SupraForCausalLM":
        """Loads a folder (or hub repository) through ``supra.checkpoint.load_checkpoint``.

        ``SupraForCausalLM`` loads folders written by ``save_pretrained`` (or, without config.json,
        by ``supra.checkpoint.save_checkpoint``); ``OpenLMForCausalLM`` loads HF "openlm" folders
        such as TRI-ML/mistral-supra. ``AutoModelForCausalLM`` picks the class from config.json
        once ``supra.hf`` is imported.

        Args:
            pretrained_model_name_or_path: a local folder or a hub repo id.
            config: the config to use instead of the folder's config.json.
            dtype / torch_dtype: a dtype (or its name) casts; ``"auto"`` or None takes the config's
                ``dtype`` if it names one, else keeps the stored dtypes.
            device_map: one device (``"cuda"``, ``"cpu"``, an index) or ``"auto"`` (the GPU if any).
            subfolder (str): a folder inside the repository.
            **kwargs: hub and download options (``revision``, ``cache_dir``, ``token``,
                ``local_files_only``, ``proxies``, ...: whatever transformers passes), config
                attributes to override, and ``generation_config``. Unknown names are ignored with a
                warning; options that would change the result if ignored are refused.

        Returns:
            SupraForCausalLM: the model, in eval mode, with the folder's generation_config.json if any.

        Raises:
            ValueError: for a folder of another format, an option supra cannot honour
                (quantization, adapters, another attention implementation, ...), or what
                ``load_checkpoint`` rejects (each error names the culprit).
        """
        if model_args:
            raise ValueError(f"from_pretrained takes no positional model arguments; got {len(model_args)}")
        hub = {key: kwargs.pop(key) for key in _loading.IGNORED_LOAD_ARGUMENTS if key in kwargs}
        folder = _loading.local_folder(pretrained_model_name_or_path, subfolder, **hub)
        fmt = detect_format(folder)
        if fmt != cls._checkpoint_format:
            raise ValueError(
                f"{folder} is a {fmt!r} checkpoint; {cls.__name__} loads {cls._checkpoint_format!r} folders. "
                "AutoModelForCausalLM picks the class from config.json (after `import supra.hf`); softmax "
                "(hf) folders need converting first: supra convert --linearize"
            )
        if config is None and (folder / "config.json").exists():
            config = cls.config_class.from_pretrained(folder)
        generation_config = kwargs.pop("generation_config", None)
        overrides = _loading.config_overrides(config, kwargs)
        dtype = _loading.load_dtype(dtype, torch_dtype, config)
        decoder = load_checkpoint(folder, dtype=dtype, device=_loading.load_device(device_map))
        # A folder from supra.checkpoint.save_checkpoint (or `supra convert`) has no config.json.
        config = config if config is not None else SupraConfig.from_model(decoder)
        for name, value in overrides.items():
            setattr(config, name, value)
        model = cls(config, decoder=decoder)
        model.name_or_path = model.config.name_or_path = str(pretrained_model_name_or_path)
        if generation_config is not None:
            model.generation_config = generation_config
        elif (folder / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model.eval()

    def save_pretrained(
        self,
        save_directory: Union[str, Path],
        is_main_process: bool = True,
        state_dict: Optional[dict] = None,
        max_shard_size: Union[int, str] = "5GB",
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        variant: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Writes supra's own folder format (safetensors weights + ``supra_config.json``, see
        ``supra.checkpoint.save_checkpoint``) plus config.json (model_type ``"supra"``) and
        generation_config.json, which ``AutoModelForCausalLM.from_pretrained`` reloads.

        Other files in the folder (a tokenizer saved there) are kept; weights of an earlier save are
        replaced.

        Args:
            save_directory: the folder (created if needed).
            is_main_process (bool): only the main process writes.
            state_dict (Optional[dict]): tensors to save instead of the model's (names as in this
                model's ``state_dict()``, e.g. gathered from FSDP shards).
            max_shard_size: shard the weights above this size ("5GB", "500MB" or bytes).
            safe_serialization (bool): must be True (safetensors only).
            push_to_hub (bool): must be False (upload the folder with huggingface_hub).
            variant (Optional[str]): must be None (a supra folder holds one set of weights).
            **kwargs: other options transformers passes (``token``, ``save_peft_format``, ...):
                ignored, with a warning naming them.

        Raises:
            ValueError: for pickle serialization, push_to_hub or a weight variant.
        """
        if not safe_serialization:
            raise ValueError("supra folders are written with safetensors only: leave safe_serialization=True")
        if push_to_hub:
            raise ValueError("push_to_hub is not supported: save the folder, then huggingface_hub.upload_folder(...)")
        if variant is not None:
            raise ValueError(f"variant={variant!r}: supra folders hold one set of weights; save to another folder instead")
        if kwargs:
            _loading.logger.warning("save_pretrained: ignoring %s (supra writes its own format)", sorted(kwargs))
        if not is_main_process:
            return
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        prefix = self.base_model_prefix + "."
        tensors = None if state_dict is None else {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
        # Written beside the folder's other files, then moved in: a failed save leaves old weights whole.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".save-") as scratch:
            written = save_checkpoint(self.model, Path(scratch) / "weights", state_dict=tensors, max_shard_size=max_shard_size)
            _loading.remove_stale_weights(folder)
            for path in written.iterdir():
                path.replace(folder / path.name)
        self._config_to_save().save_pretrained(folder)
        self.generation_config.save_pretrained(folder)

    def _config_to_save(self) -> SupraConfig:
        """This model's config, its build record brought up to date."""
        config = copy.deepcopy(self.config)
        config.supra_spec = copy.deepcopy(self.model.supra_spec)
        config.architectures = [SupraForCausalLM.__name__]
        return config


class OpenLMForCausalLM(SupraForCausalLM):
    """``SupraForCausalLM`` for HF "openlm" folders (TRI-ML/mistral-supra): the config is the
    folder's open_lm config.json, the weights load through supra's openlm key map.

    ``save_pretrained`` writes supra's own format (a ``"supra"`` config.json); to write the
    reference's layout use ``supra.checkpoint.export_openlm(model.model, folder)``.
    """

    config_class = OpenLMConfig
    _checkpoint_format = "openlm"

    @classmethod
    def _build_decoder(cls, config: OpenLMConfig) -> nn.Module:
        return supra.models.supra_decoder(**openlm_decoder_kwargs(normalize_openlm_config(config.to_dict())))

    def _config_to_save(self) -> SupraConfig:
        names = ("bos_token_id", "eos_token_id", "pad_token_id")
        tokens = {name: getattr(self.config, name) for name in names if getattr(self.config, name, None) is not None}
        return SupraConfig.from_model(self.model, architectures=[SupraForCausalLM.__name__], **tokens)


def _check_unsupported(input_ids, inputs_embeds, output_attentions, labels, logits_to_keep) -> None:
    if inputs_embeds is not None:
        raise ValueError("inputs_embeds is not supported: pass input_ids (the decoder embeds its tokens)")
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor of token ids; got {None if input_ids is None else list(input_ids.shape)}")
    if output_attentions:
        raise ValueError("output_attentions is not supported: linear attention forms no attention matrix")
    if isinstance(logits_to_keep, int) and logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be >= 0 (0 keeps every position) or a tensor of positions; got {logits_to_keep}")
    if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("labels need the logits of every position: leave logits_to_keep=0")


def _chunk_padding_mask(attention_mask: Optional[torch.Tensor], num_tokens: int, cached: bool) -> Optional[torch.Tensor]:
    """The padding mask [B, T] bool of the T new tokens, or None when they are all real.

    Raises:
        ValueError: for a mask that is not [B, S] with S = T (S >= T with a cache), or right padding.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < num_tokens or (not cached and attention_mask.shape[1] != num_tokens):
        raise ValueError(
            f"attention_mask must be a 2-D padding mask [B, S] (1 = real token) covering the {num_tokens} input "
            f"tokens (S = {num_tokens}, or the whole sequence so far with a filled cache); got {list(attention_mask.shape)}"
        )
    mask = attention_mask[:, -num_tokens:].bool()
    if bool(mask.all()):
        return None
    if num_tokens > 1 and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "attention_mask has pads after real tokens (right padding); SUPRA models need left padding: "
            "set tokenizer.padding_side = 'left' (a pad after real tokens would decay the recurrent state)"
        )
    return mask


def _decoder_inputs(cache: Optional[SupraCache], chunk_mask, position_ids, num_tokens: int) -> dict:
    """Keyword arguments of ``SupraDecoder.forward`` for T new tokens."""
    inputs = {"padding_mask": chunk_mask}
    if position_ids is not None:
        inputs["input_pos"] = position_ids[..., -num_tokens:]
    if cache is not None and cache.padding is not None:
        # Softmax layers of a hybrid: mask over the KV cache, positions continuing each sequence's count.
        chunk = chunk_mask if chunk_mask is not None else cache.padding.new_ones(cache.padding.shape[0], num_tokens)
        inputs["mask"] = _softmax_mask(cache.padding, chunk)
        inputs.setdefault("input_pos", cache.positions[:, None] + get_position_ids_from_padding_mask(chunk))
    return inputs


def _softmax_mask(past: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """[B, T, S + T] bool: new token i (at S + i) sees the real tokens at or before it.

    Args:
        past (torch.Tensor): [B, S] padding mask of the cached tokens.
        chunk (torch.Tensor): [B, T] padding mask of the new ones.
    """
    keys = torch.cat([past, chunk], dim=1)
    seen, new = past.shape[1], chunk.shape[1]
    key_at = torch.arange(seen + new, device=keys.device)[None, :]
    query_at = torch.arange(seen, seen + new, device=keys.device)[:, None]
    # A pad query that sees no real key would give NaN: let it see itself.
    return ((key_at <= query_at)[None] & keys[:, None, :]) | (key_at == query_at)[None]


def _keep_positions(values: torch.Tensor, logits_to_keep: Union[int, torch.Tensor]) -> torch.Tensor:
    """[B, T, ...] -> the last ``logits_to_keep`` positions (0: all), or those at the given indices."""
    if isinstance(logits_to_keep, int):
        return values[:, -logits_to_keep:] if logits_to_keep else values
    return values[:, logits_to_keep.to(values.device)]


@contextlib.contextmanager
def _hidden_states(decoder: nn.Module, wanted: bool) -> Iterator[List[torch.Tensor]]:
    """With ``wanted``, the decoder returns every layer's input during the block, and the yielded
    list receives the output of its final norm (transformers' last hidden state)."""
    normed: List[torch.Tensor] = []
    if not wanted:
        yield normed
        return
    saved = decoder.output_hidden_states
    decoder.output_hidden_states = list(range(len(decoder.layers)))
    handle = decoder.norm.register_forward_hook(lambda module, args, output: normed.append(output))
    try:
        yield normed
    finally:
        handle.remove()
        decoder.output_hidden_states = saved
