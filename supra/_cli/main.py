"""``supra``: run the recipes that ship with the library.

    supra ls                      list recipes
    supra run RECIPE [ARGS...]    run a recipe; ARGS go to the recipe
"""

import argparse
import runpy
import sys
from pathlib import Path
from typing import Dict, List, Optional

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


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="supra", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ls", help="list recipes")
    run = commands.add_parser("run", help="run a recipe")
    run.add_argument("recipe")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the recipe")
    parsed = parser.parse_args(argv)
    if parsed.command == "ls":
        for name, path in find_recipes().items():
            print(f"{name:20s} {path}")
    else:
        run_recipe(parsed.recipe, parsed.args)


if __name__ == "__main__":
    main()
