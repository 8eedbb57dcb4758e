"""Uptrain a linearized (SUPRA) model, or pretrain a linear one from scratch.

    supra run uptrain --config tiny/uptrain [key=value ...]
    supra run uptrain --nproc-per-node 8 --config mistral_7b/uptrain data.path=/data/shards

One process on a CPU, many GPUs, or many nodes (torchrun): FSDP2 shards every block when there
is more than one process. The config keys and their defaults are ``DEFAULTS`` below; the swappable
parts (model, linearize, optimizer, scheduler, loss, metric_logger) are ``COMPONENTS``: sections
whose ``_component_`` names any importable callable, built with torchtune's ``config.instantiate``.
"""

import contextlib
import errno
import fcntl
import inspect
import itertools
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torchtune import config as tune_config
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from supra.checkpoint import SUPRA_CONFIG, save_checkpoint
from supra.checkpoint._io import iter_tensors, read_json, sha256_file, verify_sha256, weight_files
from supra.config import COMPONENT_KEY, Component, Rule, import_component, parse_recipe_args, resolve_path, to_dict
from supra.loading import DTYPES
from supra.convert import new_parameter_names
from supra.modules import is_linear_layer
from supra.data import (
    load_tokenizer,
    save_tokenizer_files,
    InfiniteLoader,
    OpenLMWebDataset,
    TextDataset,
    TokenShardDataset,
    build_dataloader,
    cu_seqlens_from_positions,
)
from supra.data.python_docs import prepare_python_docs
from supra.training.flops import device_peak_flops, flops_per_token
from supra.training.loss import lm_loss
from supra.training.metrics import ProgressBar, Throughput
from supra.training.optim import FreezeSchedule, build_param_groups
from supra.training.parallel import init_distributed, parallelize

logger = logging.getLogger("supra.uptrain")

DEFAULTS: Dict[str, Any] = {
    "output_dir": "outputs/uptrain",
    "seed": 0,
    "device": "auto",
    "mixed_precision": "bf16",
    "dtype": "fp32",
    "data": {"type": "shards", "path": None, "files": [], "tokenizer": None, "text_key": "text", "seq_len": 2048,
             "document_boundaries": False, "num_workers": 0, "heldout_path": None},
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_steps": 1000,
    "new_lr": None,
    "freeze_pretrained": {"enabled": False, "until_step": None},
    "clip_grad_norm": 1.0,
    "compile": False,
    "activation_checkpointing": False,
    "fsdp": {"reshard_after_forward": True},
    "log_every_n_steps": 1,
    "eval_every_n_steps": None,
    "eval_batches": 4,
    "eval_before_training": False,
    "save_every_n_steps": 500,
    "keep_last_n_checkpoints": 2,
    "resume": False,
    "stop_after_n_steps": None,
    "collective_timeout_s": 1800,
}
# The swappable parts: each a section naming a ``_component_`` (a dotted path to any importable
# callable) with its arguments, checked against the callable's signature when the config loads and
# built with torchtune's ``config.instantiate``. The recipe passes what ``positional`` and
# ``supplied`` say (the model to linearize, the parameter groups to the optimizer, ...).
COMPONENTS: Dict[str, Component] = {
    # A loader (supra.checkpoint.load_checkpoint with its path) or a builder (supra.models.supra_decoder
    # with its arguments); its result is cast to ``dtype``.
    "model": Component(),
    # Called as linearize(model, **arguments); layers defaults to the model's softmax layers. Null:
    # train the model as it is (pretraining, or a model that is already linear).
    "linearize": Component({"_component_": "supra.convert.linearize"}, positional=1, nullable=True),
    # Called with the parameter groups (pretrained / new, with / without weight decay): each group
    # gets ``lr`` (``new_lr`` for the new parameters) and ``weight_decay`` from this section.
    "optimizer": Component({"_component_": "torch.optim.AdamW", "lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8,
                            "weight_decay": 0.1}, positional=1),
    "scheduler": Component({"_component_": "supra.training.schedule.cosine_with_warmup", "warmup_steps": 1000,
                            "min_lr": 1e-5}, positional=1, supplied=("max_steps",)),
    # Called as loss(logits, labels) -> supra.training.loss.LossParts.
    "loss": Component({"_component_": "supra.training.loss.LMLoss"}),
    "metric_logger": Component({"_component_": "supra.training.metrics.MetricLogger"}, positional=1, supplied=("rank",)),
}
FREE_FORM = ()
# What the defaults' types do not say: ranges, choices, and the keys that may be null (for a
# component's arguments, ``section.argument``: checked when the config gives them).
RULES: Dict[str, Rule] = {
    "seed": Rule(int, low=0),
    "mixed_precision": Rule(choices=DTYPES),
    "dtype": Rule(choices=DTYPES),
    "model.path": Rule(str),
    "linearize.layers": Rule(list, nullable=True),
    "linearize.decay_start": Rule(float, low=0, nullable=True),
    "linearize.feature_dim": Rule(int, low=1, nullable=True),
    "data.type": Rule(choices=["shards", "open_lm", "text", "python_docs"]),
    "data.path": Rule(str, nullable=True),
    "data.tokenizer": Rule(str, nullable=True),
    "data.seq_len": Rule(int, low=1),
    "data.num_workers": Rule(int, low=0),
    "data.heldout_path": Rule(str, nullable=True),
    "batch_size": Rule(int, low=1),
    "gradient_accumulation_steps": Rule(int, low=1),
    "max_steps": Rule(int, low=1),
    "optimizer.lr": Rule(float, low=0, low_open=True),
    "new_lr": Rule(float, low=0, low_open=True, nullable=True),
    "optimizer.eps": Rule(float, low=0, low_open=True),
    "optimizer.weight_decay": Rule(float, low=0),
    "freeze_pretrained.until_step": Rule(int, low=0, nullable=True),
    "scheduler.warmup_steps": Rule(int, low=0),
    "scheduler.min_lr_ratio": Rule(float, low=0, high=1, nullable=True),
    "scheduler.min_lr": Rule(float, low=0),
    "clip_grad_norm": Rule(float, low=0, low_open=True, nullable=True),
    "loss.z_loss_weight": Rule(float, low=0),
    "log_every_n_steps": Rule(int, low=1),
    "eval_every_n_steps": Rule(int, low=1, nullable=True),
    "eval_batches": Rule(int, low=1, nullable=True),
    "save_every_n_steps": Rule(int, low=1),
    "keep_last_n_checkpoints": Rule(int, low=1),
    "stop_after_n_steps": Rule(int, low=1, nullable=True),
    "metric_logger.tensorboard_dir": Rule(str, nullable=True),
    "collective_timeout_s": Rule(float, low=0, low_open=True),
}
# Keys a resumed run may change (dotted prefixes): they decide how long, how often and where the
# run logs, evaluates and saves, not what it trains. Any other change is refused on resume.
SAFE_TO_CHANGE_ON_RESUME = (
    "output_dir", "device", "resume", "max_steps", "stop_after_n_steps", "log_every_n_steps", "eval_every_n_steps",
    "eval_batches", "eval_before_training", "data.heldout_path", "data.num_workers", "save_every_n_steps",
    "keep_last_n_checkpoints", "metric_logger", "compile", "activation_checkpointing", "fsdp", "collective_timeout_s",
)
MANIFEST = "sha256.json"
# Tokenizer files a checkpoint folder may carry (the generate recipe looks for them there).
TEACHER_LABEL = "teacher (softmax)"


class UptrainRecipe:
    """setup() -> train() -> cleanup(); save_checkpoint() every ``save_every_n_steps``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed(timeout_s=cfg.collective_timeout_s)
        if cfg.device != "auto":
            self.device = torch.device(cfg.device)
        self.output_dir = Path(cfg.output_dir)
        self.step = 0
        # (name, loss) of the held-out evaluations, in order, for the summary at the end.
        self.heldout_losses: List["tuple[str, float]"] = []
        self.heldout_tokens = 0
        self.last_saved: Optional[Path] = None
        # The newest checkpoint whose weights no loss has been computed from yet: it is called good
        # (and older ones pruned) only once the next step's loss is finite.
        self.unconfirmed: Optional[Path] = None
        self.lock = None

    # ----- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        """Validates everything that can fail, then builds model, data, optimizer and loggers."""
        cfg = self.cfg
        self._validate()
        self._lock_output_dir()
        resume_from = self._resume_checkpoint() if cfg.resume else None
        _seed_everything(cfg.seed)
        self.train_data = self._dataset("train")
        needs_heldout = cfg.eval_every_n_steps or cfg.eval_before_training
        self.heldout_data = self._dataset("heldout") if needs_heldout else None
        self.tokenizer_source = self._tokenizer_source()
        self.model = self._build_model()
        self._check_vocab(self.train_data)
        self.new_names = new_parameter_names(self.model)
        new_names = set(self.new_names)
        # Counted before parallelize: its wrappers rename parameters.
        self.new_param_count = sum(p.numel() for n, p in self.model.named_parameters() if n in new_names)
        frozen = [n for n, _ in self.model.named_parameters() if n not in new_names]
        self.freeze = None
        if cfg.freeze_pretrained.enabled:
            self.freeze = FreezeSchedule(self.model, frozen_names=frozen, unfreeze_at_step=cfg.freeze_pretrained.until_step)
        self.flops_per_token = flops_per_token(self.model, cfg.data.seq_len)
        param_dtype = DTYPES[cfg.mixed_precision] if self.device.type == "cuda" else None
        self.model = parallelize(
            self.model, device=self.device, world_size=self.world_size,
            activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
            param_dtype=param_dtype, reshard_after_forward=cfg.fsdp.reshard_after_forward,
        )
        groups = build_param_groups(
            self.model, lr=_argument(cfg.optimizer, "lr"), new_lr=cfg.new_lr,
            weight_decay=_argument(cfg.optimizer, "weight_decay"), new_param_names=self.new_names, include_frozen=True,
        )
        self.optimizer = tune_config.instantiate(cfg.optimizer, groups)
        self.scheduler = tune_config.instantiate(cfg.scheduler, self.optimizer, max_steps=cfg.max_steps)
        self.loss_fn = tune_config.instantiate(cfg.loss)
        self.loader = build_dataloader(
            self.train_data, batch_size=cfg.batch_size, rank=self.rank, world_size=self.world_size,
            seed=cfg.seed, num_workers=cfg.data.num_workers,
        )
        self.batches = InfiniteLoader(self.loader)
        if resume_from is not None:
            self._resume(resume_from)
        self.metrics = tune_config.instantiate(cfg.metric_logger, self.output_dir, rank=self.rank)
        self.throughput = Throughput(
            world_size=self.world_size, flops_per_token=self.flops_per_token,
            peak_flops=device_peak_flops(self.device, DTYPES[cfg.mixed_precision]) if self.device.type == "cuda" else None,
        )
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, self.output_dir / "config.yaml")
            params = sum(p.numel() for p in self.model.parameters())
            logger.info("model: %s parameters (%s in %d new tensors); %d process(es) on %s", f"{params:,}",
                        f"{self.new_param_count:,}", len(self.new_names), self.world_size, self.device.type)
        if cfg.eval_before_training and self.step == 0:
            self._log_start_losses()

    def _validate(self) -> None:
        """Bad input fails here, before any training step."""
        cfg = self.cfg
        path = cfg.model.get("path")
        if path is not None and not resolve_path(path).exists():
            raise ValueError(f"model.path {path} does not exist")
        warmup_steps = cfg.scheduler.get("warmup_steps")
        if isinstance(warmup_steps, int) and warmup_steps >= cfg.max_steps and self.rank == 0:
            # Shortened runs (smoke tests) are common: train on the warmup ramp, and say so once.
            logger.warning(
                "max_steps (%d) is reached before warmup ends (scheduler.warmup_steps = %d): the learning "
                "rate never leaves warmup", cfg.max_steps, warmup_steps,
            )
        if cfg.data.type == "open_lm" and cfg.data.document_boundaries:
            raise ValueError("data.document_boundaries is not supported with data.type open_lm (its samples carry no document offsets)")

    def _dataset(self, split: str):
        """The training (or held-out) dataset named by ``data.type``."""
        data = self.cfg.data
        seq_len, boundaries = data.seq_len, data.document_boundaries
        if data.type == "python_docs":
            tokenizer = load_tokenizer(resolve_path(data.tokenizer)) if data.tokenizer is not None else None
            # Rank 0 writes the shards; the others read them once they exist.
            if self.rank == 0:
                prepare_python_docs(self.output_dir / "data", tokenizer)
            _barrier()
            folders = prepare_python_docs(self.output_dir / "data", tokenizer)
            return TokenShardDataset(folders[split], seq_len, document_boundaries=boundaries)
        path = data.path if split == "train" else data.heldout_path
        if split == "heldout" and path is None:
            raise ValueError("eval_every_n_steps and eval_before_training need data.heldout_path (held-out data in the "
                             "same format); set it, or set both to null / false")
        if data.type == "shards":
            _require_path(path, "data.path" if split == "train" else "data.heldout_path")
            return TokenShardDataset(path, seq_len, document_boundaries=boundaries)
        if data.type == "open_lm":
            _require_path(path, "data.path" if split == "train" else "data.heldout_path")
            return OpenLMWebDataset(path, seq_len)
        if data.type == "text":
            files = list(data.files) if split == "train" else [path]
            for file in files:
                _require_path(file, "data.files")
            if data.tokenizer is None:
                raise ValueError("data.type 'text' needs data.tokenizer (a sentencepiece .model or HF tokenizer.json)")
            return TextDataset(files, load_tokenizer(resolve_path(data.tokenizer)), seq_len, text_key=data.text_key,
                               document_boundaries=boundaries)
        raise ValueError(f"data.type {data.type!r} is unknown; choose one of ['shards', 'open_lm', 'text', 'python_docs']")

    def _tokenizer_source(self) -> Optional[Path]:
        """The tokenizer saved beside every checkpoint's model (``save_tokenizer_files``), so the
        generate recipe finds it: ``data.tokenizer`` when the data is tokenized with it, else the
        one in the checkpoint the model loads from (``model.path``)."""
        cfg = self.cfg
        if cfg.data.tokenizer is not None and cfg.data.type in ("text", "python_docs"):
            return resolve_path(cfg.data.tokenizer)
        if cfg.model.get("path") is not None:
            return resolve_path(cfg.model.path)
        return None

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        # A loader that casts while it reads (load_checkpoint) keeps peak host memory near one copy
        # in the training dtype; a model built otherwise is cast once built.
        loader = import_component(cfg.model[COMPONENT_KEY], "model")
        casts = "dtype" in inspect.signature(loader).parameters and "dtype" not in cfg.model
        model = tune_config.instantiate(cfg.model, **({"dtype": dtype} if casts else {})).to(dtype)
        softmax = [i for i, layer in enumerate(model.layers) if not is_linear_layer(layer)]
        if cfg.linearize is not None and softmax:
            if cfg.eval_before_training and not cfg.resume:
                # The softmax model's own loss: the target that uptraining should recover.
                self.heldout_losses.append((TEACHER_LABEL, self.evaluate(model.to(self.device))))
            layers = {} if cfg.linearize.get("layers") is not None else {"layers": softmax}
            tune_config.instantiate(cfg.linearize, model, **layers)
        return model.to(self.device).train()

    def _check_vocab(self, dataset) -> None:
        vocab = getattr(dataset, "vocab_size", None)
        embeddings = self.model.tok_embeddings.num_embeddings
        if vocab is not None and vocab > embeddings:
            raise ValueError(
                f"the data's tokenizer has a vocabulary of {vocab} ids but the model embeds only {embeddings}: "
                "use the model's own tokenizer"
            )
        if isinstance(dataset, TokenShardDataset):
            largest, shard = dataset.max_token_id()
            if largest >= embeddings:
                raise ValueError(f"{shard} holds token id {largest}, but the model embeds only {embeddings} ids: the "
                                 "shard is damaged or was written for another tokenizer; write it again")

    # ----- training ----------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        bar = ProgressBar(cfg.max_steps, initial_step=self.step, enabled=self.rank == 0)
        # stop_after_n_steps ends this run early (a job time limit); resume=true continues it.
        last_step = cfg.max_steps if cfg.stop_after_n_steps is None else min(cfg.max_steps, self.step + cfg.stop_after_n_steps)
        while self.step < last_step:
            if self.freeze is not None:
                self.freeze.step(self.step)
            with self._naming_timeouts():
                metrics = self._train_step()
            if self.unconfirmed is not None:
                # The newest checkpoint's weights gave a finite loss: it is good, older ones may go.
                self._prune_checkpoints()
            self.step += 1
            done = self.step == cfg.max_steps
            log_now = self.step % cfg.log_every_n_steps == 0 or done
            eval_now = bool(cfg.eval_every_n_steps) and (self.step % cfg.eval_every_n_steps == 0 or done)
            if log_now:
                metrics.update(self.throughput.compute())
            if eval_now:
                metrics["heldout_loss"] = self.evaluate()
                if self.step == last_step:
                    self.heldout_losses.append((f"after {self.step} steps", metrics["heldout_loss"]))
            if log_now or eval_now:
                self.metrics.log(self.step, metrics)
                bar.update(self.step, metrics)
            if self.step % cfg.save_every_n_steps == 0 or self.step == last_step:
                with self._naming_timeouts():
                    self.save_checkpoint()
        if self.unconfirmed is not None:
            # No next step in this run; a resumed run checks it with its first loss.
            self._prune_checkpoints()
        bar.close()

    @contextlib.contextmanager
    def _naming_timeouts(self):
        """Turns a collective that timed out into an error naming this rank and the step."""
        try:
            yield
        except RuntimeError as error:
            text = str(error).lower()
            if self.world_size == 1 or ("timed out" not in text and "timeout" not in text):
                raise
            raise RuntimeError(
                f"rank {self.rank}: a collective operation timed out after collective_timeout_s="
                f"{self.cfg.collective_timeout_s} s at step {self.step + 1}: another process stopped, hangs or "
                f"died. Its own log says why; resume=true continues from the last checkpoint"
            ) from error

    def _train_step(self) -> Dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches, the loss normalized
        by the true number of target tokens across micro-batches and ranks."""
        cfg = self.cfg
        micro_batches = [next(self.batches) for _ in range(cfg.gradient_accumulation_steps)]
        total_tokens = torch.tensor(sum(int((b["labels"] != -100).sum()) for b in micro_batches), dtype=torch.float64)
        total_tokens = _all_reduce_sum(total_tokens.to(self.device))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if self.world_size > 1:
                self.model.set_requires_gradient_sync(last)
            parts = self.loss_fn(self._forward(self.model, batch), batch["labels"].to(self.device))
            # FSDP averages gradients over ranks; the world size turns that average into the sum
            # that normalizing by the global token count needs.
            (parts.unnormalized() * (self.world_size / total_tokens).float()).backward()
            loss_sum += parts.ce_sum.detach().double()
            self.throughput.add(batch["tokens"].numel())
        loss = (_all_reduce_sum(loss_sum) / total_tokens).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        for name, value in (("loss", loss), ("gradient norm", grad_norm)):
            if not math.isfinite(value):
                # Checked before the update: non-finite gradients never reach the weights.
                raise FloatingPointError(
                    f"{name} is {value} at step {self.step + 1}; stopping without saving. {self._set_aside_diverged()}"
                    f"{self._last_good()} Lower the learning rate or check the data."
                )
        # The learning rates this step used (read before the scheduler moves them).
        lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, **lrs}

    def _forward(self, model, batch) -> torch.Tensor:
        # FSDP2 applies mixed precision with several processes; one GPU process uses autocast.
        use_autocast = self.device.type == "cuda" and self.world_size == 1 and self.cfg.mixed_precision != "fp32"
        with torch.autocast("cuda", dtype=DTYPES[self.cfg.mixed_precision], enabled=use_autocast):
            return self._model_call(model, batch)

    def _model_call(self, model, batch) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device)
        if not self.cfg.data.document_boundaries:
            return model(tokens)
        positions = batch["positions"].to(self.device)
        return model(tokens, input_pos=positions, cu_seqlens=cu_seqlens_from_positions(positions))

    @torch.no_grad()
    def evaluate(self, model: Optional[torch.nn.Module] = None) -> float:
        """Mean next-token loss of ``model`` (default: the one in training) over the first
        ``eval_batches`` batches of the held-out data (all of them when it is null)."""
        model = self.model if model is None else model
        model.eval()
        loader = build_dataloader(self.heldout_data, batch_size=self.cfg.batch_size, rank=self.rank,
                                  world_size=self.world_size, seed=0, shuffle=False, drop_last=False)
        ce, tokens = torch.zeros((), dtype=torch.float64, device=self.device), torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in itertools.islice(loader, self.cfg.eval_batches):
            parts = lm_loss(self._forward(model, batch), batch["labels"].to(self.device))
            ce += parts.ce_sum.double()
            tokens += parts.num_tokens.double()
        model.train()
        ce, tokens = _all_reduce_sum(ce), _all_reduce_sum(tokens)
        self.heldout_tokens = int(tokens.item())
        return (ce / tokens).item()

    def _log_start_losses(self) -> None:
        """Step 0 of metrics.jsonl: the held-out loss before any update (and the teacher's)."""
        record = {"heldout_loss": self.evaluate()}
        teacher = dict(self.heldout_losses).get(TEACHER_LABEL)
        if teacher is not None:
            record["heldout_loss_teacher"] = teacher
        name = "before training" if teacher is None else "linearized, before uptraining"
        self.heldout_losses.append((name, record["heldout_loss"]))
        self.metrics.log(0, record)

    def summary(self) -> str:
        """The held-out losses of this run (teacher, start, end) and where the model was saved."""
        lines = []
        if self.heldout_losses:
            width = max(len(name) for name, _ in self.heldout_losses)
            lines.append(f"held-out loss ({self.heldout_tokens:,} tokens):")
            lines.extend(f"  {name:<{width}}  {loss:.4f}" for name, loss in self.heldout_losses)
        if self.last_saved is not None:
            lines.append(f"saved {self.last_saved} (a supra checkpoint folder: load_checkpoint and the generate "
                         "recipe read it)")
        return "\n".join(lines)

    # ----- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """``checkpoints/step_N``: the model as a supra folder (``load_checkpoint`` reads it), the
        optimizer (sharded, torch.distributed.checkpoint) and per-rank trainer state (scheduler,
        data position, RNG); written under a temporary name and renamed when complete."""
        root = self.output_dir / "checkpoints"
        final = root / f"step_{self.step:07d}"
        staging = root / f".step_{self.step:07d}.partial"
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        non_finite = _broadcast([n for n, t in full.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())])
        if non_finite:
            raise FloatingPointError(
                f"the weights after step {self.step} hold NaN or infinite values ({', '.join(non_finite[:5])}); not "
                f"saving them. {self._last_good()} Lower the learning rate or check the data."
            )
        try:
            if self.rank == 0:
                if staging.exists():
                    shutil.rmtree(staging)
                staging.mkdir(parents=True)
                save_checkpoint(_unwrapped(self.model), staging / "model", state_dict=full)
                if self.tokenizer_source is not None:
                    save_tokenizer_files(self.tokenizer_source, staging / "model")
                # The config that trained these weights: a resumed run is compared with it.
                OmegaConf.save(self.cfg, staging / "config.yaml")
            _barrier()
            dcp.save({"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}, checkpoint_id=str(staging / "optimizer"))
            torch.save(self._trainer_state(), staging / f"trainer_rank{self.rank}.pt")
            _barrier()
            self._write_manifest(staging)
        except (OSError, RuntimeError) as error:
            if not _disk_full(error):
                raise
            raise OSError(
                f"saving the checkpoint of step {self.step} failed: the disk is full "
                f"({shutil.disk_usage(root).free / 2**20:.0f} MiB free on the filesystem of {root}). The partial folder "
                f"{staging} can be deleted (resume ignores it). {self._last_good()} Free space, or lower "
                "keep_last_n_checkpoints, then continue with resume=true"
            ) from error
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            logger.info("saved %s", final)
        self.unconfirmed = final
        self.last_saved = final / "model"
        _barrier()

    def _write_manifest(self, staging: Path) -> None:
        """``sha256.json``: the sha256 of every file of the checkpoint, verified on resume. The model's
        weight files reuse the digests ``save_checkpoint`` recorded; the rest are hashed by all ranks,
        each a share."""
        recorded = {f"model/{name}": digest for name, digest in read_json(staging / "model" / SUPRA_CONFIG)["sha256"].items()}
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        todo = [name for name in files if name not in recorded]
        for part in _all_gather({name: sha256_file(staging / name) for name in todo[self.rank::self.world_size]}):
            recorded.update(part)
        if self.rank == 0:
            (staging / MANIFEST).write_text(json.dumps(recorded, indent=1, sort_keys=True))
        _barrier()

    def _prune_checkpoints(self) -> None:
        """Deletes all but the newest ``keep_last_n_checkpoints`` complete checkpoints."""
        if self.rank == 0:
            for old in _complete_checkpoints(self.output_dir / "checkpoints")[: -self.cfg.keep_last_n_checkpoints]:
                shutil.rmtree(old)
        self.unconfirmed = None

    def _set_aside_diverged(self) -> str:
        """Renames the newest checkpoint, whose weights just gave a non-finite loss, out of resume's
        way (``.step_N.diverged``); returns the sentence saying so ("" when there is none)."""
        if self.unconfirmed is None:
            return ""
        diverged = self.unconfirmed.parent / f".{self.unconfirmed.name}.diverged"
        if self.rank == 0:
            self.unconfirmed.rename(diverged)
        self.unconfirmed = None
        return f"The checkpoint saved after step {self.step} holds the weights that gave it: moved to {diverged}. "

    def _last_good(self) -> str:
        """Where the last good checkpoint is, as a sentence for error messages."""
        root = self.output_dir / "checkpoints"
        good = [p for p in _complete_checkpoints(root) if p != self.unconfirmed]
        if not good:
            return f"There is no good checkpoint in {root}."
        return f"The last good checkpoint, {good[-1]}, is intact."

    def _trainer_state(self) -> Dict[str, Any]:
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.batches.state_dict(),
            "freeze": self.freeze.state_dict() if self.freeze else None,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def _lock_output_dir(self) -> None:
        """Holds an flock on ``output_dir/.lock`` for the whole run, so a second run on the same folder
        is refused; the kernel releases it when the process ends, however it ends."""
        error = None
        if self.rank == 0:
            try:
                self.lock = _lock(self.output_dir)
            except ValueError as refused:
                error = str(refused)
        error = _broadcast(error)
        if error is not None:
            raise ValueError(error)

    def _resume_checkpoint(self) -> Optional[Path]:
        """The newest intact checkpoint (falling back past damaged ones, with a warning naming the
        damaged file), once this run's config is checked against the one that trained it.

        Raises:
            ValueError: when every checkpoint is damaged, the config changed in keys that are not
                ``SAFE_TO_CHANGE_ON_RESUME``, or ``max_steps`` is below the checkpoint's step.
        """
        root = self.output_dir / "checkpoints"
        checkpoints = _complete_checkpoints(root)
        if not checkpoints:
            if self.rank == 0:
                logger.warning("resume=true but %s has no complete checkpoint: starting from step 0", self.output_dir)
            return None
        damaged = []
        for checkpoint in reversed(checkpoints):
            problem = self._damage(checkpoint)
            if problem is None:
                break
            # Set aside, so that neither pruning (which keeps the newest) nor generate picks it.
            aside = root / f".{checkpoint.name}.damaged"
            damaged.append(f"{problem} (moved to {aside})")
            if self.rank == 0:
                checkpoint.rename(aside)
                logger.warning("checkpoint %s is damaged, moved to %s; falling back to the one before: %s",
                               checkpoint, aside, problem)
        else:
            raise ValueError(
                f"resume=true but no checkpoint in {root} is intact:\n  " + "\n  ".join(damaged) + "\nSet "
                "resume=false to start again from step 0"
            )
        _barrier()
        self._check_config_against(checkpoint)
        return checkpoint

    def _damage(self, checkpoint: Path) -> Optional[str]:
        """What is wrong with a checkpoint's files (checked against its ``sha256.json``, each rank a
        share), or None when they are intact."""
        manifest = checkpoint / MANIFEST
        if not manifest.is_file():
            return f"{manifest} is missing (a checkpoint saved by a supra older than its checksums, or damaged)"
        problem = None
        try:
            recorded = read_json(manifest)
            for name in sorted(recorded)[self.rank::self.world_size]:
                verify_sha256(checkpoint, {name: recorded[name]})
        except ValueError as error:
            problem = str(error)
        return next((p for p in _all_gather(problem) if p is not None), None)

    def _check_config_against(self, checkpoint: Path) -> None:
        """Refuses a resumed run whose config changes what the checkpoint trained (model, data,
        optimization); logs the safe changes."""
        saved = _flatten(OmegaConf.to_container(OmegaConf.load(checkpoint / "config.yaml"), resolve=True))
        current = _flatten(to_dict(self.cfg))
        changed = {k: (saved.get(k, "unset"), current.get(k, "unset")) for k in sorted(saved.keys() | current.keys())
                   if saved.get(k, "unset") != current.get(k, "unset")}
        safe = {k: v for k, v in changed.items() if any(k == p or k.startswith(p + ".") for p in SAFE_TO_CHANGE_ON_RESUME)}
        refused = {k: v for k, v in changed.items() if k not in safe}
        if refused:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
            raise ValueError(
                f"resume=true, but this config differs from the one that trained {checkpoint} ({checkpoint}/config.yaml) "
                f"in keys that change the model, the data or the optimization: {listed}. Set them back to continue "
                f"this run, or start a new run in another output_dir (model.path={checkpoint / 'model'} starts "
                "it from these weights)"
            )
        step = int(checkpoint.name.removeprefix("step_"))
        if self.cfg.max_steps < step:
            raise ValueError(
                f"max_steps={self.cfg.max_steps} is below the step of the checkpoint to resume, {step} ({checkpoint}): "
                f"there is nothing to train. Set max_steps above {step} to train further, or use {checkpoint / 'model'} "
                "as it is"
            )
        if safe and self.rank == 0:
            logger.info("resume: changed since %s (safe to change): %s", checkpoint.name,
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in safe.items()))
            if "max_steps" in safe:
                logger.info("resume: the learning rate now follows the schedule that ends at max_steps=%d",
                            self.cfg.max_steps)

    def _resume(self, checkpoint: Path) -> None:
        weights = dict(t for f in weight_files(checkpoint / "model") for t in iter_tensors(f))
        set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True))
        optimizer_state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.load(optimizer_state, checkpoint_id=str(checkpoint / "optimizer"))
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state["optimizer"])
        state = torch.load(checkpoint / f"trainer_rank{self.rank}.pt", weights_only=False)
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["loader"])
        if self.freeze is not None and state["freeze"] is not None:
            self.freeze.load_state_dict(state["freeze"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        # Its weights have given no loss yet: the first step decides whether it is good.
        self.unconfirmed = checkpoint
        if self.rank == 0:
            logger.info("resumed from %s (step %d)", checkpoint, self.step)

    def cleanup(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        if self.lock is not None:
            self.lock.close()
            self.lock = None
        if dist.is_initialized():
            dist.destroy_process_group()


def _complete_checkpoints(root: Path) -> List[Path]:
    """Renamed (complete) step folders, oldest first; partial ones start with a dot."""
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.exists() else []


def _lock(output_dir: Path):
    """An exclusive flock on ``output_dir/.lock`` (the open file holding it), naming its holder.

    Raises:
        ValueError: when another live run holds it, or the folder cannot be written.
    """
    path = output_dir / ".lock"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as error:
        raise ValueError(f"cannot write to output_dir {output_dir}: {error.strerror} ({error.filename}); choose a "
                         "writable folder") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process"
        handle.close()
        raise ValueError(
            f"output_dir {output_dir} is in use by another run ({holder}; lock {path}): wait for it to end, or choose "
            "another output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Dotted key -> value, for every leaf of a nested config."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _disk_full(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the disk is full: ENOSPC / EDQUOT, or the
    words torch's and safetensors' writers use."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(error) for words in ("No space left on device", "file write failed", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _argument(node: DictConfig, name: str) -> Any:
    """A component's argument: the config's value, else the default of its callable's parameter."""
    if name in node:
        return node[name]
    from supra.config import import_component

    parameter = inspect.signature(import_component(node._component_, "component")).parameters.get(name)
    if parameter is None or parameter.default is parameter.empty:
        raise ValueError(f"the recipe needs {name} from {node._component_}: give it in the config")
    return parameter.default


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)


def _require_path(path: Optional[str], key: str) -> None:
    if path is None or not Path(path).exists():
        raise ValueError(f"{key} {path} does not exist")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _all_gather(value: Any) -> List[Any]:
    """Every rank's ``value`` (picklable), in rank order; [value] in one process."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (picklable), on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def recipe_main(cfg: DictConfig) -> None:
    """Runs the whole recipe on a parsed config."""
    recipe = UptrainRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        if recipe.rank == 0:
            print(recipe.summary(), flush=True)
    finally:
        recipe.cleanup()


def parse_args(argv: Optional[List[str]] = None) -> DictConfig:
    return parse_recipe_args(__doc__, DEFAULTS, "optimizer.lr=1e-4", argv, free_form=FREE_FORM, rules=RULES,
                             components=COMPONENTS)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        recipe_main(parse_args())
    except (ValueError, FloatingPointError, OSError) as error:
        # These messages say what happened and what to do; a traceback would bury them.
        raise SystemExit(f"uptrain: {error}") from error
