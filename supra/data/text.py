"""Local text files through HF ``datasets``, tokenized and packed into windows.

For small and medium corpora that fit in memory once tokenized; for large ones, run
``supra tokenize`` once and train on the shards with ``TokenShardDataset``.
"""

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from supra.data._windows import make_item
from supra.data.tokenize import (
    JSON_SUFFIXES,
    TEXT_SUFFIXES,
    _suffix,
    encode_batch,
    expand_inputs,
    load_tokenizer,
)

PathLike = Union[str, os.PathLike]


def _builder(files: List[Path]) -> str:
    kinds = set()
    for path in files:
        suffix = _suffix(path)
        kinds.add("text" if suffix in TEXT_SUFFIXES else "json" if suffix in JSON_SUFFIXES else "parquet")
    if len(kinds) != 1:
        raise ValueError(f"data_files mix {sorted(kinds)} files; give files of one kind (text, json or parquet)")
    return kinds.pop()


class TextDataset(Dataset):
    """Text, JSON-lines or parquet files, tokenized with EOS after each document and packed.

    Files are read with ``datasets.load_dataset("text" | "json" | "parquet", data_files=...)``,
    which needs no network for local files. Documents split as in ``supra tokenize``: one per
    non-empty line of a .txt file, one per JSON line / parquet row (field ``text_key``). The token
    stream is cut into non-overlapping windows of ``seq_len + 1`` like ``TokenShardDataset``, and
    items are the same dicts ({"tokens", "labels", "positions"}, LongTensor [seq_len]).

    Args:
        data_files: a file or folder, or a list of them.
        tokenizer: a path accepted by ``load_tokenizer``, or a loaded tokenizer object.
        seq_len: input tokens per item.
        text_key: JSON field / parquet column with the text ("text" files always use "text").
        document_boundaries: restart positions at 0 at each document start inside a window.
        cache_dir: the ``datasets`` cache folder (default: its own default).
        prepend_bos: put the tokenizer's BOS before every document.

    Raises:
        ValueError: missing files, mixed kinds, a missing ``text_key`` (naming the columns), a
            tokenizer without EOS, or fewer than ``seq_len + 1`` tokens.
    """

    def __init__(
        self,
        data_files: Union[PathLike, Iterable[PathLike]],
        tokenizer: Union[PathLike, Any],
        seq_len: int,
        *,
        text_key: str = "text",
        document_boundaries: bool = False,
        cache_dir: Optional[PathLike] = None,
        prepend_bos: bool = False,
    ):
        import datasets
        from datasets.fingerprint import Hasher

        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        files = expand_inputs(data_files)
        builder = _builder(files)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        eos_id = getattr(tokenizer, "eos_id", None)
        if eos_id is None:
            raise ValueError(f"tokenizer {tokenizer!r} has no eos_id; TextDataset appends EOS after each document")
        bos = [getattr(tokenizer, "bos_id", None)] if prepend_bos else []
        if bos == [None]:
            raise ValueError(f"tokenizer {tokenizer!r} has no bos_id; drop prepend_bos")
        raw = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train",
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
        key = "text" if builder == "text" else text_key
        if key not in raw.column_names:
            raise ValueError(
                f"{', '.join(map(str, files))}: no field {key!r}; the columns are {raw.column_names}; pass text_key"
            )

        def encode(batch: Dict[str, List[Any]]) -> Dict[str, List[List[int]]]:
            texts = [t for t in batch[key] if isinstance(t, str) and t.strip()]
            return {"input_ids": [bos + ids + [eos_id] for ids in map(list, encode_batch(tokenizer, texts))]}

        # Our tokenizers carry a content fingerprint, so the cache follows the tokenizer file, not its path.
        fingerprint = getattr(tokenizer, "fingerprint", None)
        new_fingerprint = None
        if fingerprint is not None:
            new_fingerprint = Hasher.hash(["supra.TextDataset/1", raw._fingerprint, fingerprint, key, bos, eos_id])
        # Explicit features: a batch of only empty lines yields no rows, whose type could not be inferred.
        features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))})
        tokenized = raw.map(
            encode, batched=True, remove_columns=raw.column_names, features=features,
            new_fingerprint=new_fingerprint, desc="tokenize",
        )
        column = tokenized.data.column("input_ids").combine_chunks()
        self._tokens = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.int64)
        offsets = np.asarray(column.offsets.to_numpy(), dtype=np.int64)
        self._doc_starts = offsets[:-1] - offsets[0]
        self.files = files
        self.seq_len = seq_len
        self.document_boundaries = document_boundaries
        self.eos_id = eos_id
        self.vocab_size = getattr(tokenizer, "vocab_size", None)
        self._num_windows = len(self._tokens) // (seq_len + 1)
        if self._num_windows == 0:
            raise ValueError(
                f"{', '.join(map(str, files))} give {len(self._tokens)} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}; use a smaller seq_len or more data"
            )

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * (self.seq_len + 1)
        window = self._tokens[start : start + self.seq_len + 1]
        starts = None
        if self.document_boundaries:
            lo, hi = np.searchsorted(self._doc_starts, [start, start + self.seq_len], side="left")
            starts = self._doc_starts[lo:hi] - start
        return make_item(window, starts)

    def __repr__(self) -> str:
        return f"TextDataset({len(self.files)} file(s), seq_len={self.seq_len}, windows={len(self)}, tokens={self.num_tokens})"
