"""Training metrics: a JSONL log (plus optional TensorBoard / Weights & Biases), a console
progress bar, and a throughput / MFU meter."""

import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Union

import torch
from tqdm import tqdm

# Key names shared by Throughput (which produces them) and ProgressBar (which shows them).
TOKENS_PER_S = "tokens_per_s"
TOKENS_PER_S_PER_RANK = "tokens_per_s_per_rank"
MFU_PCT = "mfu_pct"

_SIGNIFICANT_DIGITS = 6


def _scalar(key: str, value: Any) -> Union[int, float, bool, str]:
    """A JSON-ready scalar: tensors and numpy scalars unwrapped, floats to 6 significant digits."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(
                f"metric {key!r} must be a scalar; got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    elif hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return float(f"{value:.{_SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else value
    raise ValueError(
        f"metric {key!r} must be a number, a string or a 1-element tensor; got {type(value).__name__}"
    )


def _import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "tensorboard_dir is set but TensorBoard is not installed: pip install 'supra-lm[tensorboard]' "
            "(or pip install tensorboard), or leave tensorboard_dir unset"
        ) from error
    return SummaryWriter


def _import_wandb():
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            "wandb is configured but Weights & Biases is not installed: pip install 'supra-lm[wandb]' "
            "(or pip install wandb), or set wandb to None"
        ) from error
    return wandb


class MetricLogger:
    """Logs metrics to ``{output_dir}/metrics.jsonl`` and optionally TensorBoard and W&B.

    Each ``log`` call appends one JSON object ``{"step": ..., <metrics>, "timestamp": ...}`` and
    flushes it, so the file is readable while training runs and a resumed run continues the same
    file. Steps logged after the last checkpoint of a crashed run appear twice; readers should
    keep the last line of each step. Floats keep 6 significant digits; NaN and infinities are
    written as Python's ``json`` does (``NaN``, ``Infinity``).

    Only rank 0 writes. Every rank checks that the configured backends can be imported, so a
    missing package fails on all ranks alike instead of leaving the others waiting.

    Args:
        output_dir (str | os.PathLike): folder of the JSONL file (created if missing).
        rank (int): this process's global rank; ranks other than 0 log nothing.
        tensorboard_dir (Optional[str | os.PathLike]): TensorBoard log folder; None for none.
            Needs the ``tensorboard`` extra.
        wandb (Optional[dict]): keyword arguments of ``wandb.init`` (``project``, ``name``,
            ``config``, and ``id`` + ``resume="allow"`` to continue a run); None for none. Needs
            the ``wandb`` extra.
        filename (str): name of the JSONL file.

    Raises:
        ImportError: if a configured backend is not installed (names the pip extra).
    """

    def __init__(
        self,
        output_dir: Union[str, os.PathLike],
        *,
        rank: int = 0,
        tensorboard_dir: Optional[Union[str, os.PathLike]] = None,
        wandb: Optional[Dict[str, Any]] = None,
        filename: str = "metrics.jsonl",
    ) -> None:
        summary_writer = _import_summary_writer() if tensorboard_dir is not None else None
        wandb_module = _import_wandb() if wandb is not None else None
        self.enabled = rank == 0
        self.path = os.path.join(os.fspath(output_dir), filename)
        self._file = None
        self._tensorboard = None
        self._wandb_run = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if summary_writer is not None:
            self._tensorboard = summary_writer(log_dir=os.fspath(tensorboard_dir))
        if wandb_module is not None:
            self._wandb_run = wandb_module.init(**wandb)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        """Writes one record.

        Args:
            step (int): the training step the metrics belong to.
            metrics (dict): name -> number, string or 1-element tensor (reading a CUDA tensor
                synchronizes, so log every few steps rather than every step).

        Raises:
            ValueError: for a metric named ``step`` or a value that is not a scalar.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricLogger.log called after close()")
        if "step" in metrics:
            raise ValueError("metrics may not contain a key named 'step': it is the step argument")
        values = {key: _scalar(key, value) for key, value in metrics.items()}
        record = {"step": int(step), **values}
        record.setdefault("timestamp", round(time.time(), 3))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, global_step=int(step))
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))

    def close(self) -> None:
        """Flushes and closes every backend; later calls do nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProgressBar:
    """A tqdm progress bar on stderr with the ETA and the latest loss, lr and tokens/s.

    Args:
        total_steps (int): steps of the whole run.
        initial_step (int): steps already done (when resuming); the ETA counts only new ones.
        enabled (bool): False (e.g. on ranks other than 0) shows nothing.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True) -> None:
        self._bar = tqdm(
            total=total_steps, initial=initial_step, file=sys.stderr, disable=not enabled,
            dynamic_ncols=True, unit="step", smoothing=0.05,
        )

    def update(self, step: int, metrics: Optional[Dict[str, Any]] = None) -> None:
        """Moves the bar to ``step`` steps done and shows the known metrics.

        Args:
            step (int): number of completed steps.
            metrics (Optional[dict]): shows ``loss``, ``lr``, ``tokens_per_s`` (as tok/s) and
                ``mfu_pct`` when present; other keys are ignored.
        """
        if metrics:
            self._bar.set_postfix_str(_postfix(metrics), refresh=False)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        else:
            self._bar.refresh()

    def close(self) -> None:
        """Closes the bar (leaves its last state on screen)."""
        self._bar.close()


def _postfix(metrics: Dict[str, Any]) -> str:
    parts = []
    formats = (("loss", "loss", "{:.4f}"), ("lr", "lr", "{:.3g}"), (TOKENS_PER_S, "tok/s", "{:,.0f}"),
               (MFU_PCT, "mfu", "{:.1f}%"))
    for key, label, fmt in formats:
        if key in metrics:
            value = metrics[key]
            value = value.item() if hasattr(value, "item") else value
            parts.append(f"{label}={fmt.format(value)}")
    return ", ".join(parts)


class Throughput:
    """Tokens per second (this rank and all ranks) and MFU between two ``compute`` calls.

    Count the input tokens each forward pass processes (padding and ignored labels included:
    they cost compute). On GPU, call ``compute`` after something has synchronized (such as
    reading the loss) so the wall time covers finished work.

    Args:
        world_size (int): number of data-parallel ranks, used when ``add`` gets no global count.
        flops_per_token (Optional[float]): training FLOPs per token (``flops_per_token``).
        peak_flops (Optional[float]): peak FLOP/s of one device (``device_peak_flops``); MFU is
            reported only when both are given.
        clock (Callable[[], float]): time source in seconds.

    Raises:
        ValueError: if ``world_size`` < 1.
    """

    def __init__(
        self,
        *,
        world_size: int = 1,
        flops_per_token: Optional[float] = None,
        peak_flops: Optional[float] = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1; got {world_size}")
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Starts a new window now (e.g. after the first, compiling step)."""
        self._start_window(self._clock())

    def _start_window(self, now: float) -> None:
        self._start = now
        self._tokens = 0
        self._global_tokens = 0

    def add(
        self,
        num_tokens: Union[int, torch.Tensor],
        global_num_tokens: Optional[Union[int, torch.Tensor]] = None,
    ) -> None:
        """Counts tokens processed since the last ``compute``.

        Args:
            num_tokens (int | torch.Tensor): tokens this rank processed (tensors are read only
                at ``compute``, so no synchronization here).
            global_num_tokens (Optional[int | torch.Tensor]): tokens all ranks processed, when
                known; otherwise ``num_tokens * world_size`` is assumed.
        """
        self._tokens = self._tokens + num_tokens
        if global_num_tokens is not None:
            self._global_tokens = self._global_tokens + global_num_tokens
        else:
            self._global_tokens = self._global_tokens + num_tokens * self.world_size

    def compute(self) -> Dict[str, float]:
        """Rates over the window since the last call (or ``reset``), then starts a new window.

        Returns:
            dict: ``tokens_per_s`` (all ranks), ``tokens_per_s_per_rank`` (this rank) and, when
            FLOPs are known, ``mfu_pct`` (percent of the peak, averaged over devices).
        """
        now = self._clock()
        elapsed = now - self._start
        tokens, global_tokens = float(self._tokens), float(self._global_tokens)
        self._start_window(now)
        if elapsed <= 0:
            return {TOKENS_PER_S: 0.0, TOKENS_PER_S_PER_RANK: 0.0}
        result = {TOKENS_PER_S: global_tokens / elapsed, TOKENS_PER_S_PER_RANK: tokens / elapsed}
        if self.flops_per_token is not None and self.peak_flops:
            per_device = result[TOKENS_PER_S] / self.world_size
            result[MFU_PCT] = 100.0 * self.flops_per_token * per_device / self.peak_flops
        return result
