"""Quickstart: linearize a small softmax Llama, check the RNN against the parallel form, generate.

Run with ``supra run quickstart`` (or ``python recipes/quickstart.py``). Offline, CPU, seconds.
The softmax model here is randomly initialized; the uptraining demo replaces it with a trained one.
"""

import argparse
import time

import torch
from torchtune.models.llama3_2 import llama3_2

from supra.convert import linearize, new_parameter_names


def build_softmax_model(seed: int) -> torch.nn.Module:
    """A small Llama-3.2-style softmax decoder (GQA 8/2 heads, 256 wide, 4 layers)."""
    torch.manual_seed(seed)
    return llama3_2(
        vocab_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=256,
        intermediate_dim=768, max_seq_len=512,
    ).eval()


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Prefills ``prompt`` [1, T] in one chunked pass, then decodes one recurrent step per token."""
    if not model.caches_are_setup():
        model.setup_caches(batch_size=1, dtype=torch.float32)
    model.reset_caches()
    logits = model(prompt)
    new_tokens = []
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        new_tokens.append(token)
        logits = model(token)
    model.reset_caches()
    return torch.cat(new_tokens, dim=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model = build_softmax_model(args.seed)
    total = sum(p.numel() for p in model.parameters())
    print(f"softmax model: {total / 1e6:.2f}M parameters, {len(model.layers)} layers")

    linearize(model)
    new = new_parameter_names(model)
    params = dict(model.named_parameters())
    print(f"linearized: every layer is SUPRA attention; {sum(params[n].numel() for n in new) / 1e6:.2f}M "
          f"new parameters in {len(new)} tensors (feature maps); all pretrained tensors reused unchanged")

    prompt = torch.randint(0, 1024, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        start = time.perf_counter()
        parallel = model(prompt)
        parallel_s = time.perf_counter() - start
        model.setup_caches(batch_size=1, dtype=torch.float32)
        half = args.prompt_len // 2
        recurrent = torch.cat([model(prompt[:, :half]), *(model(prompt[:, t : t + 1]) for t in range(half, args.prompt_len))], dim=1)
        model.reset_caches()
    error = (recurrent - parallel).abs().max().item()
    print(f"parallel forward of {args.prompt_len} tokens: {parallel_s * 1e3:.0f} ms; "
          f"chunked prefill + token-by-token recurrence differs by at most {error:.2e}")

    start = time.perf_counter()
    tokens = greedy_generate(model, prompt, args.new_tokens)
    elapsed = time.perf_counter() - start
    state = sum(layer.attn.kv_cache.size_bytes() for layer in model.layers)
    attn = model.layers[0].attn
    kv_per_token = 2 * len(model.layers) * attn.num_kv_heads * attn.head_dim * 4
    print(f"generated {args.new_tokens} tokens in {elapsed:.2f} s from the recurrent state: {tokens[0].tolist()}")
    print(f"recurrent state: {state / 2**10:.0f} KiB per sequence at any context length "
          f"(a float32 KV cache holds that much after {state // kv_per_token} tokens)")
    if error > 1e-3:
        raise SystemExit(f"recurrent and parallel forms disagree by {error:.2e}")


if __name__ == "__main__":
    main()
