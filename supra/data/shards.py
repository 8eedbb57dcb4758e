"""Pretokenized token shards: raw token files, memory-mapped, read as fixed-length windows.

A shard folder holds::

    index.json              {"format": "supra-token-shards", "version": 1, "dtype", "vocab_size",
                             "eos_id", "shards": [{"file", "num_tokens", "num_documents", "max_id"}, ...],
                             "num_tokens", ...}
    shard_00000.bin         the token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    shard_00000.docs.npy    int64 offsets, within the shard, of the documents that start in it

The shards are consecutive pieces of one token stream (the documents, each followed by EOS when
the writer was given one). A document may continue from one shard into the next; then the next
shard lists no start for it.
"""

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from supra.data._windows import make_item

FORMAT = "supra-token-shards"
VERSION = 1
INDEX_FILE = "index.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}

PathLike = Union[str, os.PathLike]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids ``0 .. vocab_size - 1`` (uint16 or uint32)."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32 token shards (at most 2**32)")


def _check_document(index: int, document: Any, vocab_size: int) -> np.ndarray:
    ids = np.asarray(document)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.ndim != 1 or ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"document {index}: expected a 1-D list or array of integer token ids, got an array of "
            f"shape {ids.shape} and dtype {ids.dtype}"
        )
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise ValueError(
            f"document {index}: token id {int(ids[bad.argmax()])} at position {int(bad.argmax())} is "
            f"outside [0, vocab_size={vocab_size}); pass the tokenizer's full vocab_size"
        )
    return ids


class _ShardWriter:
    """Writes a token stream into shards of exactly ``shard_tokens`` tokens (the last may be short)."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder = folder
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: List[Dict[str, Any]] = []
        self._file = None
        self._filled = 0
        self._starts: List[int] = []
        self._max_id = -1

    def _open(self) -> None:
        name = f"shard_{len(self.shards):05d}"
        self._file = open(self.folder / f"{name}.bin", "wb")
        self._filled = 0
        self._starts = []
        self._max_id = -1
        self.shards.append({"file": f"{name}.bin", "num_tokens": 0, "num_documents": 0})

    def _close(self) -> None:
        self._file.close()
        self._file = None
        entry = self.shards[-1]
        entry["num_tokens"] = self._filled
        entry["num_documents"] = len(self._starts)
        # Recorded so that a reader checks the ids against a model's vocabulary without a scan.
        entry["max_id"] = self._max_id
        docs_file = self.folder / entry["file"].replace(".bin", ".docs.npy")
        np.save(docs_file, np.asarray(self._starts, dtype=np.int64))

    def write_document(self, ids: np.ndarray) -> None:
        first = True
        while len(ids) > 0:
            if self._file is None:
                self._open()
            if first:
                self._starts.append(self._filled)
                first = False
            take = min(len(ids), self.shard_tokens - self._filled)
            self._file.write(ids[:take].astype(self.dtype).tobytes())
            self._max_id = max(self._max_id, int(ids[:take].max()))
            self._filled += take
            ids = ids[take:]
            if self._filled == self.shard_tokens:
                self._close()

    def finish(self) -> List[Dict[str, Any]]:
        if self._file is not None:
            self._close()
        return self.shards


def _replace_folder(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def write_token_shards(
    documents: Iterable[Sequence[int]],
    out_dir: PathLike,
    *,
    vocab_size: int,
    eos_id: Optional[int] = None,
    shard_tokens: int = 2**26,
    overwrite: bool = False,
    metadata: Optional[Dict[str, Any]] = None,
) -> Path:
    """Writes documents of token ids as memory-mappable token shards.

    The documents are concatenated into one stream (``eos_id`` appended after each one when given)
    and cut into shards of ``shard_tokens`` tokens; a document may span two shards. The folder is
    built under a temporary name beside ``out_dir`` and renamed into place at the end, so a failure
    (a bad token id, an interrupted run) leaves no partial dataset behind.

    Args:
        documents: iterable of lists or 1-D integer arrays of token ids. Empty documents are kept
            only as their EOS (skipped entirely without ``eos_id``).
        out_dir: folder to create.
        vocab_size: ids must lie in ``[0, vocab_size)``; decides the dtype (uint16 up to 65536,
            else uint32).
        eos_id: token appended after every document, or None.
        shard_tokens: tokens per shard file (default 2**26: 128 MiB in uint16).
        overwrite: replace ``out_dir`` if it exists.
        metadata: extra JSON-serializable information stored in ``index.json`` under "metadata"
            (e.g. the tokenizer and the source files).

    Returns:
        The path of the written folder.

    Raises:
        ValueError: a token id outside ``[0, vocab_size)`` (naming the document index and the id), a
            non-integer document, or invalid ``vocab_size`` / ``eos_id`` / ``shard_tokens``.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    dtype = token_dtype(int(vocab_size))
    if eos_id is not None and not (0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id={eos_id} is outside [0, vocab_size={vocab_size})")
    if not isinstance(shard_tokens, (int, np.integer)) or shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, dtype, int(shard_tokens))
        eos = None if eos_id is None else np.array([eos_id], dtype=np.int64)
        for index, document in enumerate(documents):
            ids = _check_document(index, document, vocab_size)
            if eos is not None:
                ids = np.concatenate([ids.astype(np.int64, copy=False), eos])
            writer.write_document(ids)
        shards = writer.finish()
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "vocab_size": int(vocab_size),
            "eos_id": None if eos_id is None else int(eos_id),
            "shard_tokens": int(shard_tokens),
            "shards": shards,
            "num_tokens": int(sum(s["num_tokens"] for s in shards)),
            "num_documents": int(sum(s["num_documents"] for s in shards)),
        }
        if metadata is not None:
            index["metadata"] = metadata
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _replace_folder(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _corrupt(index_path: Path, problem: str) -> ValueError:
    return ValueError(
        f"{index_path}: corrupt supra token shard index: {problem}. Rewrite the folder with "
        f"`supra tokenize` or supra.data.write_token_shards"
    )


def read_index(path: PathLike) -> Dict[str, Any]:
    """Reads and checks the ``index.json`` of a token shard folder.

    Args:
        path: the shard folder or its ``index.json``.

    Returns:
        The index dict, with "folder" (Path) added.

    Raises:
        ValueError: the path or the index is missing, or the index (or a shard file size) is wrong.
    """
    path = Path(path)
    index_path = path if path.name == INDEX_FILE else path / INDEX_FILE
    if not path.exists():
        raise ValueError(
            f"token shard path {path} does not exist; expected a folder with {INDEX_FILE} and "
            f"shard_*.bin files written by `supra tokenize` or supra.data.write_token_shards"
        )
    if not index_path.is_file():
        raise ValueError(
            f"{path} has no {INDEX_FILE}; expected a token shard folder written by `supra tokenize` "
            f"or supra.data.write_token_shards"
        )
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _corrupt(index_path, f"not valid JSON ({error})") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise _corrupt(index_path, f'"format" is {found!r}, expected {FORMAT!r}')
    if index.get("version") != VERSION:
        raise _corrupt(index_path, f'"version" is {index.get("version")!r}, this supra reads version {VERSION}')
    for key in ("dtype", "vocab_size", "shards", "num_tokens"):
        if key not in index:
            raise _corrupt(index_path, f"missing key {key!r}")
    if index["dtype"] not in DTYPES:
        raise _corrupt(index_path, f'"dtype" is {index["dtype"]!r}, expected one of {sorted(DTYPES)}')
    shards = index["shards"]
    if not isinstance(shards, list):
        raise _corrupt(index_path, '"shards" is not a list')
    folder = index_path.parent
    itemsize = np.dtype(DTYPES[index["dtype"]]).itemsize
    total = 0
    for number, shard in enumerate(shards):
        if not isinstance(shard, dict) or not {"file", "num_tokens", "num_documents"} <= shard.keys():
            raise _corrupt(index_path, f'shard entry {number} lacks "file", "num_tokens" or "num_documents"')
        file = folder / shard["file"]
        if not file.is_file():
            raise _corrupt(index_path, f"shard file {file} is missing")
        size = file.stat().st_size
        if size != shard["num_tokens"] * itemsize:
            raise _corrupt(
                index_path,
                f"{file} holds {size} bytes, but the index says {shard['num_tokens']} {index['dtype']} "
                f"tokens ({shard['num_tokens'] * itemsize} bytes)",
            )
        if shard.get("max_id", -1) >= index["vocab_size"]:
            raise _corrupt(index_path, f"{file} holds token id {shard['max_id']}, outside [0, vocab_size={index['vocab_size']})")
        total += shard["num_tokens"]
    if total != index["num_tokens"]:
        raise _corrupt(index_path, f'"num_tokens" is {index["num_tokens"]} but the shards hold {total}')
    index["folder"] = folder
    return index


class TokenShardDataset(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens over a token shard folder.

    Window ``i`` covers stream tokens ``[i * (seq_len + 1), (i + 1) * (seq_len + 1))``, across shard
    files where it straddles them; the tail shorter than a window is dropped. Shards are opened with
    ``numpy.memmap`` on first access in each process, so the dataset pickles cheaply to workers.

    Items are ``{"tokens", "labels", "positions"}``, each a LongTensor [seq_len]: ``tokens`` is
    ``window[:-1]`` and ``labels`` is ``window[1:]``. ``positions`` is ``arange(seq_len)``; with
    ``document_boundaries=True`` it restarts at 0 at each document start inside the window (the
    window start counts as one too). Labels are not masked at boundaries: the EOS ending one
    document predicts the first token of the next, as in ordinary packed pretraining.

    Args:
        path: the shard folder or its ``index.json``.
        seq_len: input tokens per item.
        document_boundaries: restart positions at document starts (reads ``*.docs.npy``).

    Raises:
        ValueError: missing folder or index, a corrupt index, or fewer than ``seq_len + 1`` tokens.
    """

    def __init__(self, path: PathLike, seq_len: int, *, document_boundaries: bool = False):
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        index = read_index(path)
        self.path = index["folder"]
        self.seq_len = int(seq_len)
        self.document_boundaries = document_boundaries
        self._index = {k: v for k, v in index.items() if k != "folder"}
        self._dtype = DTYPES[index["dtype"]]
        self._files = [str(self.path / s["file"]) for s in index["shards"]]
        self._doc_files = [f[: -len(".bin")] + ".docs.npy" for f in self._files]
        self._shard_sizes = [int(s["num_tokens"]) for s in index["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(self._shard_sizes, dtype=np.int64)])
        self._num_windows = self.num_tokens // (self.seq_len + 1)
        if self._num_windows == 0:
            raise ValueError(
                f"{self.path} holds {self.num_tokens} tokens, fewer than one window of seq_len + 1 = "
                f"{self.seq_len + 1}; use a smaller seq_len or more data"
            )
        if document_boundaries:
            for file, shard in zip(self._doc_files, index["shards"]):
                if not Path(file).is_file():
                    raise _corrupt(self.path / INDEX_FILE, f"document offsets {file} are missing")
                shape = np.load(file, mmap_mode="r").shape
                if shape != (shard["num_documents"],):
                    raise _corrupt(
                        self.path / INDEX_FILE,
                        f"{file} has shape {shape}, expected ({shard['num_documents']},)",
                    )
        self._tokens: Optional[List[Optional[np.ndarray]]] = None
        self._docs: Optional[List[Optional[np.ndarray]]] = None

    @property
    def vocab_size(self) -> int:
        return int(self._index["vocab_size"])

    def max_token_id(self) -> "tuple[int, Optional[Path]]":
        """The largest token id in the shards and the shard that holds it (-1, None when empty):
        recorded at write time; read from the shard files of folders written before that."""
        largest, where = -1, None
        for number, shard in enumerate(self._index["shards"]):
            top = shard.get("max_id")
            if top is None:
                top = int(self._shard_tokens(number).max()) if self._shard_sizes[number] else -1
            if top > largest:
                largest, where = top, Path(self._files[number])
        return largest, where

    @property
    def eos_id(self) -> Optional[int]:
        return self._index.get("eos_id")

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole stream (including the dropped tail)."""
        return int(self._index["num_tokens"])

    def __len__(self) -> int:
        return self._num_windows

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None
        state["_docs"] = None
        return state

    def _shard_tokens(self, shard: int) -> np.ndarray:
        if self._tokens is None:
            self._tokens = [None] * len(self._files)
        if self._tokens[shard] is None:
            self._tokens[shard] = np.memmap(
                self._files[shard], dtype=self._dtype, mode="r", shape=(self._shard_sizes[shard],)
            )
        return self._tokens[shard]

    def _shard_docs(self, shard: int) -> np.ndarray:
        if self._docs is None:
            self._docs = [None] * len(self._files)
        if self._docs[shard] is None:
            docs = np.load(self._doc_files[shard], mmap_mode="r")
            size = self._shard_sizes[shard]
            if docs.dtype.kind not in "iu" or (
                len(docs) and (docs[0] < 0 or docs[-1] >= size or np.any(np.diff(docs) <= 0))
            ):
                raise _corrupt(
                    self.path / INDEX_FILE,
                    f"{self._doc_files[shard]} must hold increasing integer offsets in [0, {size})",
                )
            self._docs[shard] = docs
        return self._docs[shard]

    def _shards_between(self, start: int, end: int) -> range:
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        last = int(np.searchsorted(self._offsets, end, side="left")) - 1
        return range(first, last + 1)

    def _read(self, start: int, end: int) -> np.ndarray:
        pieces = []
        for shard in self._shards_between(start, end):
            base = int(self._offsets[shard])
            lo, hi = max(start, base) - base, min(end, int(self._offsets[shard + 1])) - base
            if hi > lo:
                pieces.append(self._shard_tokens(shard)[lo:hi])
        return np.concatenate(pieces).astype(np.int64)

    def _doc_starts(self, start: int, end: int) -> np.ndarray:
        starts = []
        for shard in self._shards_between(start, end):
            base = int(self._offsets[shard])
            docs = self._shard_docs(shard)
            lo, hi = np.searchsorted(docs, [start - base, end - base], side="left")
            starts.append(np.asarray(docs[lo:hi], dtype=np.int64) + base - start)
        return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * (self.seq_len + 1)
        window = self._read(start, start + self.seq_len + 1)
        if window.max() >= self.vocab_size:
            # An embedding lookup would fail with a bare IndexError (or, on some devices, not at all).
            shard = self._shards_between(start + int(window.argmax()), start + int(window.argmax()) + 1)[0]
            raise ValueError(
                f"{self._files[shard]} holds token id {int(window.max())}, outside [0, vocab_size={self.vocab_size}) "
                f"(window {i}): the shard is damaged or was written for another tokenizer; write it again"
            )
        starts = self._doc_starts(start, start + self.seq_len) if self.document_boundaries else None
        return make_item(window, starts)

    def __repr__(self) -> str:
        return (
            f"TokenShardDataset({str(self.path)!r}, seq_len={self.seq_len}, windows={len(self)}, "
            f"tokens={self.num_tokens}, shards={len(self._files)})"
        )
