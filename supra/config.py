"""YAML configs for recipes: find shipped ones, merge ``key=value`` overrides, validate keys.

Configs are OmegaConf YAML files. A recipe declares its defaults (every valid key with its
default); a config may set any of them, and a misspelled key is an error that lists the
valid keys near it, before anything runs.
"""

import argparse
import difflib
import importlib.util
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf


def recipe_root() -> Path:
    """The recipes folder: ``supra._recipes`` in an installed wheel, else the checkout's ``recipes/``."""
    spec = importlib.util.find_spec("supra._recipes")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[1] / "recipes"


PACKAGE_PREFIX = "supra:"


def resolve_path(path: Union[str, Path, None]) -> Optional[Path]:
    """A path named in a config. ``supra:REL`` is ``REL`` inside the installed supra package (files
    shipped with it, such as ``supra:assets/tiny_teacher``), found the same way in a checkout and
    in an installed wheel; any other value is a plain path. None stays None."""
    if path is None:
        return None
    text = str(path)
    if text.startswith(PACKAGE_PREFIX):
        return Path(__file__).resolve().parent / text[len(PACKAGE_PREFIX):]
    return Path(text)


def list_recipes() -> Dict[str, Path]:
    """Recipe name -> script, for every public ``*.py`` in the recipes folder."""
    root = recipe_root()
    return {p.stem: p for p in sorted(root.glob("*.py")) if not p.stem.startswith("_")}


def list_configs() -> Dict[str, Path]:
    """Shipped config name (``family/name``) -> YAML file."""
    root = recipe_root() / "configs"
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.glob("*/*.yaml"))}


def find_config(name_or_path: Union[str, Path]) -> Path:
    """A config file by path, or by shipped name such as ``tiny/uptrain``.

    Raises:
        ValueError: naming the closest shipped configs when neither exists.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = list_configs()
    name = str(name_or_path).removesuffix(".yaml")
    if name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(name, shipped, n=3)
    hint = f"did you mean {close}? " if close else ""
    raise ValueError(f"config {name_or_path!r} is neither a file nor a shipped config; {hint}shipped: {sorted(shipped)}")


def load_config(
    name_or_path: Union[str, Path],
    overrides: Sequence[str] = (),
    *,
    defaults: Optional[Dict[str, Any]] = None,
    free_form: Iterable[str] = (),
) -> DictConfig:
    """Loads a config, applies dotted ``key=value`` overrides and, given ``defaults``, fills
    missing keys and rejects unknown ones.

    Args:
        name_or_path: a YAML path or a shipped config name.
        overrides: ``a.b=value`` strings (values parsed as YAML), applied last.
        defaults: every valid key with its default value (nested dicts for sections).
        free_form: dotted paths of sections whose keys are not checked (builder arguments, ...).

    Raises:
        ValueError: for a malformed override or an unknown key (listing the valid keys near it).
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value (dotted keys for sections); got {bad}")
    config = OmegaConf.merge(OmegaConf.load(find_config(name_or_path)), OmegaConf.from_dotlist(list(overrides)))
    if defaults is not None:
        check_keys(OmegaConf.to_container(config), defaults, set(free_form))
        config = OmegaConf.merge(OmegaConf.create(defaults), config)
    return config


def parse_recipe_args(
    description: str,
    defaults: Dict[str, Any],
    override_example: str,
    argv: Optional[Sequence[str]] = None,
    free_form: Iterable[str] = (),
) -> DictConfig:
    """A recipe's command line, ``--config CONFIG [key=value ...]``, loaded with ``load_config``.

    Args:
        description: the recipe's help text (its module docstring).
        defaults: every valid key with its default (see ``load_config``).
        override_example: shown in ``--help``, e.g. ``'prompt="Once upon a time"'``.
        argv: the arguments; None reads ``sys.argv``.
        free_form: dotted sections whose keys are not checked.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML path or a shipped config name (supra ls)")
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {override_example}")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides, defaults=defaults, free_form=free_form)


def check_keys(config: Dict[str, Any], defaults: Dict[str, Any], free_form: set, prefix: str = "") -> None:
    """Raises ValueError for the first key of ``config`` that ``defaults`` does not have."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in free_form:
            continue
        if key not in defaults:
            valid = sorted(defaults)
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            where = f"in section '{prefix[:-1]}'" if prefix else "at the top level"
            raise ValueError(f"unknown config key '{path}'.{hint} Valid keys {where}: {valid}")
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            check_keys(value, defaults[key], free_form, prefix=f"{path}.")


def to_dict(config: DictConfig) -> Dict[str, Any]:
    """A plain, resolved dict (for logging and for saving next to checkpoints)."""
    return OmegaConf.to_container(config, resolve=True)


def split_launcher_args(args: List[str]) -> "tuple[List[str], List[str]]":
    """Separates torchrun options (``--nproc-per-node 2``, ``--nnodes=2``, ...) from the recipe's own
    arguments, so ``supra run uptrain --nproc-per-node 2 --config X k=v`` works like ``tune run``."""
    launcher, rest, i = [], [], 0
    torchrun_flags = {"--nproc-per-node", "--nproc_per_node", "--nnodes", "--node-rank", "--node_rank",
                      "--rdzv-backend", "--rdzv_backend", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-id",
                      "--rdzv_id", "--master-addr", "--master_addr", "--master-port", "--master_port",
                      "--max-restarts", "--max_restarts", "--standalone"}
    while i < len(args):
        flag = args[i].split("=", 1)[0]
        if flag in torchrun_flags:
            launcher.append(args[i])
            takes_value = "=" not in args[i] and flag != "--standalone"
            if takes_value and i + 1 < len(args):
                launcher.append(args[i + 1])
                i += 1
        else:
            rest.append(args[i])
        i += 1
    return launcher, rest
