"""Peak host memory of ``supra.checkpoint.load_checkpoint`` on a synthetic ~1B-parameter checkpoint.

The claim under test: the model is built on the meta device and filled tensor by tensor, so peak
host memory stays near one copy of the weights (goal: (peak RSS - RSS after imports) / checkpoint
bytes <= 1.3). The script

1. writes synthetic checkpoints (random weights, a TinyLlama-like GQA shape scaled to
   ``--params-billion``) in a subprocess, from the names and shapes of a model built on the meta
   device: a ``supra`` folder (an all-linear SUPRA model) and an ``hf`` Llama folder (the softmax
   model: names and config from ``transformers``), one safetensors shard in memory at a time, and
   an HF ``openlm`` folder (one ``pytorch_model.bin`` with keys ``model.`` and the fused
   ``in_proj`` / ``w12`` layout, which ``torch.save`` writes from a whole dict);
2. loads each in a fresh subprocess, so that ``ru_maxrss`` is that load alone, and reports the
   peak right after ``load_checkpoint`` and again after every weight has been read once (a sum
   over each tensor: what any forward pass does; safetensors tensors are memory-mapped lazily,
   so pages become resident only when read);
3. measures, in the same run, a naive load of the same supra weights: the model built on CPU
   with its random initialization, then ``safetensors.torch.load_file`` of every shard and
   ``load_state_dict`` (about two copies).

Resident file-backed pages (the memory-mapped checkpoint) count in RSS as they do in ``ru_maxrss``.
The checkpoints are deleted at the end unless ``--keep``.

    python benchmarks/checkpoint_memory.py                          # ~1B parameters, fp32 if disk allows
    python benchmarks/checkpoint_memory.py --params-billion 0.1 --formats supra hf
    python benchmarks/checkpoint_memory.py --dtype bf16 --load-dtype bf16 --dir /data --keep
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

GOAL = 1.3
VOCAB = 32_000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("supra", "hf", "openlm")
# TinyLlama-like proportions: head dim 64, 8 query heads per key/value head, MLP 2.75x wide.
WIDTHS = (2048, 1024, 512, 256)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-billion", type=float, default=1.0, help="model size (default 1.0)")
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto",
        help="stored dtype; auto: fp32 when the disk holds every format in fp32, else bf16",
    )
    parser.add_argument("--load-dtype", choices=sorted(DTYPES), help="dtype= for load_checkpoint (default: keep)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument(
        "--shard-size-gb", type=float, default=5.0,
        help="safetensors shard size in GB (default 5: save_checkpoint's default, so ~1B fp32 is one file)",
    )
    parser.add_argument(
        "--dir", help="parent folder of the temporary checkpoints, created if missing (default: the system temp dir)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (their folder is printed)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in the workers")
    parser.add_argument("--worker", choices=("generate", "load", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--format", choices=FORMATS, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_kwargs(params_billion: float) -> Dict[str, Any]:
    """``supra_decoder`` arguments of an all-linear GQA model near ``params_billion`` parameters:
    the widest of ``WIDTHS`` that still has at least two layers."""
    target = params_billion * 1e9
    for width in WIDTHS:
        heads, intermediate = width // 64, int(width * 2.75)
        kv_heads = max(heads // 8, 1)
        kv = kv_heads * 64
        # q, k, v, out projections, SwiGLU MLP, two RMSNorms, q and k feature maps (with biases).
        per_layer = 2 * width * width + 2 * width * kv + 3 * width * intermediate + 2 * width
        per_layer += width * width + width + kv * kv + kv
        layers = round((target - 2 * VOCAB * width - width) / per_layer)
        if layers >= 2:
            break
    return dict(
        vocab_size=VOCAB, num_layers=max(layers, 2), num_heads=heads, num_kv_heads=kv_heads, embed_dim=width,
        intermediate_dim=intermediate, max_seq_len=2048, norm_eps=1e-5,
    )


def rss_mib() -> Dict[str, float]:
    """Current VmRSS and its anonymous / file-backed parts, MiB (Linux)."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_like(shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=dtype).normal_(std=0.02, generator=generator)


def write_safetensors_folder(shapes: Dict[str, torch.Size], folder: Path, dtype: torch.dtype, shard_bytes: int) -> None:
    """Random tensors under ``shapes``' names as model.safetensors or shards + index, holding one
    shard in memory at a time."""
    from safetensors.torch import save_file

    groups: List[List[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * dtype.itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    files = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
    ]
    weight_map, seed = {}, 0
    for file, names in zip(files, groups):
        shard = {}
        for name in names:
            shard[name] = random_like(shapes[name], dtype, seed)
            seed += 1
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
        del shard
    if len(files) > 1:
        total = sum(s.numel() * dtype.itemsize for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def generate(fmt: str, folder: Path, kwargs: Dict[str, Any], dtype: torch.dtype, shard_bytes: int) -> None:
    """Writes one synthetic checkpoint of format ``fmt`` into the new folder ``folder``."""
    import supra
    from supra.checkpoint import FORMAT_VERSION
    from supra.checkpoint.openlm import openlm_state_dict
    from supra.models import supra_decoder

    folder.mkdir(parents=True)
    with torch.device("meta"):
        model = supra_decoder(**kwargs)
    if fmt == "supra":
        shapes = {name: t.shape for name, t in model.state_dict().items()}
        write_safetensors_folder(shapes, folder, dtype, shard_bytes)
        # The record save_checkpoint writes.
        record = {"format": "supra", "format_version": FORMAT_VERSION, "supra_version": supra.__version__,
                  **model.supra_spec}
        (folder / "supra_config.json").write_text(json.dumps(record, indent=2))
    elif fmt == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=kwargs["vocab_size"], hidden_size=kwargs["embed_dim"],
            intermediate_size=kwargs["intermediate_dim"], num_hidden_layers=kwargs["num_layers"],
            num_attention_heads=kwargs["num_heads"], num_key_value_heads=kwargs["num_kv_heads"],
            max_position_embeddings=kwargs["max_seq_len"],
            rms_norm_eps=kwargs["norm_eps"], tie_word_embeddings=False,
        )
        with torch.device("meta"):
            hf_model = LlamaForCausalLM(config)
        shapes = {name: t.shape for name, t in hf_model.state_dict().items()}
        write_safetensors_folder(shapes, folder, dtype, shard_bytes)
        config.save_pretrained(str(folder))
    else:
        config = {
            "model_type": "openlm", "dim": kwargs["embed_dim"], "intermediate_dim_ffn": kwargs["intermediate_dim"],
            "n_layers": kwargs["num_layers"], "n_heads": kwargs["num_heads"], "n_heads_kv": kwargs["num_kv_heads"],
            "vocab_size": kwargs["vocab_size"], "norm_eps": kwargs["norm_eps"], "seq_len": kwargs["max_seq_len"],
            "weight_tying": False, "apply_qk_norm": False, "qk_head_dim": kwargs["embed_dim"] // kwargs["num_heads"],
            "v_head_dim": kwargs["embed_dim"] // kwargs["num_heads"], "norm_type": "rms_norm",
            "attn_name": "linear_attn", "positional_embedding_type": "rotary", "ffn_type": "swiglu",
            "use_decay": True, "use_retnet_slopes": False, "decay_start": None,
        }
        # torch.save needs the whole dict: this subprocess holds one copy (the measuring one never does).
        state = {f"model.{name}": random_like(t.shape, dtype, i)
                 for i, (name, t) in enumerate(openlm_state_dict(model, config).items())}
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps(config, indent=2))


def read_every_weight(model: torch.nn.Module) -> None:
    """Reads every byte of every tensor once (lazily mapped pages become resident)."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.sum()


def measure(worker: str, path: Path, load_dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """Runs in a fresh process: RSS after imports, peak after loading, peak after reading every weight."""
    from safetensors.torch import load_file

    from supra.checkpoint import build_from_spec, load_checkpoint
    from supra.checkpoint._io import read_json, weight_files

    baseline = rss_mib()["VmRSS"]
    start = time.perf_counter()
    if worker == "load":
        model = load_checkpoint(path, dtype=load_dtype)
    else:
        state = {}
        for file in weight_files(path):
            state.update(load_file(str(file)))
        # The model is initialized directly in the dtype it ends up in (the stored one by default).
        torch.set_default_dtype(load_dtype or next(iter(state.values())).dtype)
        model = build_from_spec(read_json(path / "supra_config.json"))
        model.load_state_dict(state, strict=True)
    seconds = time.perf_counter() - start
    peak_load = peak_mib()
    read_every_weight(model)
    after = rss_mib()
    return {
        "baseline": baseline, "peak_load": peak_load, "peak_read": peak_mib(), "anon": after["RssAnon"],
        "file": after["RssFile"], "seconds": seconds,
        "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
    }


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_worker(args: argparse.Namespace, *extra: str) -> Dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker {' '.join(extra)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}


def choose_dtype(args: argparse.Namespace, parent: Path, params: int, formats: List[str]) -> str:
    free = shutil.disk_usage(parent).free
    # Each format stores about the same bytes; 5% margin for headers, configs and the openlm extras.
    needs = {name: int(params * DTYPES[name].itemsize * len(formats) * 1.05) for name in DTYPES}
    if args.dtype != "auto":
        if needs[args.dtype] > free:
            raise SystemExit(f"{parent}: {free / 2**30:.1f} GiB free, {args.dtype} checkpoints need "
                             f"{needs[args.dtype] / 2**30:.1f} GiB: use --dtype bf16, fewer --formats or --dir")
        return args.dtype
    for name in ("fp32", "bf16"):
        if needs[name] <= free:
            return name
    raise SystemExit(f"{parent}: {free / 2**30:.1f} GiB free, bf16 checkpoints need {needs['bf16'] / 2**30:.1f} GiB")


def count_parameters(kwargs: Dict[str, Any]) -> int:
    from supra.models import supra_decoder

    with torch.device("meta"):
        model = supra_decoder(**kwargs)
    return sum(p.numel() for p in model.parameters())


def main(args: argparse.Namespace) -> None:
    kwargs = model_kwargs(args.params_billion)
    params = count_parameters(kwargs)
    parent = Path(args.dir or tempfile.gettempdir())
    # The free-space check below needs the folder to exist.
    parent.mkdir(parents=True, exist_ok=True)
    dtype = choose_dtype(args, parent, params, args.formats)
    root = Path(tempfile.mkdtemp(prefix="supra-checkpoint-memory-", dir=parent))
    shape = json.dumps(kwargs)
    print(f"$ python benchmarks/checkpoint_memory.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; model: {params / 1e9:.3f}B parameters "
          f"(the hf softmax folder lacks the feature maps), "
          f"{kwargs['num_layers']} layers x {kwargs['embed_dim']}, "
          f"heads {kwargs['num_heads']}/{kwargs['num_kv_heads']}, "
          f"vocab {VOCAB}; stored {dtype}, loaded as {args.load_dtype or 'stored'}")
    rows = []
    cast = ["--load-dtype", args.load_dtype] if args.load_dtype else []
    try:
        for fmt in args.formats:
            folder = root / fmt
            start = time.perf_counter()
            run_worker(args, "--worker", "generate", "--format", fmt, "--path", str(folder), "--shape", shape,
                       "--dtype", dtype, "--shard-size-gb", str(args.shard_size_gb))
            seconds = time.perf_counter() - start
            print(f"wrote {fmt} checkpoint ({folder_bytes(folder) / 2**30:.2f} GiB) in {seconds:.0f} s", flush=True)
            result = run_worker(args, "--worker", "load", "--path", str(folder), *cast)
            rows.append((f"load_checkpoint {fmt}", folder, result))
        if not args.no_naive and "supra" in args.formats:
            folder = root / "supra"
            result = run_worker(args, "--worker", "naive", "--path", str(folder), *cast)
            rows.append(("naive (supra weights)", folder, result))
        print_table(rows)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def print_table(rows) -> None:
    print()
    print("RSS in MiB; ratio = (peak RSS - RSS after imports) / checkpoint bytes; goal <= 1.3 for load_checkpoint")
    header = (f"{'load':24s} {'ckpt MiB':>9s} {'base':>7s} {'peak@load':>10s} {'ratio':>6s} "
              f"{'peak@read':>10s} {'ratio':>6s} {'anon':>7s} {'file':>7s} {'load s':>7s}  goal")
    print(header)
    for label, folder, r in rows:
        size = folder_bytes(folder) / 2**20
        load_ratio = (r["peak_load"] - r["baseline"]) / size
        read_ratio = (r["peak_read"] - r["baseline"]) / size
        verdict = "" if label.startswith("naive") else ("ok" if read_ratio <= GOAL else "OVER")
        print(f"{label:24s} {size:9.0f} {r['baseline']:7.0f} {r['peak_load']:10.0f} {load_ratio:6.2f} "
              f"{r['peak_read']:10.0f} {read_ratio:6.2f} {r['anon']:7.0f} {r['file']:7.0f} {r['seconds']:7.1f}  "
              f"{GOAL} {verdict}")
    print("peak@load: ru_maxrss right after the load returns; peak@read: after every weight was read once;")
    print("anon / file: resident anonymous / file-backed (memory-mapped checkpoint) MiB after the read")


if __name__ == "__main__":
    arguments = parse_args()
    torch.set_num_threads(arguments.threads)
    if arguments.worker == "generate":
        generate(arguments.format, Path(arguments.path), json.loads(arguments.shape), DTYPES[arguments.dtype],
                 int(arguments.shard_size_gb * 1e9))
    elif arguments.worker in ("load", "naive"):
        load_dtype = DTYPES[arguments.load_dtype] if arguments.load_dtype else None
        print(json.dumps(measure(arguments.worker, Path(arguments.path), load_dtype)))
    else:
        main(arguments)
