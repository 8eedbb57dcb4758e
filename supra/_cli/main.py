"""``supra``: run the recipes that ship with the library.

    supra ls                      list recipes
    supra run RECIPE [ARGS...]    run a recipe; ARGS go to the recipe
    supra convert SRC DST         convert a checkpoint (see supra convert --help)
"""

import argparse
import runpy
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

# Recipes live in the repository's recipes/ folder, beside the package.
RECIPE_DIRS = [Path(__file__).resolve().parents[2] / "recipes"]


def find_recipes() -> Dict[str, Path]:
    """Recipe name -> script path, for every ``*.py`` in the recipe folders."""
    recipes = {}
    for folder in RECIPE_DIRS:
        if folder.is_dir():
            recipes.update({p.stem: p for p in sorted(folder.glob("*.py")) if not p.stem.startswith("_")})
    return recipes


def run_recipe(name: str, args: List[str]) -> None:
    """Runs recipe ``name`` as ``__main__`` with ``args`` as its command line.

    Scripts run by path: torchtune installs a top-level ``recipes`` package that would shadow ours.
    """
    recipes = find_recipes()
    if name not in recipes:
        raise SystemExit(f"supra: no recipe named {name!r}; available: {', '.join(recipes) or 'none'}")
    sys.argv = [str(recipes[name]), *args]
    runpy.run_path(str(recipes[name]), run_name="__main__")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def convert(args: argparse.Namespace) -> None:
    """Loads SRC in any supported format and writes DST as a supra or openlm folder."""
    from supra.checkpoint import export_openlm, load_checkpoint, save_checkpoint

    model = load_checkpoint(
        args.src, dtype=DTYPES[args.dtype] if args.dtype else None, config=args.config,
        linearize=True if args.linearize else None,
    )
    if args.to == "openlm":
        export_openlm(model, args.dst, overwrite=args.overwrite)
    else:
        save_checkpoint(model, args.dst, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.to} checkpoint {args.dst} ({params:,} parameters)")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="supra", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ls", help="list recipes")
    run = commands.add_parser("run", help="run a recipe")
    run.add_argument("recipe")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the recipe")
    conv = commands.add_parser("convert", help="convert a checkpoint", description=convert.__doc__)
    conv.add_argument("src", help="checkpoint folder (supra, hf, openlm) or open_lm .pt file")
    conv.add_argument("dst", help="output folder")
    conv.add_argument("--to", choices=("supra", "openlm"), default="supra", help="output format (default supra)")
    conv.add_argument("--linearize", action="store_true", help="linearize a softmax checkpoint (new parameters initialized)")
    conv.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep)")
    conv.add_argument("--config", help="open_lm model config JSON, for raw open_lm checkpoints")
    conv.add_argument("--max-shard-size", default="5GB", help="safetensors shard size for --to supra (default 5GB)")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parsed = parser.parse_args(argv)
    if parsed.command == "convert":
        try:
            convert(parsed)
        except ValueError as error:
            raise SystemExit(f"supra convert: {error}") from error
    elif parsed.command == "ls":
        for name, path in find_recipes().items():
            print(f"{name:20s} {path}")
    else:
        run_recipe(parsed.recipe, parsed.args)


if __name__ == "__main__":
    main()
