"""Hugging Face transformers interop: ``import supra.hf`` and ``AutoModelForCausalLM`` loads SUPRA folders.

Importing this package registers, with transformers' Auto classes:

- model_type ``"openlm"`` (HF "openlm" folders such as TRI-ML/mistral-supra, unchanged):
  ``OpenLMConfig`` / ``OpenLMForCausalLM``;
- model_type ``"supra"`` (folders written by ``save_pretrained``): ``SupraConfig`` / ``SupraForCausalLM``;
- for both, ``AutoTokenizer`` falls back to the folder's ``tokenizer.json`` when its
  ``tokenizer_config.json`` names no tokenizer class.

Needs the ``hf`` extra: ``pip install "supra-lm[hf]"``. See docs/huggingface.md.
"""

try:
    import transformers
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('supra.hf needs transformers: pip install "supra-lm[hf]"') from error

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from supra.hf.cache import GrowingKVCache, SupraCache
from supra.hf.configuration import OpenLMConfig, SupraConfig
from supra.hf.modeling import OpenLMForCausalLM, SupraForCausalLM


def _register() -> None:
    for config_class, model_class in ((OpenLMConfig, OpenLMForCausalLM), (SupraConfig, SupraForCausalLM)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
        AutoTokenizer.register(config_class, fast_tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)


_register()

__all__ = ["GrowingKVCache", "OpenLMConfig", "OpenLMForCausalLM", "SupraCache", "SupraConfig", "SupraForCausalLM"]
