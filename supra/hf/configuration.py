"""Hugging Face configs: ``openlm`` folders (TRI-ML/mistral-supra) and supra's own exported folders."""

import copy
from typing import Any, Dict, Optional

from torch import nn
from torchtune.modules import TiedLinear
from transformers import PretrainedConfig


class OpenLMConfig(PretrainedConfig):
    """The ``config.json`` of an HF "openlm" folder (model_type ``"openlm"``, as TRI-ML/mistral-supra ships).

    open_lm's keys (``dim``, ``n_layers``, ``n_heads``, ``n_heads_kv``, ``vocab_size``, ``norm_type``,
    ``use_decay``, ...; see "The published checkpoint layout" in docs/method.md) are kept as
    written, so a folder saved by the reference loads unchanged. The usual transformers names (``hidden_size``, ``num_hidden_layers``,
    ...) read the open_lm keys. Which values supra supports is checked where the model is built
    (``supra.checkpoint.openlm.normalize_openlm_config``).

    Args:
        **kwargs: open_lm keys and transformers' common config arguments (``bos_token_id``, ...).
    """

    model_type = "openlm"
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_heads_kv",
        "max_position_embeddings": "seq_len",
        "intermediate_size": "intermediate_dim_ffn",
    }

    def __init__(self, **kwargs: Any) -> None:
        # open_lm names it weight_tying; transformers reads tie_word_embeddings (default True in 4.x).
        kwargs.setdefault("tie_word_embeddings", bool(kwargs.get("weight_tying", False)))
        super().__init__(**kwargs)


class SupraConfig(PretrainedConfig):
    """The ``config.json`` that ``save_pretrained`` writes (model_type ``"supra"``).

    The model is described by ``supra_spec``, supra's build record (the ``supra.models`` builder,
    its arguments and the ``linearize`` calls that followed; the same record as the folder's
    ``supra_config.json``). The common transformers fields are filled from the model for tools that
    read them; building ignores them.

    Args:
        supra_spec (Optional[Dict[str, Any]]): the build record; None only for an empty default config.
        **kwargs: transformers' common config arguments (``bos_token_id``, ``vocab_size``, ...).
    """

    model_type = "supra"

    def __init__(self, supra_spec: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        self.supra_spec = supra_spec
        super().__init__(**kwargs)

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> "SupraConfig":
        """The config of a supra model (a ``SupraDecoder`` built by ``supra.models`` or loaded by
        ``supra.checkpoint.load_checkpoint``), plus ``kwargs`` (e.g. token ids).

        Raises:
            ValueError: if the model has no build record.
        """
        spec = getattr(model, "supra_spec", None)
        if spec is None:
            raise ValueError(
                "this model has no build record (supra_spec): build it with a supra.models builder or "
                "supra.checkpoint.load_checkpoint so that its config can rebuild it"
            )
        attn = model.layers[0].attn
        common = dict(
            vocab_size=model.tok_embeddings.num_embeddings,
            hidden_size=model.tok_embeddings.embedding_dim,
            num_hidden_layers=len(model.layers),
            num_attention_heads=attn.num_heads,
            num_key_value_heads=attn.num_kv_heads,
            max_position_embeddings=model.max_seq_len,
            tie_word_embeddings=isinstance(model.output, TiedLinear),
        )
        common.update(kwargs)
        return cls(supra_spec=copy.deepcopy(spec), **common)
