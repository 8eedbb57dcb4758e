"""``supra``: run recipes, list and copy their configs, convert checkpoints.

    supra ls                                     list recipes and shipped configs
    supra cp RECIPE|CONFIG DST                   copy a shipped recipe or config to edit it
    supra validate CONFIG [key=value ...]        check a config (keys, values, components) without running it
    supra run RECIPE [torchrun options] [--config CONFIG] [key=value ...]
    supra convert SRC DST [--to supra|openlm] [--linearize] [--dtype bf16]
    supra tokenize INPUTS... --tokenizer T --out DIR
    supra download NAME                          fetch a known pretrained model (smollm2-135m) into the cache
    supra lm-eval --model supra --model_args checkpoint=PATH --tasks ...   (lm-evaluation-harness)

With torchrun options (``--nproc-per-node 2``, ``--nnodes``, ``--rdzv-endpoint``, ...) the recipe
runs under ``torch.distributed.run``; without them, in this process.
"""

import argparse
import os
import runpy
import shutil
import sys
from pathlib import Path
from typing import List, Optional


from supra.config import find_config, list_configs, list_recipes, split_launcher_args

def run_usage(recipes: dict) -> str:
    """The help text of ``supra run``: its arguments and the recipes it can run."""
    lines = [
        "usage: supra run RECIPE [torchrun options] [--config CONFIG] [key=value ...]",
        "",
        "recipes: " + (", ".join(recipes) or "none"),
        "",
        "  --config CONFIG    a shipped config (tiny/uptrain; supra ls lists them) or a YAML file",
        "  key=value          override a config key (dotted for sections, the value parsed as YAML)",
        "  torchrun options   --nproc-per-node, --nnodes, --node-rank, --rdzv-backend, --rdzv-endpoint,",
        "                     --rdzv-id, --master-addr, --master-port, --max-restarts, --standalone:",
        "                     run the recipe under torch.distributed.run",
    ]
    return "\n".join(lines)


def run_recipe(name: str, args: List[str]) -> None:
    """Runs recipe ``name`` with ``args``, under torchrun when launcher options are present.

    Scripts run by path: torchtune installs a top-level ``recipes`` package that would shadow ours.
    """
    recipes = list_recipes()
    if name in ("-h", "--help"):
        print(run_usage(recipes))
        return
    if name not in recipes:
        raise SystemExit(f"supra: no recipe named {name!r}; available: {', '.join(recipes) or 'none'}")
    launcher, recipe_args = split_launcher_args(args)
    script = str(recipes[name])
    if launcher:
        command = [sys.executable, "-m", "torch.distributed.run", *launcher, script, *recipe_args]
        sys.stdout.flush()
        # This process becomes torchrun, so a signal to the launcher reaches torchrun itself, and its
        # workers die with it (init_distributed asks Linux for a parent-death signal).
        os.execv(sys.executable, command)
    sys.argv = [script, *recipe_args]
    runpy.run_path(script, run_name="__main__")


def convert(args: argparse.Namespace) -> None:
    """Loads SRC in any supported format and writes DST as a supra or openlm folder."""
    from supra.checkpoint import export_openlm, load_checkpoint, save_checkpoint
    from supra.data import save_tokenizer_files
    from supra.loading import resolve_dtype

    try:
        dtype = resolve_dtype(args.dtype)
    except ValueError as error:
        raise SystemExit(f"supra convert: {error}")
    model = load_checkpoint(
        args.src, dtype=dtype, config=args.config,
        linearize=True if args.linearize else None,
    )
    if args.to == "openlm":
        written = export_openlm(model, args.dst, overwrite=args.overwrite)
    else:
        written = save_checkpoint(model, args.dst, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    # The tokenizer travels with the weights (a GGUF file's is written out as tokenizer.json).
    tokenizer = save_tokenizer_files(args.src, written)
    params = sum(p.numel() for p in model.parameters())
    with_tokenizer = f", tokenizer: {', '.join(tokenizer)}" if tokenizer else ""
    print(f"wrote {args.to} checkpoint {args.dst} ({params:,} parameters{with_tokenizer})")


def copy_file(name: str, destination: str) -> None:
    """Copies a shipped recipe (by name, e.g. ``uptrain``) or config (e.g. ``tiny/uptrain``) to
    edit: a copied recipe runs with ``supra run``'s arguments under ``python DST.py`` or
    ``tune run DST.py`` (torchtune's launcher), as ``tune cp`` copies work.

    Raises:
        ValueError: naming the shipped recipes and the closest configs when neither exists.
    """
    recipes = list_recipes()
    try:
        source = recipes[name] if name in recipes else find_config(name)
    except ValueError as error:
        raise ValueError(f"{name!r} is not a shipped recipe ({', '.join(recipes)}), and {error}") from error
    target = Path(destination)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise SystemExit(f"supra cp: {target} already exists")
    shutil.copyfile(source, target)
    print(f"copied {source} to {target}")


def validate(config: str, overrides: List[str], recipe: Optional[str]) -> None:
    """Checks a config as ``supra run`` does when the recipe loads it (the recipe's own
    ``parse_args``: keys, values, each component's import and arguments), without running it.
    The recipe is ``recipe``, else the one the config's name starts with (``uptrain``,
    ``generate``, ``eval``; ``pretrain`` and ``teacher`` are uptrain's)."""
    recipes = list_recipes()
    if recipe is None:
        stem = find_config(config).stem
        aliases = {"pretrain": "uptrain", "teacher": "uptrain"}
        recipe = next((aliases.get(p, p) for p in (*recipes, *aliases) if stem.startswith(p)), None)
        if recipe is None:
            raise ValueError(f"cannot tell which recipe {config} is for; name it with --recipe ({', '.join(recipes)})")
    if recipe not in recipes:
        raise ValueError(f"no recipe named {recipe!r}; available: {', '.join(recipes)}")
    module = runpy.run_path(str(recipes[recipe]), run_name=f"supra_validate_{recipe}")
    module["parse_args"](["--config", config, *overrides])
    print(f"{config}: valid for the {recipe} recipe")


def download_model(name: Optional[str], cache_dir: Optional[str]) -> None:
    """Fetches and verifies a known model into the cache (prints its path), or lists them."""
    from supra.hub import MODELS, default_cache_dir, download

    if name is None:
        for known, entry in MODELS.items():
            print(f"  {known:16s} {entry.description} ({entry.size / 2**20:.0f} MiB; configs: model:{known})")
        print(f"cache: {cache_dir or default_cache_dir()}")
        return
    print(download(name, cache_dir=cache_dir))


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # `supra run` passes everything after the recipe name through untouched (torchrun options,
    # --config, overrides), so it is dispatched before argparse sees those options.
    if len(argv) >= 2 and argv[0] == "run":
        return run_recipe(argv[1], argv[2:])
    if argv and argv[0] == "tokenize":
        from supra.data.tokenize import main as tokenize_main

        return tokenize_main(argv[1:])
    if argv and argv[0] == "lm-eval":
        # lm-eval's own command line (every option) with model "supra" registered: see docs/evaluation.md.
        from supra.eval.__main__ import main as lm_eval_main

        return lm_eval_main(argv[1:])
    parser = argparse.ArgumentParser(prog="supra", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ls", help="list recipes and shipped configs")
    commands.add_parser("run", help="run a recipe: supra run RECIPE [torchrun options] [--config C] [k=v ...]")
    commands.add_parser("tokenize", help="tokenize text/jsonl/parquet into token shards (supra tokenize --help)")
    commands.add_parser("lm-eval", help="EleutherAI's lm-evaluation-harness with model 'supra' (supra lm-eval --help)")
    fetch = commands.add_parser("download", help="fetch a known pretrained model into supra's cache (offline afterwards)")
    fetch.add_argument("name", nargs="?", help="the model (smollm2-135m); none lists the known ones")
    fetch.add_argument("--cache-dir", help="the cache folder (default $SUPRA_CACHE/models or ~/.cache/supra/models)")
    check = commands.add_parser("validate", help="check a config without running it (like tune validate)")
    check.add_argument("config", help="a shipped config (tiny/uptrain) or a YAML file")
    check.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    check.add_argument("--recipe", help="the recipe whose config it is (default: from the config's name)")
    cp = commands.add_parser("cp", help="copy a shipped recipe or config to edit")
    cp.add_argument("name", help="a recipe (uptrain) or config (tiny/uptrain): supra ls lists them")
    cp.add_argument("destination")
    conv = commands.add_parser("convert", help="convert a checkpoint", description=convert.__doc__)
    conv.add_argument("src", help="checkpoint folder (supra, hf, openlm), open_lm .pt file, or .gguf file")
    conv.add_argument("dst", help="output folder")
    conv.add_argument("--to", choices=("supra", "openlm"), default="supra", help="output format (default supra)")
    conv.add_argument("--linearize", action="store_true", help="linearize a softmax checkpoint (new parameters initialized)")
    conv.add_argument("--dtype", help="cast the weights: fp32, bf16, fp16 (or float32, bfloat16, float16; default: keep)")
    conv.add_argument("--config", help="open_lm model config JSON, for raw open_lm checkpoints")
    conv.add_argument("--max-shard-size", default="5GB", help="safetensors shard size for --to supra (default 5GB)")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parsed = parser.parse_args(argv)
    if parsed.command == "convert":
        try:
            convert(parsed)
        except ValueError as error:
            raise SystemExit(f"supra convert: {error}") from error
    elif parsed.command == "download":
        try:
            download_model(parsed.name, parsed.cache_dir)
        except (ValueError, RuntimeError) as error:
            raise SystemExit(f"supra download: {error}") from error
    elif parsed.command == "validate":
        try:
            validate(parsed.config, parsed.overrides, parsed.recipe)
        except ValueError as error:
            raise SystemExit(f"supra validate: {error}") from error
    elif parsed.command == "cp":
        try:
            copy_file(parsed.name, parsed.destination)
        except ValueError as error:
            raise SystemExit(f"supra cp: {error}") from error
    elif parsed.command == "ls":
        print("recipes:")
        for name, path in list_recipes().items():
            print(f"  {name:24s} {path}")
        print("configs:")
        for name, path in list_configs().items():
            print(f"  {name:24s} {path}")
    else:
        parser.error("supra run needs a recipe name: supra run RECIPE [...]")


if __name__ == "__main__":
    main()
