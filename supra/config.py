"""YAML configs for recipes: find shipped ones, merge ``key=value`` overrides, validate keys.

Configs are OmegaConf YAML files. A recipe declares its defaults (every valid key with its
default); a config may set any of them, and a misspelled key is an error that lists the
valid keys near it, before anything runs. Every value is checked too: against the type of its
default, or a ``Rule`` the recipe declares (a range, a set of choices, null allowed or not).
Swappable parts are ``Component`` sections, as in torchtune: ``_component_`` names any
importable callable and the other keys are its arguments, checked against its signature.
"""

import argparse
import difflib
import importlib.util
import inspect
import math
import numbers
import os
import sys
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


class Component:
    """A config section that names a ``_component_`` (any importable callable, built with
    torchtune's ``config.instantiate``), and what the recipe passes it beside the config's arguments.

    Args:
        default: the section used when a config leaves it out (a dict with ``_component_``), or None.
        positional: how many leading arguments the recipe passes positionally (the model to
            ``linearize``, the parameters to an optimizer).
        supplied: keyword arguments the recipe passes (``max_steps`` to a scheduler).
        nullable: the section may be null (the recipe then skips that part).
    """

    def __init__(self, default: Optional[Dict[str, Any]] = None, *, positional: int = 0, supplied: Iterable[str] = (),
                 nullable: bool = False) -> None:
        self.default, self.positional, self.supplied, self.nullable = default, positional, tuple(supplied), nullable


COMPONENT_KEY = "_component_"


def is_component(value: Any) -> bool:
    """Whether a config value is a component node (a mapping with ``_component_``)."""
    return isinstance(value, (dict, DictConfig)) and COMPONENT_KEY in value


def import_component(path: str, where: str) -> Any:
    """The callable a ``_component_`` dotted path names (found as torchtune's ``instantiate``
    finds it: from the current directory too).

    Raises:
        ValueError: naming ``where``, the path and why it cannot be imported.
    """
    from torchtune.config._utils import _get_component_from_path

    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}._component_ must be a dotted path to a callable (torch.optim.AdamW); got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return _get_component_from_path(path)
    except Exception as error:  # torchtune raises InstantiationError; an import inside may raise anything
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(
            f"{where}._component_ {path!r} cannot be imported ({reason}). Give a dotted path to an importable "
            "callable; a user component in components/ imports when the run starts in the repository root"
        ) from None


def check_component(node: Dict[str, Any], where: str, spec: Optional[Component] = None,
                    rules: Optional[Dict[str, Rule]] = None) -> None:
    """Checks a component node before anything is built: its ``_component_`` imports, every
    argument it gives is a parameter of that callable (a misspelling names the nearest), none the
    callable requires is missing, and arguments with a ``Rule`` (``optimizer.lr``) obey it. Nested
    component nodes (``linearize.feature_map``) are checked too, by name only.

    Raises:
        ValueError: naming the section, the component, the bad argument and the nearest valid one.
    """
    component = import_component(node.get(COMPONENT_KEY), where)
    name = node[COMPONENT_KEY]
    given = [k for k in node if k != COMPONENT_KEY]
    for key in given:
        value = node[key]
        if is_component(value):
            check_component(value, f"{where}.{key}", None, rules)
        rule = (rules or {}).get(f"{where}.{key}")
        if rule is not None and not rule.accepts(value):
            raise ValueError(f"{where}.{key} must be {rule.describe()}; got {value!r} ({type(value).__name__})")
    try:
        parameters = list(inspect.signature(component).parameters.values())
    except (TypeError, ValueError):
        # Some builtins have no signature: the call itself will say what is wrong.
        return
    if spec is not None:
        parameters = parameters[spec.positional:]
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    valid = [p.name for p in named]
    supplied = set(spec.supplied) if spec is not None else set()
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        for key in given:
            if key in supplied:
                raise ValueError(f"{where}.{key} is passed by the recipe; remove it from the config")
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"{where}: {name} has no argument '{key}'.{hint} Its arguments: {valid}")
    if spec is not None:
        missing = [p.name for p in named if p.default is p.empty and p.name not in given and p.name not in supplied]
        if missing:
            raise ValueError(f"{where}: {name} needs {', '.join(repr(m) for m in missing)}; add "
                             f"{' and '.join(f'{where}.{m}' for m in missing)} to the config")


def check_components(config: Dict[str, Any], components: Dict[str, Component], rules: Optional[Dict[str, Rule]] = None) -> None:
    """``check_component`` for every component section of a merged config (dotted section names)."""
    for where, spec in components.items():
        node = _get(config, where)
        if node is None:
            if not spec.nullable:
                raise ValueError(f"{where} must be a component (a section with _component_); got null")
            continue
        if not is_component(node):
            raise ValueError(f"{where} must be a component: a section with _component_ (a dotted path to a callable) "
                             f"and its arguments; got {node!r}")
        check_component(node, where, spec, rules)


def _get(config: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def load_config(
    name_or_path: Union[str, Path],
    overrides: Sequence[str] = (),
    *,
    defaults: Optional[Dict[str, Any]] = None,
    free_form: Iterable[str] = (),
    rules: Optional[Dict[str, Rule]] = None,
    components: Optional[Dict[str, Component]] = None,
) -> DictConfig:
    """Loads a config, applies dotted ``key=value`` overrides and, given ``defaults``, fills
    missing keys, rejects unknown ones and checks every value (``check_values``) and every
    component section (``check_components``).

    A component section is not merged with its default: a config that gives it gives all of it.
    An override naming another ``_component_`` (``model={_component_: ..., ...}``) replaces the
    file's section instead of merging into it.

    Args:
        name_or_path: a YAML path or a shipped config name.
        overrides: ``a.b=value`` strings (values parsed as YAML), applied last.
        defaults: every valid key with its default value (nested dicts for sections).
        free_form: dotted paths of sections whose keys are not checked (builder arguments, ...).
        rules: dotted key -> ``Rule``, for keys whose default's type is not the whole rule
            (ranges, choices, null allowed, null defaults); ``section.argument`` for a component's.
        components: top-level section name -> ``Component``, for the swappable parts.

    Raises:
        ValueError: for a malformed override, an unknown key (listing the valid keys near it), a
            value its rule refuses (naming the rule and the value), or a component that does not
            import or is given an argument it does not take (naming the nearest one).
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value (dotted keys for sections); got {bad}")
    components = components or {}
    config = OmegaConf.load(find_config(name_or_path))
    for override in overrides:
        change = OmegaConf.from_dotlist([override])
        for section in components:
            new, old = change.get(section), config.get(section)
            if is_component(new) and (not is_component(old) or new[COMPONENT_KEY] != old[COMPONENT_KEY]):
                config[section] = None
        config = OmegaConf.merge(config, change)
    if defaults is not None:
        plain = {k: v for k, v in defaults.items() if k not in components}
        free = set(free_form) | set(components)
        check_keys(OmegaConf.to_container(config), {**plain, **{k: None for k in components}}, free)
        given = {k: config[k] for k in components if k in config}
        config = OmegaConf.merge(OmegaConf.create(plain), {k: v for k, v in config.items() if k not in components})
        for section, spec in components.items():
            config[section] = given.get(section, spec.default)
        resolved = OmegaConf.to_container(config, resolve=True)
        check_values(resolved, plain, rules or {}, free)
        check_components(resolved, components, rules)
    return config


def parse_recipe_args(
    description: str,
    defaults: Dict[str, Any],
    override_example: str,
    argv: Optional[Sequence[str]] = None,
    free_form: Iterable[str] = (),
    rules: Optional[Dict[str, Rule]] = None,
    components: Optional[Dict[str, Component]] = None,
) -> DictConfig:
    """A recipe's command line, ``--config CONFIG [key=value ...]``, loaded with ``load_config``.

    Args:
        description: the recipe's help text (its module docstring).
        defaults: every valid key with its default (see ``load_config``).
        override_example: shown in ``--help``, e.g. ``'prompt="Once upon a time"'``.
        argv: the arguments; None reads ``sys.argv``.
        free_form: dotted sections whose keys are not checked.
        rules: dotted key -> ``Rule`` (see ``load_config``).
        components: the component sections (see ``load_config``).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML path or a shipped config name (supra ls)")
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {override_example}")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides, defaults=defaults, free_form=free_form, rules=rules,
                       components=components)


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
