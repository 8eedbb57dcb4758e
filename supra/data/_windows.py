"""The item every supra dataset yields: one window of ``seq_len + 1`` tokens as model inputs and
next-token labels, with per-token positions."""

from typing import Dict, Optional

import numpy as np
import torch


def window_positions(seq_len: int, starts: Optional[np.ndarray]) -> np.ndarray:
    """Positions of ``seq_len`` input tokens that restart at 0 at each document start.

    Args:
        seq_len: number of input tokens in the window.
        starts: offsets (in ``[0, seq_len)``) of the document starts inside the window, or None for
            one segment. The window's first token always starts a segment, so positions never exceed
            ``seq_len - 1`` (a document that began before the window counts from the window start).

    Returns:
        int64 array [seq_len].
    """
    index = np.arange(seq_len, dtype=np.int64)
    if starts is None or len(starts) == 0:
        return index
    is_start = np.zeros(seq_len, dtype=bool)
    is_start[0] = True
    is_start[np.asarray(starts, dtype=np.int64)] = True
    last_start = np.maximum.accumulate(np.where(is_start, index, 0))
    return index - last_start


def make_item(window: np.ndarray, starts: Optional[np.ndarray] = None) -> Dict[str, torch.Tensor]:
    """Turns a window of ``seq_len + 1`` token ids into the item dict of supra datasets.

    Args:
        window: integer array [seq_len + 1].
        starts: document starts inside the input part of the window (see ``window_positions``).

    Returns:
        ``{"tokens": window[:-1], "labels": window[1:], "positions": ...}``, each a LongTensor
        [seq_len]. Labels are never masked: at a document boundary the last token of one document
        (its EOS) predicts the first token of the next.
    """
    window = np.asarray(window, dtype=np.int64)
    seq_len = len(window) - 1
    return {
        "tokens": torch.from_numpy(window[:-1].copy()),
        "labels": torch.from_numpy(window[1:].copy()),
        "positions": torch.from_numpy(window_positions(seq_len, starts)),
    }
