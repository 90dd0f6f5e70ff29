"""The saver's options are declared once (:class:`SaverOptions`); the typed keyword lists the
adapters accept must say the same, or a new option would reach one adapter and not another."""

from __future__ import annotations

import inspect
import typing
from dataclasses import FrozenInstanceError, fields

import pytest

from bestsave import CoreOptions, Options, SaverOptions, SharedOptions

pytestmark = pytest.mark.core


def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def test_core_options_are_the_saver_options_less_monitor_and_mode() -> None:
    saver_fields = {f.name: _hints(SaverOptions)[f.name] for f in fields(SaverOptions)}
    del saver_fields["monitor"], saver_fields["mode"]
    assert _hints(CoreOptions) == saver_fields


def test_adapter_option_lists_nest() -> None:
    shared, adapter, core = _hints(SharedOptions), _hints(Options), _hints(CoreOptions)
    assert set(adapter) - set(shared) == {"min_delta"}
    assert set(shared) < set(adapter) < set(core)


def test_every_option_is_described_once() -> None:
    doc = inspect.getdoc(SaverOptions) or ""
    for f in fields(SaverOptions):
        assert doc.count(f"\n{f.name}: ") + doc.count(f" {f.name}: ") >= 1, f.name


def test_options_are_frozen() -> None:
    options = SaverOptions.of(monitor="val_loss", top_k=3)
    assert options.as_kwargs()["top_k"] == 3
    with pytest.raises(FrozenInstanceError):
        options.top_k = 4  # type: ignore[misc]


def test_unknown_option_names_the_closest() -> None:
    with pytest.raises(TypeError, match="did you mean patience"):
        SaverOptions.of(monitor="val_loss", patiance=3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"monitor": []}, "monitor must name a logged metric"),
        ({"monitor": ["a", "a"]}, "lists a metric twice"),
        ({"monitor": ["a", "b"], "mode": ["min"]}, "one mode for every monitor"),
        ({"monitor": "val_loss", "top_k": -2}, "top_k must be"),
    ],
)
def test_options_check_themselves(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SaverOptions.of(**options)
