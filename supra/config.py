"""YAML configs for recipes: find shipped ones, merge ``key=value`` overrides, validate keys.

Configs are OmegaConf YAML files. A recipe declares its defaults (every valid key with its
default); a config may set any of them, and a misspelled key is an error that lists the
valid keys near it, before anything runs. Every value is checked too: against the type of its
default, or a ``Rule`` the recipe declares (a range, a set of choices, null allowed or not).
"""

import argparse
import difflib
import importlib.util
import math
import numbers
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
# ``model:NAME`` names a pretrained model file that supra.hub fetches once and keeps in its cache.
MODEL_PREFIX = "model:"


def resolve_path(path: Union[str, Path, None]) -> Optional[Path]:
    """A path named in a config. ``supra:REL`` is ``REL`` inside the installed supra package (files
    shipped with it, such as ``supra:assets/tiny_teacher``), found the same way in a checkout and
    in an installed wheel; ``model:NAME`` is a known pretrained model's file in supra's cache
    (``model:smollm2-135m``; ``supra.hub.download`` fetches and verifies it on first use, then it
    works offline); any other value is a plain path. None stays None."""
    if path is None:
        return None
    text = str(path)
    if text.startswith(PACKAGE_PREFIX):
        return Path(__file__).resolve().parent / text[len(PACKAGE_PREFIX):]
    if text.startswith(MODEL_PREFIX):
        from supra.hub import download

        return download(text[len(MODEL_PREFIX):])
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


class Rule:
    """The values one config key accepts, for keys whose default does not say enough.

    Args:
        kind: ``int``, ``float`` (ints accepted too), ``bool``, ``str`` or ``list``; None: any type
            (with ``choices``).
        low, high: inclusive bounds (numbers only); None: unbounded.
        low_open, high_open: make a bound exclusive (``lr > 0``).
        choices: the only values allowed.
        nullable: null (None) is allowed too.
    """

    def __init__(self, kind: Optional[type] = None, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, choices: Optional[Iterable[Any]] = None,
                 nullable: bool = False) -> None:
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.choices = None if choices is None else sorted(choices)
        self.nullable = nullable

    def describe(self) -> str:
        """The rule in words: ``an integer >= 1, or null``."""
        if self.choices is not None:
            text = f"one of {self.choices}"
        else:
            text = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
                    list: "a list"}.get(self.kind, "any value")
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {self.low}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {self.high}")
            if bounds:
                text += " " + " and ".join(bounds)
        return text + (", or null" if self.nullable else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.choices is not None:
            return value in self.choices
        if self.kind is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        elif self.kind is list:
            ok = isinstance(value, (list, tuple))
        else:
            ok = self.kind is None or isinstance(value, self.kind)
        if not ok or self.kind not in (int, float):
            return ok
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below


def default_rule(default: Any) -> Optional[Rule]:
    """The rule a default implies: its type (ints for floats too), null refused; None for a null
    default (any value: such keys need an explicit ``Rule``)."""
    if default is None:
        return None
    for kind in (bool, int, float, str):
        if isinstance(default, kind):
            return Rule(kind)
    return Rule(list) if isinstance(default, (list, tuple)) else None


def check_values(config: Dict[str, Any], defaults: Dict[str, Any], rules: Dict[str, Rule], free_form: Iterable[str] = (),
                 prefix: str = "") -> None:
    """Checks every value of a merged config against its ``rules`` entry (dotted key), else the
    type its default implies; sections that are ``free_form`` are skipped.

    Raises:
        ValueError: for the first bad value, naming the key, the rule and the value received.
    """
    for key, default in defaults.items():
        path = f"{prefix}{key}"
        if path in free_form or key not in config:
            continue
        value = config[key]
        if isinstance(default, dict) and path not in rules:
            if not isinstance(value, dict):
                raise ValueError(f"{path} is a section (keys {sorted(default)}); got {value!r}")
            check_values(value, default, rules, free_form, prefix=f"{path}.")
            continue
        rule = rules.get(path, default_rule(default))
        if rule is not None and not rule.accepts(value):
            raise ValueError(f"{path} must be {rule.describe()}; got {value!r} ({type(value).__name__})")


def load_config(
    name_or_path: Union[str, Path],
    overrides: Sequence[str] = (),
    *,
    defaults: Optional[Dict[str, Any]] = None,
    free_form: Iterable[str] = (),
    rules: Optional[Dict[str, Rule]] = None,
) -> DictConfig:
    """Loads a config, applies dotted ``key=value`` overrides and, given ``defaults``, fills
    missing keys, rejects unknown ones and checks every value (``check_values``).

    Args:
        name_or_path: a YAML path or a shipped config name.
        overrides: ``a.b=value`` strings (values parsed as YAML), applied last.
        defaults: every valid key with its default value (nested dicts for sections).
        free_form: dotted paths of sections whose keys are not checked (builder arguments, ...).
        rules: dotted key -> ``Rule``, for keys whose default's type is not the whole rule
            (ranges, choices, null allowed, null defaults).

    Raises:
        ValueError: for a malformed override, an unknown key (listing the valid keys near it) or
            a value its rule refuses (naming the rule and the value).
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value (dotted keys for sections); got {bad}")
    config = OmegaConf.merge(OmegaConf.load(find_config(name_or_path)), OmegaConf.from_dotlist(list(overrides)))
    if defaults is not None:
        check_keys(OmegaConf.to_container(config), defaults, set(free_form))
        config = OmegaConf.merge(OmegaConf.create(defaults), config)
        check_values(OmegaConf.to_container(config, resolve=True), defaults, rules or {}, set(free_form))
    return config


def parse_recipe_args(
    description: str,
    defaults: Dict[str, Any],
    override_example: str,
    argv: Optional[Sequence[str]] = None,
    free_form: Iterable[str] = (),
    rules: Optional[Dict[str, Rule]] = None,
) -> DictConfig:
    """A recipe's command line, ``--config CONFIG [key=value ...]``, loaded with ``load_config``.

    Args:
        description: the recipe's help text (its module docstring).
        defaults: every valid key with its default (see ``load_config``).
        override_example: shown in ``--help``, e.g. ``'prompt="Once upon a time"'``.
        argv: the arguments; None reads ``sys.argv``.
        free_form: dotted sections whose keys are not checked.
        rules: dotted key -> ``Rule`` (see ``load_config``).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML path or a shipped config name (supra ls)")
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {override_example}")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides, defaults=defaults, free_form=free_form, rules=rules)


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
