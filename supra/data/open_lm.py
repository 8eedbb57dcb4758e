"""open_lm's pretokenized webdataset, read directly (tarfile, gzip and json only).

Layout (docs/method.md, the published checkpoint layout)::

    manifest.jsonl      {"shard": "shard_00000000", "num_sequences": 8192} per line
    shard_00000000.tar  samples "<key>.json.gz" (gzip'd JSON list of seq_len + 1 token ids) or
                        "<key>.txt" (a JSON list, or ids separated by whitespace or commas)

A sample's key is its member name up to the first dot of the file name (the webdataset rule).
"""

import gzip
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from supra.data._windows import make_item

PathLike = Union[str, os.PathLike]

MANIFEST = "manifest.jsonl"
# Token members by preference when one sample holds several.
TOKEN_EXTENSIONS = ("json.gz", "json", "txt")


def _split_member(name: str) -> Tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


def decode_tokens(data: bytes, ext: str, where: str = "sample") -> np.ndarray:
    """Decodes one sample's token member.

    Args:
        data: the member's bytes.
        ext: "json.gz" (gzip'd JSON list), "json" (JSON list) or "txt" (JSON list, or integers
            separated by whitespace or commas).
        where: names the sample in errors.

    Returns:
        int64 array of token ids.

    Raises:
        ValueError: undecodable data or something other than a flat list of integers.
    """
    try:
        if ext == "json.gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8").strip()
        if ext in ("json.gz", "json") or text.startswith("["):
            values = json.loads(text)
        else:
            values = [int(v) for v in text.replace(",", " ").split()]
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{where}: cannot decode {ext} token ids ({error})") from error
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where}: expected a flat list of integer token ids in the {ext} member")
    return np.asarray(values, dtype=np.int64)


def read_manifest(path_or_manifest: PathLike) -> Tuple[Path, List[Dict[str, Any]]]:
    """Reads an open_lm ``manifest.jsonl``.

    Args:
        path_or_manifest: the folder holding ``manifest.jsonl``, or the manifest file.

    Returns:
        (manifest path, list of {"shard", "num_sequences"} dicts).

    Raises:
        ValueError: missing manifest, bad lines, or missing shard tar files.
    """
    path = Path(path_or_manifest)
    manifest = path / MANIFEST if path.is_dir() else path
    if not manifest.is_file():
        raise ValueError(
            f"{path} is not an open_lm dataset: expected a folder with {MANIFEST} (lines "
            f'{{"shard": name, "num_sequences": n}}) and name.tar shards, or the manifest file itself'
        )
    entries = []
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest}:{number}: not valid JSON ({error})") from error
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("shard"), str)
            or not isinstance(entry.get("num_sequences"), int)
            or entry["num_sequences"] < 0
        ):
            raise ValueError(f'{manifest}:{number}: expected {{"shard": name, "num_sequences": n >= 0}}, got {line!r}')
        name = entry["shard"]
        tar = manifest.parent / (name if name.endswith(".tar") else f"{name}.tar")
        if not tar.is_file():
            raise ValueError(f"{manifest}:{number}: shard {tar} does not exist")
        entries.append({"shard": name, "num_sequences": entry["num_sequences"], "path": tar})
    return manifest, entries


class OpenLMWebDataset(Dataset):
    """Map-style dataset over open_lm's pretokenized webdataset shards.

    Each sample is one window of ``seq_len + 1`` tokens; items are the same dicts as
    ``TokenShardDataset`` ({"tokens", "labels", "positions"}, LongTensor [seq_len]). The length comes
    from the manifest; each tar is indexed (member offsets, via ``tarfile``) on first access in each
    process, and samples are then read with one seek. Tars must be uncompressed (as open_lm writes them).

    Args:
        path_or_manifest: the dataset folder or its ``manifest.jsonl``.
        seq_len: input tokens per item; inferred from the first sample when None, else checked
            against it.
        eos_id: if given, positions restart at 0 after every ``eos_id`` token (open_lm's samples
            carry no other document boundary information); None gives ``arange(seq_len)``.

    Raises:
        ValueError: a missing/bad manifest or shard, an empty dataset, or a sample whose length is
            not ``seq_len + 1`` (both lengths named).
    """

    def __init__(self, path_or_manifest: PathLike, seq_len: Optional[int] = None, *, eos_id: Optional[int] = None):
        self.manifest, entries = read_manifest(path_or_manifest)
        self._shards = [str(e["path"]) for e in entries]
        self._counts = [e["num_sequences"] for e in entries]
        self._offsets = np.concatenate([[0], np.cumsum(self._counts, dtype=np.int64)])
        self.eos_id = eos_id
        self._members: Dict[int, List[Tuple[int, int, str, str]]] = {}
        if len(self) == 0:
            raise ValueError(f"{self.manifest} lists no sequences")
        first = self._read(0)
        if seq_len is None:
            if len(first) < 2:
                raise ValueError(f"{self._shards[0]}: the first sample holds {len(first)} token(s); need at least 2")
            seq_len = len(first) - 1
        elif len(first) != seq_len + 1:
            raise ValueError(
                f"{self._shards[0]}: samples hold {len(first)} tokens (seq_len {len(first) - 1}), but "
                f"seq_len={seq_len} needs {seq_len + 1}; pass seq_len={len(first) - 1} or None"
            )
        self.seq_len = int(seq_len)

    @property
    def num_tokens(self) -> int:
        return len(self) * (self.seq_len + 1)

    @property
    def vocab_size(self) -> Optional[int]:
        """Not recorded by open_lm's format."""
        return None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _index_shard(self, shard: int) -> List[Tuple[int, int, str, str]]:
        if shard in self._members:
            return self._members[shard]
        path = self._shards[shard]
        found: Dict[str, Tuple[int, int, str, str]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_member(member.name)
                    if ext not in TOKEN_EXTENSIONS:
                        continue
                    if key in found and TOKEN_EXTENSIONS.index(found[key][2]) <= TOKEN_EXTENSIONS.index(ext):
                        continue
                    found[key] = (member.offset_data, member.size, ext, member.name)
        except tarfile.ReadError as error:
            raise ValueError(f"{path}: not an uncompressed tar file ({error})") from error
        members = list(found.values())
        if len(members) != self._counts[shard]:
            raise ValueError(
                f"{path}: holds {len(members)} samples with a {' / '.join(TOKEN_EXTENSIONS)} member, but "
                f"{self.manifest} says num_sequences={self._counts[shard]}"
            )
        self._members[shard] = members
        return members

    def _read(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
        offset, size, ext, name = self._index_shard(shard)[i - int(self._offsets[shard])]
        with open(self._shards[shard], "rb") as file:
            file.seek(offset)
            data = file.read(size)
        return decode_tokens(data, ext, where=f"{self._shards[shard]}:{name}")

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        window = self._read(i)
        if len(window) != self.seq_len + 1:
            shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
            raise ValueError(
                f"{self._shards[shard]}: sample {i - int(self._offsets[shard])} holds {len(window)} tokens, "
                f"expected seq_len + 1 = {self.seq_len + 1}"
            )
        starts = None
        if self.eos_id is not None:
            starts = np.flatnonzero(window[: self.seq_len - 1] == self.eos_id) + 1
        return make_item(window, starts)

    def __repr__(self) -> str:
        return f"OpenLMWebDataset({str(self.manifest)!r}, seq_len={self.seq_len}, samples={len(self)}, shards={len(self._shards)})"
