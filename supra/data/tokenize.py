"""Text files -> token shards: ``supra tokenize INPUTS... --tokenizer T --out DIR``.

Inputs and how they split into documents:

- ``.txt`` (or ``.txt.gz``): one document per non-empty line (a line of only whitespace is
  skipped; the line break is not part of the document). This matches HF ``datasets``' "text"
  loader and the usual one-document-per-line dumps; put a long document on one line, or use JSONL.
- ``.jsonl`` / ``.json`` (or ``.gz``): JSON lines, one document per line, text in field ``text_key``.
- ``.parquet``: one document per row, text in column ``text_key`` (read in batches with pyarrow).
- a folder: every such file below it, in sorted order.

Each document is encoded without special tokens, EOS is appended (unless ``append_eos=False``), BOS
is prepended only with ``prepend_bos=True``, and the stream is written with ``write_token_shards``.
The output depends only on the inputs and the tokenizer, not on ``num_workers``.
"""

import argparse
import collections
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Union

from supra.data._tokenizers import TokenizersBacked
from supra.data.gguf_tokenizer import GGUFTokenizer
from supra.data.shards import write_token_shards

PathLike = Union[str, os.PathLike]

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES

# Special-token names tried, in order, when an HF tokenizer.json has no tokenizer_config.json beside it.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "<|startoftext|>")

BATCH_DOCUMENTS = 512


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` file. Encodes without BOS/EOS; pickles by path."""

    def __init__(self, path: PathLike):
        import sentencepiece

        self.path = Path(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.fingerprint = f"sentencepiece:{_file_digest(self.path)}"

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __reduce__(self):
        return (SentencePieceTokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _special_from_config(config: dict, key: str) -> Optional[str]:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(TokenizersBacked):
    """An HF ``tokenizer.json`` (the ``tokenizers`` library). Encodes without special tokens.

    EOS/BOS come from ``tokenizer_config.json`` beside the file ("eos_token", "bos_token") when
    present, else from the first of the usual names (``</s>``, ``<|endoftext|>``, ...) in the vocab.
    ``add_bos_token``: whether the tokenizer itself puts BOS before text, which is what
    ``tokenizer.json``'s post-processor does (transformers 5 follows it even where
    ``tokenizer_config.json`` has an ``add_bos_token`` flag; in real folders the two agree).
    """

    def __init__(self, path: PathLike):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tokenizer = Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        config_path = self.path.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.eos_id = self._special_id(_special_from_config(config, "eos_token"), EOS_NAMES)
        self.bos_id = self._special_id(_special_from_config(config, "bos_token"), BOS_NAMES)
        self.add_bos_token = self.bos_id is not None and self._post_processor_adds_bos()
        self.fingerprint = f"tokenizers:{_file_digest(self.path)}:{self.eos_id}:{self.bos_id}"

    def _post_processor_adds_bos(self) -> bool:
        with_special = self._tokenizer.encode("a", add_special_tokens=True).ids
        without = self._tokenizer.encode("a", add_special_tokens=False).ids
        return len(with_special) > len(without) and with_special[0] == self.bos_id

    def _special_id(self, configured: Optional[str], names: Sequence[str]) -> Optional[int]:
        for name in ([configured] if configured else []) + list(names):
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def __reduce__(self):
        return (HFTokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: PathLike) -> Union[SentencePieceTokenizer, HFTokenizer, GGUFTokenizer]:
    """Loads a tokenizer from a sentencepiece ``.model``, an HF ``tokenizer.json``, a GGUF file
    (the tokenizer it stores, see ``supra.data.gguf_tokenizer``), or a folder.

    In a folder, ``tokenizer.json`` is preferred, then ``tokenizer.model``, then a single ``*.model``,
    then a single ``*.gguf``.

    Args:
        path: file or folder.

    Returns:
        An object with ``encode(text) -> list[int]`` (no special tokens), ``encode_batch(texts)``,
        ``decode(ids) -> str``, ``vocab_size``, ``eos_id`` and ``bos_id`` (None when absent).

    Raises:
        ValueError: the path does not exist or holds no tokenizer of a known type.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"tokenizer path {path} does not exist; pass a sentencepiece .model file, an HF "
            f"tokenizer.json, a .gguf file, or a folder holding one of them"
        )
    if path.is_dir():
        models = sorted(path.glob("*.model"))
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        elif len(models) == 1:
            path = models[0]
        elif len(ggufs) == 1:
            path = ggufs[0]
        else:
            found = ", ".join(p.name for p in sorted(path.iterdir())[:20]) or "nothing"
            raise ValueError(
                f"tokenizer folder {path} holds no tokenizer.json, tokenizer.model, single *.model or single "
                f"*.gguf file (found: {found})"
            )
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".gguf":
        return GGUFTokenizer(path)
    raise ValueError(
        f"tokenizer file {path} is of unknown type; expected a sentencepiece .model file, an HF "
        f"tokenizer.json or a .gguf file"
    )


# The files that make a folder a tokenizer for load_tokenizer (and transformers' AutoTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def save_tokenizer_files(source: PathLike, folder: PathLike) -> List[str]:
    """Puts the tokenizer ``source`` names into ``folder`` (a checkpoint folder), so that
    ``load_tokenizer(folder)`` gives the same tokenizer: a sentencepiece ``.model`` is copied as
    ``tokenizer.model``; a ``tokenizer.json`` is copied with the ``tokenizer_config.json`` beside
    it; a GGUF file (or a folder holding one) is written as ``tokenizer.json`` +
    ``tokenizer_config.json``; a folder's tokenizer files are copied.

    Args:
        source: a tokenizer file, a GGUF file, or a folder (a checkpoint) holding one.
        folder: where the files go (it must exist).

    Returns:
        List[str]: the names written; empty when ``source`` holds no tokenizer.
    """
    source, folder = Path(source), Path(folder)
    if source.suffix == ".gguf" or (source.is_dir() and any(source.glob("*.gguf")) and
                                    not any((source / name).is_file() for name in TOKENIZER_FILES)):
        from supra.checkpoint.gguf import gguf_file, read_gguf_header

        if "tokenizer.ggml.tokens" not in read_gguf_header(gguf_file(source)).metadata:
            return []
        return [path.name for path in GGUFTokenizer(source).save_hf_files(folder)]
    if source.is_file():
        files = {"tokenizer.model": source} if source.suffix == ".model" else {
            "tokenizer.json": source, "tokenizer_config.json": source.parent / "tokenizer_config.json"}
    else:
        files = {name: source / name for name in TOKENIZER_FILES}
    written = []
    for name, path in files.items():
        if path.is_file():
            shutil.copyfile(path, folder / name)
            written.append(name)
    return written


def _suffix(path: Path) -> Optional[str]:
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def expand_inputs(inputs: Union[PathLike, Iterable[PathLike]]) -> List[Path]:
    """Checks input paths and expands folders into their supported files (sorted).

    Raises:
        ValueError: a missing path, an unsupported extension, or a folder without supported files.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ValueError(f"input {path} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
            if not found:
                raise ValueError(f"input folder {path} holds no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif _suffix(path) is None:
            raise ValueError(f"input {path} has an unsupported extension; expected one of {', '.join(SUFFIXES)}")
        else:
            files.append(path)
    if not files:
        raise ValueError("no input files given")
    return files


def _numbered_lines(path: Path) -> Iterator["tuple[int, str]"]:
    """(line number, line) of a text file, gzipped or not, each line decoded from UTF-8 by itself so
    that an undecodable byte is reported with its file and line.

    Raises:
        ValueError: naming the file, the line and the byte, for text that is not UTF-8.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                    "convert the file to UTF-8 first (e.g. iconv -f latin1 -t utf-8)"
                ) from error


def _parquet_file(path: Path, text_key: str):
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_key not in names:
        raise ValueError(f"{path} has no column {text_key!r}; its columns are {names}; pass --text-key")
    return parquet


def read_documents(path: Path, text_key: str = "text") -> Iterator[str]:
    """Yields the documents (strings) of one input file, split as the module docstring says.

    Raises:
        ValueError: a JSON line without ``text_key`` (naming the file, the line and its keys), a
            non-string text, invalid JSON, text that is not UTF-8 (naming the file and the line), or
            a parquet file without the column.
    """
    suffix = _suffix(path)
    if suffix in TEXT_SUFFIXES:
        for _, line in _numbered_lines(path):
            if line.strip():
                yield line.rstrip("\r\n")
    elif suffix in JSON_SUFFIXES:
        for number, line in _numbered_lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
            if not isinstance(record, dict) or text_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{number}: no field {text_key!r}; the record's keys are {keys}; pass --text-key"
                )
            text = record[text_key]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: field {text_key!r} is a {type(text).__name__}, not a string")
            yield text
    elif suffix in PARQUET_SUFFIXES:
        parquet = _parquet_file(path, text_key)
        for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text
    else:
        raise ValueError(f"input {path} has an unsupported extension; expected one of {', '.join(SUFFIXES)}")


def _batches(iterable: Iterable[str], size: int) -> Iterator[List[str]]:
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(texts: List[str]) -> List[List[int]]:
    return encode_batch(_WORKER_TOKENIZER, texts)


def _encode_in_pool(pool, batches: Iterable[List[str]], depth: int) -> Iterator[List[List[int]]]:
    # Pool.imap would read the whole input ahead of the workers; keep at most `depth` batches in flight.
    pending = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(_encode_in_worker, (batch,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def encode_batch(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    """``tokenizer.encode_batch`` when it has one, else ``encode`` on each text."""
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(text) for text in texts]


def tokenize_files(
    inputs: Union[PathLike, Iterable[PathLike]],
    out_dir: PathLike,
    *,
    tokenizer: Union[PathLike, Any],
    text_key: str = "text",
    append_eos: bool = True,
    shard_tokens: int = 2**26,
    num_workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    prepend_bos: bool = False,
) -> Path:
    """Tokenizes text files into a token shard folder (read it with ``TokenShardDataset``).

    Args:
        inputs: files (.txt, .jsonl, .json, their .gz, .parquet) or folders of them.
        out_dir: output folder (written atomically).
        tokenizer: a path accepted by ``load_tokenizer``, or a loaded tokenizer object.
        text_key: JSON field / parquet column holding the text.
        append_eos: append the tokenizer's EOS after every document.
        shard_tokens: tokens per shard file.
        num_workers: processes encoding in parallel (the output is the same for any number).
        progress: show a tqdm bar over documents on stderr (with a total for parquet inputs).
        overwrite: replace ``out_dir`` if it exists.
        prepend_bos: put the tokenizer's BOS before every document (Llama/Mistral-style data).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: missing inputs, unknown extensions, a missing ``text_key``, an unknown tokenizer,
            or ``append_eos`` / ``prepend_bos`` with a tokenizer that lacks that token.
    """
    files = expand_inputs(inputs)
    tokenizer_source = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else repr(tokenizer)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    eos_id = None
    if append_eos:
        eos_id = getattr(tokenizer, "eos_id", None)
        if eos_id is None:
            raise ValueError(f"tokenizer {tokenizer_source} has no EOS token; pass append_eos=False (--no-eos)")
    bos_id = getattr(tokenizer, "bos_id", None)
    if prepend_bos and bos_id is None:
        raise ValueError(f"tokenizer {tokenizer_source} has no BOS token; drop prepend_bos (--bos)")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    # Check every parquet schema and the first record of every JSON file before any work, so a bad
    # text_key fails at once rather than hours into a run.
    parquet_rows = []
    for path in files:
        if _suffix(path) in PARQUET_SUFFIXES:
            parquet_rows.append(_parquet_file(path, text_key).metadata.num_rows)
        elif _suffix(path) in JSON_SUFFIXES:
            next(read_documents(path, text_key), None)
    total = sum(parquet_rows) if len(parquet_rows) == len(files) else None

    texts = itertools.chain.from_iterable(read_documents(path, text_key) for path in files)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="doc", desc="tokenize", file=sys.stderr, disable=not progress)

    def documents(batches: Iterable[List[List[int]]]) -> Iterator[List[int]]:
        for batch in batches:
            bar.update(len(batch))
            for ids in batch:
                yield [bos_id, *ids] if prepend_bos else ids

    metadata = {
        "tokenizer": tokenizer_source, "inputs": [str(p) for p in files], "text_key": text_key,
        "bos": prepend_bos, "eos": append_eos,
    }
    try:
        if num_workers == 1:
            encoded = (encode_batch(tokenizer, batch) for batch in _batches(texts, BATCH_DOCUMENTS))
            return write_token_shards(
                documents(encoded), out_dir, vocab_size=tokenizer.vocab_size, eos_id=eos_id,
                shard_tokens=shard_tokens, overwrite=overwrite, metadata=metadata,
            )
        with multiprocessing.get_context().Pool(num_workers, _init_worker, (tokenizer,)) as pool:
            encoded = _encode_in_pool(pool, _batches(texts, BATCH_DOCUMENTS), depth=2 * num_workers)
            return write_token_shards(
                documents(encoded), out_dir, vocab_size=tokenizer.vocab_size, eos_id=eos_id,
                shard_tokens=shard_tokens, overwrite=overwrite, metadata=metadata,
            )
    finally:
        bar.close()


def main(argv: Optional[List[str]] = None) -> int:
    """``supra tokenize INPUTS... --tokenizer T --out DIR``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="supra tokenize",
        description="Tokenize .txt (one document per non-empty line), .jsonl/.json (one document per "
        "line, field --text-key) and .parquet (column --text-key) files, or folders of them, into "
        "memory-mapped token shards for uptraining.",
    )
    parser.add_argument("inputs", nargs="+", help="input files or folders")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model, HF tokenizer.json, .gguf file, or a folder with one")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--text-key", default="text", help="JSON field / parquet column with the text (default text)")
    parser.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard file (default 2**26)")
    parser.add_argument("--num-workers", type=int, default=1, help="encoding processes (default 1)")
    parser.add_argument("--no-eos", action="store_true", help="do not append EOS after each document")
    parser.add_argument("--bos", action="store_true", help="prepend BOS to each document")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        out = tokenize_files(
            args.inputs, args.out, tokenizer=args.tokenizer, text_key=args.text_key,
            append_eos=not args.no_eos, shard_tokens=args.shard_tokens, num_workers=args.num_workers,
            progress=not args.no_progress, overwrite=args.overwrite, prepend_bos=args.bos,
        )
    except (ValueError, FileExistsError) as error:
        print(f"supra tokenize: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # A read-only or full output location, or an unreadable input: the path, not a traceback.
        print(f"supra tokenize: error: {error.strerror or error}: {error.filename or args.out} (inputs "
              f"{' '.join(args.inputs)}, --out {args.out})", file=sys.stderr)
        return 2
    index = json.loads((out / "index.json").read_text())
    print(
        f"wrote {out}: {index['num_tokens']:,} tokens, {index['num_documents']:,} documents, "
        f"{len(index['shards'])} shard(s) of {index['dtype']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
