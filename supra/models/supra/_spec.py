"""Build records: which builder and arguments made a model, so a checkpoint can rebuild it."""

import functools
from typing import Any, Callable, Dict

from torch import nn

SPEC_ATTRIBUTE = "supra_spec"
# Public model builders (in supra.models) whose models carry a build record: the only names a
# checkpoint config may ask to call.
RECORDED_BUILDERS: Dict[str, Callable] = {}


def _jsonable(value: Any) -> Any:
    """Tuples, sets and ranges become lists so the record survives a JSON round trip."""
    if isinstance(value, (tuple, list, range)):
        return [_jsonable(v) for v in value]
    if isinstance(value, set):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def recorded_builder(name: str) -> Callable:
    """Decorates a keyword-only builder of ``supra.models`` so its models carry a build record
    ``model.supra_spec = {"builder": name, "kwargs": {...}, "linearize": []}``.

    An outer builder that calls an inner one overwrites the record with its own (presets win).
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        @functools.wraps(builder)
        def build(**kwargs) -> nn.Module:
            model = builder(**kwargs)
            setattr(model, SPEC_ATTRIBUTE, {"builder": name, "kwargs": _jsonable(kwargs), "linearize": []})
            return model

        RECORDED_BUILDERS[name] = build
        return build

    return decorate


def record_linearize(model: nn.Module, arguments: Dict[str, Any]) -> None:
    """Appends a ``linearize`` call to the model's build record, if it has one."""
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    if spec is not None:
        spec["linearize"].append(_jsonable(arguments))
