"""Option schemas: every mechanism declares its options once; validation errors name option, value and rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class OptionError(ValueError):
    """A mechanism option is unknown or has a value outside what is allowed."""


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: Any
    allowed: str  # human-readable rule, printed in errors and in `mechanisms()`
    accepts: Callable[[Any], bool]
    doc: str = ""


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `budget=True` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float))) and not isinstance(value, bool)


def int_option(
    name: str, default: int | None, minimum: int, doc: str = "", optional: bool = False, maximum: int | None = None
) -> Option:
    rule = f"an integer >= {minimum}" + ("" if maximum is None else f" and <= {maximum}") + (" or None" if optional else "")
    return Option(
        name,
        default,
        rule,
        lambda v: (optional and v is None) or (_is_int(v) and v >= minimum and (maximum is None or v <= maximum)),
        doc,
    )


def float_option(
    name: str, default: float, minimum: float, doc: str = "", maximum: float | None = None, above: bool = False
) -> Option:
    """A number in [minimum, maximum] (`above`: minimum itself excluded)."""
    rule = f"a number {'>' if above else '>='} {minimum}" + ("" if maximum is None else f" and <= {maximum}")
    return Option(
        name,
        default,
        rule,
        lambda v: _is_number(v) and (v > minimum if above else v >= minimum) and (maximum is None or v <= maximum),
        doc,
    )


def bool_option(name: str, default: bool, doc: str = "") -> Option:
    # Only real booleans: 0/1 or "true" would pass an equality check against (False, True).
    return Option(name, default, "True or False", lambda v: isinstance(v, bool), doc)


def choice_option(name: str, default: str, choices: Sequence[str], doc: str = "") -> Option:
    choices = tuple(choices)
    return Option(name, default, "one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices, doc)


def layers_option(name: str, kinds: Sequence[str], doc: str = "") -> Option:
    """'all', one of the layer `kinds`, or a list of layer indices."""
    kinds = ("all",) + tuple(kinds)
    return Option(
        name,
        "all",
        "one of " + ", ".join(repr(k) for k in kinds) + " or a list of layer indices (integers >= 0)",
        lambda v: (isinstance(v, str) and v in kinds)
        or (isinstance(v, (list, tuple)) and all(_is_int(i) and i >= 0 for i in v)),
        doc,
    )


def validate(mechanism: str, schema: Sequence[Option], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the full option dict (defaults filled in) or raise OptionError naming the first bad entry."""
    given = dict(given or {})
    by_name = {opt.name: opt for opt in schema}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise OptionError(
            f"hf_attn_plus mechanism {mechanism!r} has no option {unknown[0]!r}; "
            f"its options are: {', '.join(by_name)}"
        )
    resolved = {}
    for opt in schema:
        value = given.get(opt.name, opt.default)
        if not opt.accepts(value):
            raise OptionError(
                f"hf_attn_plus mechanism {mechanism!r}: option {opt.name!r} got {value!r}; allowed: {opt.allowed}"
            )
        resolved[opt.name] = value
    return resolved
