"""Real English text that every Python installation ships, for offline demos, tests and the tiny teacher.

The corpus has two sources, one document each:

- ``topics/<name>``: the documentation topics of ``pydoc_data`` (79 documents, about 465 KB of the
  language reference);
- ``stdlib/<module>``: the docstrings of one standard-library module, in source order, each under
  a heading line (``module json.decoder``, ``class json.decoder.JSONDecoder``, ``def
  json.decoder.JSONDecoder.decode(self, s, _w=...)``); about 560 documents, 1.8 MB. Test folders
  and ``site-packages`` are skipped.

Documents are sorted by name and every ``HELDOUT_EVERY``-th one is held out, so the split is by
document. The text is fixed by the interpreter's version: ``corpus_record`` names the version
and a SHA-256 of the documents, and ``check_corpus`` tells a reader whose interpreter builds a
different corpus (its held-out losses then differ slightly from recorded ones).

Build it from the command line (``python -m supra.data.python_docs --help``): token shards of both
splits for a tokenizer, or a sentencepiece tokenizer trained on the training split.
"""

import argparse
import ast
import functools
import hashlib
import io
import json
import platform
import sys
import sysconfig
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from supra.data.shards import INDEX_FILE, write_token_shards

HELDOUT_EVERY = 10
SPLITS = ("train", "heldout", "all")
SOURCES = ("all", "topics", "stdlib")
# Folders of the standard library whose docstrings are not documentation (test suites, installed
# third-party packages) or duplicate it.
SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
CORPUS_VERSION = 1
PathLike = Union[str, Path]


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) plus BOS (256) and EOS (257): nothing to train or download."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    fingerprint = "bytes"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def topic_documents() -> Tuple[Tuple[str, str], ...]:
    """``(name, text)`` of every pydoc topic, named ``topics/<topic>``, in name order."""
    from pydoc_data.topics import topics

    return tuple((f"topics/{name}", topics[name]) for name in sorted(topics))


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter (the base one, inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _signature(node: ast.AST) -> str:
    return f"({ast.unparse(node.args)})" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else ""


def _docstring_sections(body: List[ast.stmt], prefix: str) -> Iterator[str]:
    """Headed docstrings of the classes and functions in ``body``, recursively, in source order."""
    for node in body:
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        name = f"{prefix}.{node.name}"
        docstring = ast.get_docstring(node, clean=True)
        if docstring:
            kind = "class" if isinstance(node, ast.ClassDef) else "def"
            yield f"{kind} {name}{_signature(node)}\n\n{docstring}"
        yield from _docstring_sections(node.body, name)


def module_document(source: str, module: str) -> Optional[str]:
    """One module's docstrings as a document, or None when it has none.

    Args:
        source: the module's source code.
        module: its dotted name, used in the heading lines.
    """
    tree = ast.parse(source)
    sections = []
    docstring = ast.get_docstring(tree, clean=True)
    if docstring:
        sections.append(f"module {module}\n\n{docstring}")
    sections.extend(_docstring_sections(tree.body, module))
    return "\n\n".join(sections) if sections else None


@functools.lru_cache(maxsize=1)
def stdlib_documents() -> Tuple[Tuple[str, str], ...]:
    """``(name, text)`` per standard-library module with docstrings, named ``stdlib/<module>``."""
    root = stdlib_root()
    files = sorted(
        p for p in root.rglob("*.py") if not SKIPPED_FOLDERS.intersection(p.relative_to(root).parts[:-1])
    )
    documents = []
    for path in files:
        try:
            text = module_document(path.read_text(encoding="utf-8"), _module_name(path, root))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            # A few interpreters ship deliberately broken files outside the test folders (lib2to3
            # fixtures); they hold no documentation.
            continue
        if text:
            documents.append((f"stdlib/{_module_name(path, root)}", text))
    return tuple(sorted(documents))


def named_documents(split: str = "train", source: str = "all") -> List[Tuple[str, str]]:
    """``(name, text)`` pairs of one split of the corpus, sorted by name.

    Args:
        split: ``"train"``, ``"heldout"`` (every ``HELDOUT_EVERY``-th document of the sorted
            corpus, starting with the first) or ``"all"``.
        source: ``"all"`` (topics and docstrings), ``"topics"`` or ``"stdlib"``.

    Raises:
        ValueError: for an unknown split or source.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose one of {list(SPLITS)}")
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is unknown; choose one of {list(SOURCES)}")
    everything = sorted(topic_documents() + stdlib_documents())
    if split == "train":
        chosen = [d for i, d in enumerate(everything) if i % HELDOUT_EVERY]
    elif split == "heldout":
        chosen = [d for i, d in enumerate(everything) if i % HELDOUT_EVERY == 0]
    else:
        chosen = everything
    return [d for d in chosen if source == "all" or d[0].startswith(f"{source}/")]


def python_docs_documents(split: str = "train", source: str = "all") -> List[str]:
    """The texts of ``named_documents(split, source)``."""
    return [text for _, text in named_documents(split, source)]


def corpus_record() -> Dict[str, Any]:
    """What identifies this interpreter's corpus: Python version, sizes and a SHA-256 per split."""
    record: Dict[str, Any] = {"corpus_version": CORPUS_VERSION, "python": platform.python_version()}
    for split in ("train", "heldout"):
        documents = named_documents(split)
        digest = hashlib.sha256()
        for name, text in documents:
            digest.update(name.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
        record[split] = {
            "documents": len(documents),
            "characters": sum(len(t) for _, t in documents),
            "sha256": digest.hexdigest(),
        }
    return record


def check_corpus(expected: Dict[str, Any]) -> Optional[str]:
    """None when this interpreter builds the corpus ``expected`` describes, else why not.

    Args:
        expected: a ``corpus_record()`` saved where the corpus was built.
    """
    actual = corpus_record()
    differing = [s for s in ("train", "heldout") if actual[s]["sha256"] != expected[s]["sha256"]]
    if not differing and actual["corpus_version"] == expected["corpus_version"]:
        return None
    return (
        f"this interpreter (Python {actual['python']}) builds a different python_docs corpus than the one "
        f"recorded (Python {expected['python']}): the {' and '.join(differing) or 'corpus version'} "
        f"split differs ({actual['heldout']['documents']} vs {expected['heldout']['documents']} held-out "
        f"documents). Losses measured on it differ slightly from the recorded ones; run under Python "
        f"{expected['python']} to reproduce them exactly"
    )


def prepare_python_docs(
    out_dir: PathLike, tokenizer: Any = None, *, bos: Optional[bool] = None, source: str = "all"
) -> Dict[str, Path]:
    """Writes token shards of both splits, once: reused while tokenizer and corpus are the same.

    Each document is encoded without special tokens, BOS is prepended when the tokenizer has one
    (unless ``bos=False``) and EOS appended.

    Args:
        out_dir: the folder that gets ``train/`` and ``heldout/``.
        tokenizer: a loaded tokenizer (``encode``, ``vocab_size``, ``eos_id``, ``bos_id``); None
            means ``ByteTokenizer`` (no BOS).
        bos: prepend BOS; None: when the tokenizer has one and is not ``ByteTokenizer``.
        source: which documents (see ``named_documents``).

    Returns:
        {"train": folder, "heldout": folder}.
    """
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    if bos is None:
        bos = getattr(tokenizer, "bos_id", None) is not None and not isinstance(tokenizer, ByteTokenizer)
    metadata = {
        "corpus": "python_docs", "source": source, "corpus_version": CORPUS_VERSION,
        "python": platform.python_version(), "bos": bos,
        "tokenizer": getattr(tokenizer, "fingerprint", type(tokenizer).__name__),
    }
    folders = {}
    for split in ("train", "heldout"):
        folder = Path(out_dir) / split
        index = folder / INDEX_FILE
        if not index.exists() or json.loads(index.read_text()).get("metadata") != metadata:
            documents = (
                ([tokenizer.bos_id] if bos else []) + tokenizer.encode(text)
                for text in python_docs_documents(split, source)
            )
            write_token_shards(
                documents, folder, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                overwrite=True, metadata=metadata,
            )
        folders[split] = folder
    return folders


def paragraphs(documents: Sequence[str], max_chars: int) -> Iterator[str]:
    """The documents cut at blank lines into pieces of at most ``max_chars`` characters (longer
    paragraphs are cut at line breaks, then hard), newlines kept, for tokenizer training."""
    for document in documents:
        for paragraph in document.split("\n\n"):
            while len(paragraph) > max_chars:
                cut = paragraph.rfind("\n", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                yield paragraph[:cut]
                paragraph = paragraph[cut:].lstrip("\n")
            if paragraph.strip():
                yield paragraph


def train_tokenizer(model_prefix: PathLike, vocab_size: int = 2048) -> Path:
    """Trains a sentencepiece BPE tokenizer on the training split, deterministically.

    Llama's conventions (<unk> 0, <s> 1, </s> 2, byte fallback, split digits), but the text is not
    normalized and whitespace is kept as it is, newlines and indentation included, so decoding
    gives the original text back. One thread, a fixed input order and an in-memory writer (so no
    output path is recorded inside the model) make the file depend only on the corpus.

    Args:
        model_prefix: output path without suffix; ``<prefix>.model`` is written.
        vocab_size: pieces, including the 3 special and 256 byte pieces.

    Returns:
        the ``.model`` path.
    """
    import sentencepiece

    max_chars = 4000
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=paragraphs(python_docs_documents("train"), max_chars), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, max_sentence_length=4 * max_chars,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
    )
    path = Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m supra.data.python_docs``: corpus record, token shards, or a trained tokenizer."""
    parser = argparse.ArgumentParser(prog="python -m supra.data.python_docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("record", help="print the corpus record (Python version, sizes, SHA-256 per split)")
    shards = commands.add_parser("shards", help="write token shards of both splits")
    shards.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer.json (default: bytes)")
    shards.add_argument("--out", required=True, help="folder that gets train/ and heldout/")
    tok = commands.add_parser("tokenizer", help="train a sentencepiece tokenizer on the training split")
    tok.add_argument("--prefix", required=True, help="output path without .model")
    tok.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.command == "record":
        print(json.dumps(corpus_record(), indent=2))
    elif args.command == "shards":
        from supra.data.tokenize import load_tokenizer

        folders = prepare_python_docs(args.out, load_tokenizer(args.tokenizer) if args.tokenizer else None)
        for split, folder in folders.items():
            index = json.loads((folder / INDEX_FILE).read_text())
            print(f"{split}: {folder} ({index['num_tokens']:,} tokens, {index['num_documents']} documents)")
    else:
        print(f"wrote {train_tokenizer(args.prefix, args.vocab_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
