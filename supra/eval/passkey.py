"""Passkey retrieval: a number hidden at a chosen depth in filler text of a chosen length.

The prompt (Mohtashami & Jaggi's, as in the long-context literature) is an instruction, filler
sentences, the needle "The pass key is 12345. Remember it. 12345 is the pass key." at a fraction
``depth`` of the filler (0: first, 1: last), more filler, and "What is the pass key? The pass key
is". A trial succeeds when greedy decoding continues with exactly the key's tokens; that is
checked in one parallel (chunked) forward over prompt + key, since greedy decoding reproduces
the key exactly when the key's every token is the argmax given the prompt and the key's earlier
tokens. Accuracy is reported as a grid of prompt length x depth.
"""

import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from supra.eval._plot import pyplot, save_figure
from supra.eval.scoring import score_continuations

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there. "
)
# Filler is these sentences in a cycle, as many as fit: a sentence is a few tokens, so prompts
# land close to the length asked for.
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def _filler(start: int, count: int) -> str:
    return "".join(FILLER[i % len(FILLER)] for i in range(start, start + count))


def passkey_text(num_filler: int, depth: float, key: str) -> str:
    """The prompt text with ``num_filler`` filler sentences and the needle after ``round(depth * num_filler)``.

    Raises:
        ValueError: for a depth outside [0, 1] or a negative ``num_filler``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction in [0, 1] (0: needle first, 1: needle last); got {depth}")
    if num_filler < 0:
        raise ValueError(f"num_filler must be >= 0; got {num_filler}")
    before = round(depth * num_filler)
    return INTRO + _filler(0, before) + NEEDLE.format(key=key) + _filler(before, num_filler - before) + QUESTION


def passkey_example(
    tokenizer: Any, length: int, depth: float, key: str, *, add_bos: bool = False
) -> Tuple[List[int], List[int]]:
    """Prompt and answer tokens, with as many filler sentences as fit in ``length`` prompt tokens.

    Args:
        tokenizer: ``encode(text) -> ids`` (and ``bos_id`` with ``add_bos``).
        length (int): the target prompt length in tokens (the prompt is at most this long, and
            shorter by less than one filler sentence).
        depth (float): where the needle goes, as a fraction of the filler.
        key (str): the digits to retrieve.
        add_bos (bool): start the prompt with BOS.

    Returns:
        Tuple[List[int], List[int]]: prompt ids and the ids of " <key>" after it.

    Raises:
        ValueError: when ``length`` cannot hold the instruction, needle and question.
    """
    bos = [tokenizer.bos_id] if add_bos else []
    fixed = len(bos) + len(tokenizer.encode(passkey_text(0, depth, key)))
    if length < fixed:
        raise ValueError(f"length {length} is shorter than the passkey prompt without filler ({fixed} tokens); use length >= {fixed}")
    per_sentence = len(tokenizer.encode(_filler(0, 5 * len(FILLER)))) / (5 * len(FILLER))

    def prompt_of(num_filler: int) -> List[int]:
        return bos + list(tokenizer.encode(passkey_text(num_filler, depth, key)))

    # Token counts of joined text are not exactly additive: adjust the estimate to the most that fit.
    num_filler = int((length - fixed) / per_sentence)
    while num_filler > 0 and len(prompt_of(num_filler)) > length:
        num_filler -= 1
    while len(prompt_of(num_filler + 1)) <= length:
        num_filler += 1
    prompt, text = prompt_of(num_filler), passkey_text(num_filler, depth, key)
    whole = bos + list(tokenizer.encode(text + " " + key))
    if whole[: len(prompt)] != prompt:
        raise ValueError(f"this tokenizer encodes the prompt differently when the key follows it; cannot split off the key {key!r}")
    return prompt, whole[len(prompt):]


def passkey_grid(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    trials: int = 5,
    digits: int = 5,
    seed: int = 0,
    add_bos: bool = False,
    batch_size: int = 1,
    chunk_size: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Passkey accuracy for every (length, depth), over ``trials`` random keys each.

    Args:
        model (nn.Module): ``model(tokens) -> logits [B, T, V]``.
        tokenizer: encodes the prompts.
        lengths: prompt lengths in tokens.
        depths: needle depths, fractions in [0, 1].
        trials (int): random keys per cell.
        digits (int): digits of each key.
        seed (int): the keys depend on it and the cell only.
        add_bos (bool): start prompts with BOS.
        batch_size (int): prompts per forward.
        chunk_size (Optional[int]): see ``supra.eval.scoring.token_scores``.
        progress (bool): tqdm bar over batches.

    Returns:
        dict: ``{"lengths", "depths", "accuracy": [[acc per depth] per length], "trials",
        "examples": [{"length", "depth", "key", "prompt_tokens", "correct"}, ...]}``.

    Raises:
        ValueError: for ``trials < 1``, ``digits < 1`` or a length too short for the prompt.
    """
    if trials < 1 or digits < 1:
        raise ValueError(f"trials and digits must be >= 1; got trials={trials}, digits={digits}")
    examples, sequences = [], []
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}-{length}-{depth}")
            for _ in range(trials):
                key = str(rng.randrange(10 ** (digits - 1), 10**digits))
                prompt, answer = passkey_example(tokenizer, int(length), float(depth), key, add_bos=add_bos)
                examples.append({"length": int(length), "depth": float(depth), "key": key, "prompt_tokens": len(prompt)})
                sequences.append((prompt + answer, len(answer)))
    scores = score_continuations(model, sequences, batch_size=batch_size, chunk_size=chunk_size, progress=progress)
    for example, (_, greedy) in zip(examples, scores):
        example["correct"] = greedy
    accuracy = [
        [sum(e["correct"] for e in examples if e["length"] == length and e["depth"] == depth) / trials for depth in depths]
        for length in lengths
    ]
    return {"lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths], "accuracy": accuracy,
            "trials": trials, "examples": examples}


def format_grid(grid: Dict[str, Any]) -> str:
    """The accuracy grid as text: one row per depth, one column per length."""
    header = "depth \\ length " + "".join(f"{n:>9}" for n in grid["lengths"])
    rows = [header]
    for j, depth in enumerate(grid["depths"]):
        rows.append(f"{depth:>15.2f}" + "".join(f"{grid['accuracy'][i][j]:>9.2f}" for i in range(len(grid["lengths"]))))
    return "\n".join(rows)


def plot_grid(grid: Dict[str, Any], path: Union[str, Path], title: str = "Passkey retrieval accuracy") -> Path:
    """A heatmap of the grid (depth down, length across), saved to ``path``.

    Raises:
        ValueError: when matplotlib is missing.
    """
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(grid["lengths"]), 1.2 + 0.6 * len(grid["depths"])))
    values = [[grid["accuracy"][i][j] for i in range(len(grid["lengths"]))] for j in range(len(grid["depths"]))]
    image = axis.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    axis.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
    axis.set_yticks(range(len(grid["depths"])), [f"{d:.2f}" for d in grid["depths"]])
    axis.set_xlabel("prompt length (tokens)")
    axis.set_ylabel("needle depth")
    axis.set_title(title)
    for j, row in enumerate(values):
        for i, value in enumerate(row):
            axis.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axis)
    return save_figure(figure, path)
