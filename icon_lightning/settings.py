"""Value types of the settings users type: jsonargparse's restricted numbers (``PositiveInt``, ``OpenUnitInterval``, …).

A setting's annotation is its one check: `icon` (jsonargparse) validates it at parse time, naming the key
(``model.num_heads: expected an integer > 0, got 0``), and ``check_arguments`` validates the same annotations when
a class is built in Python, with the same words. Checks that relate two settings, or a setting to the data, stay
in the classes that know both.
"""

from __future__ import annotations

import numbers
import operator
import re
import types
import typing
from collections.abc import Callable

from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

__all__ = [
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "UnitFraction",
    "check_arguments",
    "describe",
    "one_line_parse_error",
]

UnitFraction = restricted_number_type("UnitFraction", float, [(">", 0.0), ("<=", 1.0)])  # (0, 1]: a share or factor

SYMBOL = {operator.gt: ">", operator.ge: "≥", operator.lt: "<", operator.le: "≤"}
NONE_TYPE = type(None)
JSONARGPARSE_SYMBOL = {">": ">", ">=": "≥", "<": "<", "<=": "≤", "==": "=", "!=": "≠"}
UNIONS = (typing.Union, types.UnionType)  # Optional[X] and X | None


def _restrictions(kind) -> list | None:
    return getattr(kind, "_restrictions", None)


def _limits_in_words(kind, limits: list) -> str:
    """``at least 1`` for an integer's lower bound alone; else ``a number > 0 and ≤ 1``."""
    if issubclass(kind, int) and len(limits) == 1 and limits[0][0] in (operator.gt, operator.ge):
        op, ref = limits[0]
        return f"at least {int(ref) + (op is operator.gt)}"
    noun = "an integer" if issubclass(kind, int) else "a number"
    return f"{noun} " + " and ".join(f"{SYMBOL[op]} {ref:g}" for op, ref in limits)


def describe(hint) -> str:
    """What an annotation accepts, in words: ``an integer > 0``, ``a number > 0 and < 1 or null``, ``'auto'``."""
    words = []
    for option in typing.get_args(hint) if typing.get_origin(hint) in UNIONS else (hint,):
        if option is NONE_TYPE:
            words.append("null")
        elif typing.get_origin(option) is typing.Literal:
            words += [repr(v) for v in typing.get_args(option)]
        elif (limits := _restrictions(option)) is not None:
            words.append(_limits_in_words(option, limits))
        else:
            words.append(getattr(option, "__name__", str(option)))
    return " or ".join(words)


def _accepts(hint, value) -> bool | None:
    """Whether ``value`` conforms to ``hint``; None when the annotation holds neither a restricted number nor a
    ``Literal`` (not checked here: a plain type, or one the class checks itself)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in UNIONS else (hint,)
    if not any(_restrictions(o) is not None or typing.get_origin(o) is typing.Literal for o in options):
        return None
    for option in options:
        if option is NONE_TYPE and value is None:
            return True
        if typing.get_origin(option) is typing.Literal and value in typing.get_args(option):
            return True
        if _restrictions(option) is None or isinstance(value, bool):
            continue
        if isinstance(value, numbers.Integral if issubclass(option, int) else numbers.Real):
            try:
                option(value)
                return True
            except (TypeError, ValueError):
                continue
    return False


def check_arguments(function: Callable, values: dict, prefix: str = "") -> None:
    """One line for the first of ``values`` (name → value, e.g. a constructor's ``locals()``) that its restricted
    annotation in ``function``'s signature does not accept: ``{prefix}{name}: expected …, got …``."""
    for name, hint in typing.get_type_hints(function, include_extras=False).items():
        if name in values and _accepts(hint, values[name]) is False:
            raise ValueError(f"{prefix}{name}: expected {describe(hint)}, got {values[name]!r}")


CLASS_EXAMPLES = {"optimizer": "torch.optim.Adam", "scheduler": "torch.optim.lr_scheduler.StepLR"}


def one_line_parse_error(message: str) -> str:
    """jsonargparse's message for a restricted number that failed (``Parser key "model.ema_momentum": … does not
    conform to restriction v>0 and v<1 … Given value: 1.5``) as ``model.ema_momentum: expected v>0 and v<1, got
    1.5``; other messages as they are, on one line."""
    text = " ".join(str(message).split())
    key = re.search(r'Parser key "([^"]+)"', text)
    nested = re.search(r"NestedArg\(key='([^']+)'", text)
    if key is not None and nested is not None and "Union subtypes" in text:  # init_args of a class not chosen
        example = CLASS_EXAMPLES.get(key.group(1).rsplit(".", 1)[-1], "<class_path>")
        return (
            f"{key.group(1)}: '{nested.group(1)}' was given before a class: set {key.group(1)} first (for example "
            f"--{key.group(1)}={example}), then --{key.group(1)}.init_args.{nested.group(1)}=…"
        )
    rule = re.search(r"(\S+)? ?does not conform to restriction (.+?)(?: - |$)", text)
    if key is None or rule is None:
        return text
    given = re.search(r"Given value: (.+)$", text)
    value = given.group(1) if given else (rule.group(1) or "?").rstrip(":")
    union = " (or another listed form)" if "Union subtypes" in text else ""
    limits = re.sub(r"v\s*(>=|<=|>|<|==|!=)\s*", lambda m: JSONARGPARSE_SYMBOL[m.group(1)] + " ", rule.group(2).strip())
    return f"{key.group(1)}: expected a value {limits}{union}, got {value}"
