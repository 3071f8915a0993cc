"""A setting's annotation is its one check: built in Python (``settings.check_arguments``), a value is refused
exactly when jsonargparse's own parser (what `icon` runs) refuses it, and both name the key."""

from __future__ import annotations

import inspect
import typing

import pytest
from jsonargparse import ArgumentParser

from icon_lightning.callbacks import Convergence, SelfLabel
from icon_lightning.data import ClusteringDataModule
from icon_lightning.models import IConModule
from icon_lightning.models.heads import ClusterHeads
from icon_lightning.settings import check_arguments, describe

CLASSES = (IConModule, ClusteringDataModule, Convergence, SelfLabel, ClusterHeads)
VALUES = [-1, 0, 1, 2, 0.5, 1.0, 1.5, 1e-3, float("nan"), None, "auto", "x"]


def restricted(cls) -> list[tuple[str, object]]:
    hints = typing.get_type_hints(cls.__init__)
    return [(name, hint) for name, hint in hints.items() if name != "return" and "restriction" in describe_safe(hint)]


def describe_safe(hint) -> str:
    """'restriction' when the annotation holds a jsonargparse restricted number."""
    options = typing.get_args(hint) or (hint,)
    return "restriction" if any(getattr(o, "_restrictions", None) is not None for o in options) else ""


def parser_accepts(name: str, hint, value) -> bool:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument(f"--{name}", type=hint)
    text = "null" if value is None else str(value)
    try:
        parser.parse_args([f"--{name}={text}"])
        return True
    except Exception:  # noqa: BLE001 - jsonargparse's refusal is the reference
        return False


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_python_refuses_what_the_parser_refuses(cls):
    cases = restricted(cls)
    assert cases, f"{cls.__name__} declares no restricted setting"
    for name, hint in cases:
        for value in VALUES:
            expected = parser_accepts(name, hint, value)
            try:
                check_arguments(cls.__init__, {name: value})
                accepted = True
            except ValueError as error:
                accepted = False
                assert str(error) == f"{name}: expected {describe(hint)}, got {value!r}"
            assert accepted == expected, (cls.__name__, name, value, describe(hint))


def test_the_annotated_limits_are_the_documented_ones():
    hints = typing.get_type_hints(IConModule.__init__)
    assert describe(hints["num_heads"]) == "at least 1"
    assert describe(hints["ema_momentum"]) == "a number > 0 and < 1 or null"
    assert describe(typing.get_type_hints(Convergence.__init__)["lr_gamma"]) == "a number > 0 and ≤ 1"
    assert describe(typing.get_type_hints(ClusteringDataModule.__init__)["batch_size"]) == "at least 1 or 'auto'"
    assert describe(typing.get_type_hints(ClusteringDataModule.__init__)["num_neighbours"]) == "at least 0"


def test_each_class_checks_its_settings_when_built_in_python():
    with pytest.raises(ValueError, match=r"^lr_gamma: expected a number > 0 and ≤ 1, got 0$"):
        Convergence(lr_gamma=0)
    with pytest.raises(ValueError, match=r"^window: expected at least 1, got 0$"):
        Convergence(window=0)
    with pytest.raises(ValueError, match=r"^fraction: expected a number > 0 and ≤ 1, got 1.5$"):
        SelfLabel(fraction=1.5)
    with pytest.raises(ValueError, match=r"^temperature: expected a number > 0, got 0.0$"):
        ClusterHeads(4, 3, temperature=0.0)
    sig = inspect.signature(Convergence.__init__)
    Convergence(**{n: p.default for n, p in sig.parameters.items() if n != "self"})  # the defaults conform
