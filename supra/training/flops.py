"""Training FLOPs per token and accelerator peak FLOPs, for model FLOPs utilization (MFU).

MFU = achieved model FLOPs per second / peak FLOPs per second, where the model FLOPs count
the matmuls the algorithm needs (PaLM appendix B), not recomputation (activation checkpointing)
nor elementwise work (norms, RoPE, activations, the decay).
"""

from typing import Optional, Tuple, Union

import torch
from torch import nn
from torchtune.modules import MultiHeadAttention

from supra.modules import LinearAttention
from supra.ops.linear_attention.chunk import DEFAULT_CHUNK_SIZE


def flops_per_token(model: nn.Module, seq_len: int, *, chunk_size: Optional[int] = None) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) at a given sequence length.

    ``6 * N + sum over layers of the attention term``, where N counts the parameters that
    multiply every token: all parameters except the token embedding table (a lookup), plus the
    output matrix when it is tied to that table (it is still a matmul). A forward matmul costs
    2 FLOPs per weight per token, its backward twice that.

    Attention terms per token, per layer (H query heads):

    - softmax: ``12 * H * d * T`` (T = ``seq_len``, d the head dim): q.k over T keys and the
      weighted sum of T values, ``2 * 2 * H * d * T`` forward, times 3. This is the usual
      ``12 * L * T * D`` term (torchtitan, PaLM), which counts the full T x T scores, not the
      causal half.
    - SUPRA linear (chunked, chunk C, feature dim d_k, value dim d_v):
      ``3 * H * (2 * C' * (d_k + d_v) + 4 * d_k * d_v)`` with ``C' = min(C, T)``. Within a chunk
      each query scores C keys (``2 * C * d_k``) and sums C values (``2 * C * d_v``), counting the
      full C x C block as the kernel computes it; across chunks it reads the state
      (``q S``: ``2 * d_k * d_v``) and adds to it (``k^T v``: ``2 * d_k * d_v``). Linear in T.

    Args:
        model (nn.Module): a decoder with ``tok_embeddings``, ``layers`` (each with ``attn``)
            and ``output`` (torchtune ``TransformerDecoder`` / ``SupraDecoder``), possibly hybrid.
        seq_len (int): training sequence length T, >= 1.
        chunk_size (Optional[int]): chunk length C of the linear attention kernel; defaults to
            the chunked op's (``supra.ops.linear_attention.chunk.DEFAULT_CHUNK_SIZE``).

    Returns:
        float: FLOPs per trained token.

    Raises:
        ValueError: if ``seq_len`` or ``chunk_size`` is < 1, the model lacks the decoder
            attributes, or a layer's attention is of an unknown kind.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1; got {seq_len}")
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    missing = [a for a in ("tok_embeddings", "layers", "output") if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"flops_per_token needs a decoder with tok_embeddings, layers and output; "
            f"{type(model).__name__} lacks {missing}"
        )
    embedding = model.tok_embeddings.weight
    matmul_params = sum(p.numel() for p in model.parameters()) - embedding.numel()
    if _output_weight(model.output) is embedding:
        matmul_params += embedding.numel()

    attention = 0.0
    for i, layer in enumerate(model.layers):
        attn = getattr(layer, "attn", None)
        if isinstance(attn, LinearAttention):
            heads, d_k, d_v = attn.num_heads, attn.feature_dim, _value_dim(attn)
            chunk = min(chunk_size, seq_len)
            attention += 3 * heads * (2 * chunk * (d_k + d_v) + 4 * d_k * d_v)
        elif isinstance(attn, MultiHeadAttention):
            attention += 12 * attn.num_heads * attn.head_dim * seq_len
        else:
            raise ValueError(
                f"layer {i} has attention {type(attn).__name__}; flops_per_token knows "
                "LinearAttention and torchtune MultiHeadAttention"
            )
    return float(6 * matmul_params + attention)


def _output_weight(output) -> Optional[torch.Tensor]:
    weight = getattr(output, "weight", None)
    if weight is None and hasattr(output, "tied_module"):
        weight = output.tied_module.weight
    return weight


def _value_dim(attn: LinearAttention) -> int:
    in_features = getattr(attn.output_proj, "in_features", None)
    return in_features // attn.num_heads if in_features else attn.head_dim


# Dense (no sparsity) tensor-core peak FLOP/s for 16-bit inputs (bf16 and fp16 are equal on
# these parts; consumer cards with float32 accumulation), from the vendors' datasheets.
# First match wins, so specific variants (GB200 before B200, H100 PCIe before H100) come first.
_PEAK_16BIT: Tuple[Tuple[Tuple[str, ...], float], ...] = (
    (("GB200",), 2.5e15),
    (("B200",), 2.25e15),
    (("GH200",), 989e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),
    (("H800", "PCIE"), 756e12),
    (("H800",), 989e12),
    (("A100",), 312e12),
    (("A800",), 312e12),
    (("L40S",), 362e12),
    (("L40",), 181e12),
    (("L4",), 121e12),
    (("RTX 4090",), 165e12),
    (("RTX 3090",), 35.6e12),
    (("MI325X",), 1307e12),
    (("MI300X",), 1307e12),
    (("MI250X",), 383e12),
)

# V100 and T4 have fp16 tensor cores but no bf16 support.
_PEAK_FP16_ONLY: Tuple[Tuple[Tuple[str, ...], float], ...] = (
    (("V100", "PCIE"), 112e12),
    (("V100",), 125e12),
    (("T4",), 65e12),
)


def peak_flops_from_name(name: str, dtype: torch.dtype) -> Optional[float]:
    """Dense peak FLOP/s of an accelerator from its name (as ``torch.cuda.get_device_name``
    gives it), for bf16/fp16 matmuls; None for an unknown name or another dtype.

    Args:
        name (str): device name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        dtype (torch.dtype): the training compute dtype.

    Returns:
        Optional[float]: FLOP/s, or None when unknown (float32 included: TF32 peaks depend on
        global matmul settings, so no MFU is claimed for them).
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    upper = name.upper()
    table = _PEAK_16BIT + (_PEAK_FP16_ONLY if dtype == torch.float16 else ())
    for keys, peak in table:
        if all(key in upper for key in keys):
            return peak
    return None


def device_peak_flops(device: Union[torch.device, str, int], dtype: torch.dtype) -> Optional[float]:
    """Dense peak FLOP/s of ``device`` for ``dtype`` matmuls, or None when unknown.

    Only CUDA (and ROCm, which torch also calls ``cuda``) devices with a known name have a
    value; CPU and other devices return None, so no MFU is reported there.

    Args:
        device (torch.device | str | int): the training device.
        dtype (torch.dtype): the compute dtype (bf16 or fp16; others give None).

    Returns:
        Optional[float]: FLOP/s per device, or None.
    """
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_from_name(torch.cuda.get_device_name(device), dtype)
