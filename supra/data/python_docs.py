"""A real English corpus that every Python installation ships: the documentation topics of
``pydoc_data`` (about 465 KB), with a byte-level tokenizer, for offline demos and tests."""

from pathlib import Path
from typing import Dict, List, Sequence, Union

from supra.data.shards import write_token_shards

HELDOUT_EVERY = 10


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) plus BOS (256) and EOS (257): nothing to train or download."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def python_docs_documents(split: str = "train") -> List[str]:
    """The pydoc topics in name order; every ``HELDOUT_EVERY``-th one is held out.

    Args:
        split: ``"train"``, ``"heldout"`` or ``"all"``.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    chosen = {
        "all": names,
        "train": [n for i, n in enumerate(names) if i % HELDOUT_EVERY],
        "heldout": [n for i, n in enumerate(names) if i % HELDOUT_EVERY == 0],
    }
    if split not in chosen:
        raise ValueError(f"split {split!r} is unknown; choose one of {sorted(chosen)}")
    return [topics[n] for n in chosen[split]]


def prepare_python_docs(out_dir: Union[str, Path]) -> Dict[str, Path]:
    """Writes byte-tokenized token shards of both splits (once; reused when present).

    Returns:
        {"train": folder, "heldout": folder}.
    """
    tokenizer = ByteTokenizer()
    folders = {}
    for split in ("train", "heldout"):
        folder = Path(out_dir) / split
        if not (folder / "index.json").exists():
            documents = (tokenizer.encode(d) for d in python_docs_documents(split))
            write_token_shards(documents, folder, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
        folders[split] = folder
    return folders
