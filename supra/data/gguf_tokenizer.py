"""The tokenizer a GGUF file stores (``tokenizer.ggml.*`` metadata), built with ``tokenizers``.

Two vocabulary kinds are read, the ones llama / mistral / qwen2 files carry:

- ``gpt2``: byte-level BPE (vocabulary + merges), as in SmolLM2, Qwen2 and Llama 3 files.
- ``llama``: a sentencepiece BPE vocabulary (pieces + scores, byte-fallback pieces ``<0xNN>``),
  as in Llama 2 and Mistral files. The merges are recovered from the scores: a pair merges with
  the score of the piece it makes, higher first.

The pipeline is the one transformers builds for ``AutoTokenizer.from_pretrained(folder,
gguf_file=name)``, so both give the same ids: control tokens (``<|im_start|>``) and user-defined
ones are matched whole in text; the splitting pattern before byte-level BPE follows
``tokenizer.ggml.pre`` for the Llama-3 and Qwen2 families and is GPT-2's otherwise. BOS, EOS,
``add_bos_token`` and the chat template are the file's own.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from supra.data._tokenizers import TokenizersBacked

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
VOCABULARIES = ("gpt2", "llama")
# llama.cpp's token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4
SPECIAL_ROLES = ("bos", "eos", "unknown", "padding")
# Sentencepiece vocabularies of these architectures need other pipelines (Gemma spells spaces
# differently, Phi-3 prepends its space with a normalizer); supra does not build them.
SENTENCEPIECE_UNSUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "phi3")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the pattern text is split with before byte-level BPE.
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Names whose split is GPT-2's, or gives GPT-2's ids: llama.cpp isolates digits first for
# "smollm", but no SmolLM token joins a digit to another character, so the ids are the same.
GPT2_SPLIT_NAMES = ("default", "gpt-2", "gpt2", "smollm")


def _byte_alphabet() -> Dict[int, str]:
    """GPT-2's byte -> character map, the alphabet byte-level vocabularies are spelled in:
    printable bytes stand for themselves, the others for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + i) for i, byte in enumerate(others)}}


def _merges(metadata: Dict[str, Any], source: Path) -> List[Tuple[str, str]]:
    if "tokenizer.ggml.merges" not in metadata:
        raise ValueError(f"{source}: its byte-level BPE vocabulary has no tokenizer.ggml.merges; the file is incomplete")
    pairs = []
    for merge in metadata["tokenizer.ggml.merges"]:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{source}: merge {merge!r} in tokenizer.ggml.merges is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    return pairs


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> List[Tuple[str, str]]:
    """BPE merges of a sentencepiece vocabulary: every split of a piece into two pieces of the
    vocabulary, ranked by the score of the piece (higher first; ties: longer left, then longer
    right part, then lower ids), as transformers recovers them."""
    ids = {token: index for index, token in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        splits = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in ids and piece[i:] in ids]
        merges.extend(sorted(splits, key=lambda split: (ids[split[0]], ids[split[1]])))
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def build_gguf_tokenizer(metadata: Dict[str, Any], source: Path):
    """A ``tokenizers.Tokenizer`` for a GGUF file's ``tokenizer.ggml.*`` metadata.

    Raises:
        ValueError: for a file without a vocabulary, a vocabulary kind other than ``VOCABULARIES``,
            or a sentencepiece vocabulary of an architecture whose pipeline differs.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = metadata.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{source} stores no tokenizer (no tokenizer.ggml.tokens); pass a tokenizer file")
    if kind not in VOCABULARIES:
        raise ValueError(f"{source}: GGUF tokenizer model {kind!r} is not supported; supported: {list(VOCABULARIES)}")
    architecture = metadata.get("general.architecture")
    if kind == "llama" and architecture in SENTENCEPIECE_UNSUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: the sentencepiece vocabulary of a {architecture!r} file is not supported (its space handling "
            f"differs); supported: those of llama, mistral and qwen2 files"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    if kind == "gpt2":
        alphabet = _byte_alphabet()
        spelled = set(alphabet.values())
        # A token outside the byte alphabet (a mislabelled special token) is respelled byte by byte.
        vocab = {
            token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode("utf-8")): index
            for index, token in enumerate(tokens)
        }
        tokenizer = Tokenizer(models.BPE(
            vocab=vocab, merges=_merges(metadata, source), dropout=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False,
        ))
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre in PRE_TOKENIZER_SPLITS:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        else:
            if pre not in GPT2_SPLIT_NAMES:
                logger.warning(
                    "%s: tokenizer.ggml.pre %r is not one supra knows; splitting text with GPT-2's pattern, as "
                    "transformers does (llama.cpp may split differently)", source, pre,
                )
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        # A control token spelled outside the byte alphabet was respelled above and stays a plain token.
        controls = [t for t, kind_ in zip(tokens, types) if kind_ == CONTROL and set(t) <= spelled]
    else:
        vocab = {token: index for index, token in enumerate(tokens)}
        merges = _merges(metadata, source) if "tokenizer.ggml.merges" in metadata else merges_from_scores(
            tokens, metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        )
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
        controls = [t for t, kind_ in zip(tokens, types) if kind_ == CONTROL]
    # The tokens the file names BOS, EOS, unknown and padding are special too, whatever their type.
    named = [metadata.get(f"tokenizer.ggml.{role}_token_id") for role in SPECIAL_ROLES]
    controls += [tokens[i] for i in named if i is not None and 0 <= i < len(tokens) and tokens[i] not in controls]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in controls])
    user_defined = [t for t, kind_ in zip(tokens, types) if kind_ == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    return tokenizer


class GGUFTokenizer(TokenizersBacked):
    """The tokenizer stored in a GGUF file. Encodes without BOS/EOS; pickles by path.

    Attributes:
        vocab_size (int): the number of tokens.
        bos_id, eos_id (Optional[int]): the file's BOS and EOS ids (None when it names none).
        add_bos_token (bool): whether the model expects BOS before text (the file's flag; when
            absent, True for sentencepiece vocabularies and False for byte-level BPE, as llama.cpp
            and transformers assume).
        chat_template (Optional[str]): the file's Jinja chat template.
        fingerprint (str): identifies the tokenizer for caches.

    Raises:
        ValueError: for a file without a tokenizer of a supported kind (see ``build_gguf_tokenizer``).
    """

    def __init__(self, path: PathLike):
        from supra.checkpoint.gguf import gguf_file, read_gguf_header

        self.path = gguf_file(path)
        metadata = read_gguf_header(self.path).metadata
        self._tokenizer = build_gguf_tokenizer(metadata, self.path)
        self.vocab_size = len(metadata["tokenizer.ggml.tokens"])
        self.bos_id: Optional[int] = metadata.get("tokenizer.ggml.bos_token_id")
        self.eos_id: Optional[int] = metadata.get("tokenizer.ggml.eos_token_id")
        default_bos = metadata["tokenizer.ggml.model"] == "llama"
        self.add_bos_token = bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)) and self.bos_id is not None
        self.chat_template: Optional[str] = metadata.get("tokenizer.chat_template")
        digest = hashlib.sha256(self._tokenizer.to_str().encode("utf-8"))
        self.fingerprint = f"gguf:{digest.hexdigest()[:16]}:{self.eos_id}:{self.bos_id}:{self.add_bos_token}"

    def save_hf_files(self, folder: PathLike) -> List[Path]:
        """Writes this tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` in ``folder`` (a
        checkpoint folder needs no copy of the whole GGUF file): ``load_tokenizer(folder)`` and
        transformers' ``AutoTokenizer`` read back the same ids, BOS/EOS, BOS rule and chat template.

        Returns:
            List[Path]: the two files written.
        """
        from tokenizers import Tokenizer, processors

        folder = Path(folder)
        tokenizer = Tokenizer.from_str(self._tokenizer.to_str())
        token = tokenizer.id_to_token
        if self.add_bos_token:
            # tokenizer.json's post-processor is what decides BOS for HFTokenizer and transformers 5.
            bos = token(self.bos_id)
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
            )
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None if self.bos_id is None else token(self.bos_id),
            "eos_token": None if self.eos_id is None else token(self.eos_id),
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return [folder / "tokenizer.json", folder / "tokenizer_config.json"]

    def __reduce__(self):
        return (GGUFTokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"GGUFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
