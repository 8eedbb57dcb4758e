"""Parallelism and compilation as small ordered functions (torchtitan's order):
activation checkpointing -> per-block torch.compile -> FSDP2 per block, then the root."""

import ctypes
import datetime
import logging
import os
import signal
import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

logger = logging.getLogger(__name__)
# prctl option: the signal this process gets when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def init_distributed(timeout_s: Optional[float] = None) -> "tuple[int, int, torch.device]":
    """Joins the process group when launched by torchrun (NCCL on GPU, gloo on CPU), and asks for
    this worker to be killed when its launcher dies (``die_with_parent``).

    Args:
        timeout_s (Optional[float]): how long a collective waits for the other processes before it
            fails; None keeps torch's default.

    Returns:
        (rank, world_size, device): (0, 1, the default device) without torchrun.
    """
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size(), device) if dist.is_initialized() else (0, 1, device)
    die_with_parent()
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def die_with_parent() -> None:
    """Has Linux SIGKILL this process when its parent (torchrun's agent) dies, however it dies:
    torchrun starts its workers in sessions of their own, so without this a killed launcher leaves
    them training on their own. Does nothing on other systems."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # A parent that died before the request has already handed this process to init.
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def apply_ac(model: nn.Module) -> None:
    """Wraps every decoder block in full activation checkpointing (recompute in backward)."""
    for i, layer in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_compile(model: nn.Module, fullgraph: bool = True) -> None:
    """Compiles every decoder block separately: one small graph reused by all layers."""
    for layer in model.layers:
        layer.compile(fullgraph=fullgraph)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: Optional[torch.dtype] = None,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2: shards every block, then the root (embeddings, final norm, output).

    Args:
        model (nn.Module): a decoder with ``.layers``.
        mesh (DeviceMesh): the 1-D data-parallel mesh.
        param_dtype (Optional[torch.dtype]): compute dtype for parameters (bf16 on GPU); gradients
            are reduced in float32.
        reshard_after_forward (bool): free gathered parameters after each block's forward.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    last = len(model.layers) - 1
    for i, layer in enumerate(model.layers):
        # The last block is gathered again at once by the root's backward: keep it.
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward and i < last)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def parallelize(
    model: nn.Module,
    *,
    device: torch.device,
    world_size: int,
    activation_checkpointing: bool = False,
    compile: bool = False,
    fsdp: bool = True,
    param_dtype: Optional[torch.dtype] = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Applies AC -> compile -> FSDP2 in that order (FSDP only when ``world_size`` > 1)."""
    if activation_checkpointing:
        apply_ac(model)
    if compile:
        apply_compile(model)
    if fsdp and world_size > 1:
        mesh = init_device_mesh(device.type, (world_size,))
        apply_fsdp(model, mesh, param_dtype=param_dtype, reshard_after_forward=reshard_after_forward)
    return model
