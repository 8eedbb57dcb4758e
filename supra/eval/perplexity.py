"""Perplexity on held-out text, overall and by position in long sequences.

The loss at position t of a window is the model's loss given t tokens of context, so averaging it
over buckets of positions (0-64, 64-128, ..., 8k-16k) shows how far back the model actually uses
its context: a softmax model keeps improving with position, a decayed linear model stops improving
where its slowest decay has forgotten the start (``gamma_max^t`` small), and past its training
length it may even get worse.

Data (``data=``):

- ``"python_docs"``: the held-out split of supra's offline corpus (Python's pydoc topics and
  standard-library docstrings, ``supra.data.python_docs``), in the model's tokenizer (bytes when
  none is given).
- a token shard folder (``supra tokenize`` output, ``index.json`` inside).
- text files or folders (``.txt``, ``.jsonl``, ``.parquet``, ... as ``supra tokenize`` reads them),
  tokenized here with ``tokenizer``.

Windows are ``seq_len + 1`` consecutive tokens of the document stream (documents joined by EOS).
With ``single_document=True`` only windows inside one document are kept: what position curves
need, since a document boundary inside a window resets the useful context.
"""

import itertools
import math
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm import tqdm

from supra.data import TokenShardDataset
from supra.data.python_docs import ByteTokenizer, python_docs_documents
from supra.data.tokenize import expand_inputs, read_documents
from supra.eval._plot import pyplot, save_figure
from supra.eval.scoring import token_scores

PathLike = Union[str, Path]
PYTHON_DOCS = "python_docs"


def _shard_windows(folder: Path, seq_len: int, single_document: bool) -> Iterator[torch.Tensor]:
    dataset = TokenShardDataset(folder, seq_len, document_boundaries=single_document)
    for i in range(len(dataset)):
        item = dataset[i]
        # Positions restart at every document start inside the window; none means one document.
        if single_document and not torch.equal(item["positions"], torch.arange(seq_len)):
            continue
        yield torch.cat([item["tokens"], item["labels"][-1:]])


def _text_documents(data: Union[PathLike, Sequence[PathLike]], text_key: str) -> Iterator[str]:
    if data == PYTHON_DOCS:
        yield from python_docs_documents("heldout")
        return
    for path in expand_inputs(data):
        yield from read_documents(path, text_key)


def _text_windows(
    documents: Iterable[str], tokenizer: Any, seq_len: int, single_document: bool, add_bos: bool
) -> Iterator[torch.Tensor]:
    stream: List[int] = []
    for text in documents:
        ids = ([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode(text))
        if single_document:
            for start in range(0, len(ids) - seq_len, seq_len + 1):
                yield torch.tensor(ids[start : start + seq_len + 1])
            continue
        eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        stream.extend(ids + eos)
        while len(stream) >= seq_len + 1:
            yield torch.tensor(stream[: seq_len + 1])
            del stream[: seq_len + 1]


def eval_windows(
    data: Union[PathLike, Sequence[PathLike]],
    seq_len: int,
    *,
    tokenizer: Any = None,
    max_windows: Optional[int] = None,
    single_document: bool = False,
    add_bos: bool = False,
    text_key: str = "text",
) -> torch.Tensor:
    """Held-out token windows.

    Args:
        data: ``"python_docs"``, a token shard folder, or text files / folders (see the module doc).
        seq_len (int): tokens scored per window (each window holds ``seq_len + 1``).
        tokenizer: encodes text sources (``encode``, ``eos_id``, ``bos_id``); ``python_docs``
            defaults to ``ByteTokenizer``. Unused for shards.
        max_windows (Optional[int]): stop after this many windows (read lazily).
        single_document (bool): keep only windows that lie inside one document.
        add_bos (bool): text sources: put BOS before every document.
        text_key (str): the JSON field / parquet column of the text.

    Returns:
        torch.Tensor: [N, seq_len + 1] token ids.

    Raises:
        ValueError: for ``seq_len < 1``, a text source without a tokenizer, or no window at all
            (the message says how many tokens a window needs).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1; got {seq_len}")
    is_shards = data != PYTHON_DOCS and not isinstance(data, (list, tuple)) and (Path(data) / "index.json").is_file()
    if is_shards:
        windows = _shard_windows(Path(data), seq_len, single_document)
    else:
        if tokenizer is None and data == PYTHON_DOCS:
            tokenizer = ByteTokenizer()
        if tokenizer is None:
            raise ValueError(f"{data} is text (not a token shard folder): pass a tokenizer to encode it")
        windows = _text_windows(_text_documents(data, text_key), tokenizer, seq_len, single_document, add_bos)
    taken = list(itertools.islice(windows, max_windows))
    if not taken:
        inside = " inside one document" if single_document else ""
        raise ValueError(
            f"{data} has no window of {seq_len + 1} tokens{inside}; use a smaller seq_len or more (longer) documents"
        )
    return torch.stack(taken)


def window_losses(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    chunk_size: Optional[int] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Per-token negative log-likelihood of every window.

    Args:
        model (nn.Module): ``model(tokens) -> logits [B, T, V]``.
        windows (torch.Tensor): [N, T + 1] token ids.
        batch_size (int): windows per forward.
        chunk_size (Optional[int]): all-linear models carry the recurrent state over chunks of
            this many tokens (see ``supra.eval.scoring.token_scores``).
        progress (bool): tqdm bar over batches.

    Returns:
        torch.Tensor: [N, T] float32, the loss of predicting token t + 1 from tokens 0..t.
    """
    device = next(model.parameters()).device
    losses = []
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        logprobs, _ = token_scores(model, windows[start : start + batch_size].to(device), chunk_size=chunk_size)
        losses.append(-logprobs.cpu())
    return torch.cat(losses)


def perplexity(losses: torch.Tensor) -> Dict[str, float]:
    """``{"loss", "perplexity", "tokens"}``: mean NLL over every scored token, its exp, the count."""
    loss = float(losses.double().mean())
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(losses.numel())}


def position_buckets(seq_len: int, first: int = 64) -> List[Tuple[int, int]]:
    """Doubling position ranges ``[0, first), [first, 2 first), ...`` up to ``seq_len``.

    Raises:
        ValueError: for ``first < 1``.
    """
    if first < 1:
        raise ValueError(f"the first bucket must hold at least 1 position; got first={first}")
    edges = [0]
    end = first
    while end < seq_len:
        edges.append(end)
        end *= 2
    edges.append(seq_len)
    return list(zip(edges[:-1], edges[1:]))


def bucket_losses(losses: torch.Tensor, buckets: Sequence[Tuple[int, int]]) -> List[Dict[str, float]]:
    """Mean loss of the positions in each bucket, over every window.

    Args:
        losses (torch.Tensor): [N, T] from ``window_losses``.
        buckets: ``(start, end)`` position ranges within ``[0, T)``.

    Returns:
        List[dict]: per bucket ``{"start", "end", "loss", "perplexity", "tokens"}``.

    Raises:
        ValueError: for an empty bucket or one outside ``[0, T)``.
    """
    rows = []
    for start, end in buckets:
        if not 0 <= start < end <= losses.shape[1]:
            raise ValueError(f"position bucket [{start}, {end}) must be non-empty and inside [0, {losses.shape[1]})")
        rows.append({"start": start, "end": end, **perplexity(losses[:, start:end])})
    return rows


def format_buckets(rows: Sequence[Dict[str, float]]) -> str:
    """A text table of ``bucket_losses`` rows."""
    lines = [f"{'positions':>15} {'tokens':>10} {'loss':>8} {'ppl':>10}"]
    for row in rows:
        span = f"{row['start']}-{row['end']}"
        lines.append(f"{span:>15} {row['tokens']:>10} {row['loss']:>8.4f} {row['perplexity']:>10.3f}")
    return "\n".join(lines)


def plot_position_losses(curves: Dict[str, Sequence[Dict[str, float]]], path: PathLike) -> Path:
    """Loss by position bucket (log-scale positions), one line per model label; saved to ``path``.

    Raises:
        ValueError: when matplotlib is missing (``pip install matplotlib``).
    """
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4))
    for label, rows in curves.items():
        centers = [max(1.0, (row["start"] + row["end"]) / 2) for row in rows]
        axis.plot(centers, [row["loss"] for row in rows], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("position in the sequence (bucket centre, tokens)")
    axis.set_ylabel("mean loss (nats / token)")
    axis.set_title("Loss by position")
    axis.grid(alpha=0.3)
    axis.legend()
    return save_figure(figure, path)

