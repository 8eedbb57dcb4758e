"""What the tokenizers backed by the ``tokenizers`` library share (HF tokenizer.json, GGUF)."""

from typing import List, Sequence


class TokenizersBacked:
    """``encode`` / ``encode_batch`` / ``decode`` over ``self._tokenizer`` (a ``tokenizers.Tokenizer``),
    without special tokens added: BOS is the caller's decision (``add_bos_token`` says the default)."""

    def encode(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
