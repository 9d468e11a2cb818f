"""Runtime tuning knobs of the kernels' dispatch, from the one table in csrc/ops/tuning.cpp.

    with qatext.tuning(value_checks=False, decode_gemm_max_m=64):
        ...

`tuning_table()` lists every knob with its default, range and meaning."""

from __future__ import annotations

import contextlib

from . import _C


def tuning_table() -> list[dict]:
    """[{"name", "default", "min", "max", "doc"}] for every knob."""
    return _C.tuning_table()


def get_tuning(name: str | None = None):
    """One knob's current value (an int; booleans as 0 / 1), or all of them as a dict."""
    if name is None:
        return {row["name"]: _C.tuning_get(row["name"]) for row in _C.tuning_table()}
    return _C.tuning_get(name)


def set_tuning(**knobs) -> None:
    """Set knobs by name (bools are taken as 0 / 1); each value is checked against its range."""
    for name, value in knobs.items():
        _C.tuning_set(name, int(value))
        _current[name] = _C.tuning_get(name)


def current(name: str) -> int:
    """A knob's value from a Python copy kept by set_tuning: readable inside code that torch.compile
    traces (a call into the extension there would break the graph)."""
    return _current[name]


@contextlib.contextmanager
def tuning(**knobs):
    """set_tuning(**knobs) for a block, then the previous values back."""
    old = {name: _C.tuning_get(name) for name in knobs}
    set_tuning(**knobs)
    try:
        yield
    finally:
        set_tuning(**old)


_current: dict[str, int] = get_tuning()
