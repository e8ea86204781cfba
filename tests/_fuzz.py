"""Reusable helpers for property-based bad-input tests.

A bad-input test takes a public function, a builder of valid keyword arguments, the name of one
argument and a bad value for it, and checks that the call is *rejected properly*:

- it raises `ValueError` or `TypeError` (never another exception type, never silent acceptance);
- the message names the argument the user passed, in backticks ("`name` must ...").

`bad_values(kind, valid)` builds bad values by class from a valid value, so one table row
`(function, build_kwargs, argument, classes)` drives many cases:

| class | what it produces |
|---|---|
| `"type"` | wrong Python types: str, a list, and for ints also a bool and floats |
| `"none"` | None (for a required argument) |
| `"nan"` / `"inf"` | the valid tensor with one NaN / +Inf entry (floating tensors only) |
| `"negative"` | the valid tensor or number with one negative entry |
| `"dtype"` | the valid tensor cast to the other dtype kinds (`"dtype:bool"`, `"dtype:int"`, `"dtype:float"` for one) |
| `"rank"` | the valid tensor with one axis more and one fewer |
| `"size"` | the valid tensor with its last axis one longer |
| `"empty"` | the valid tensor with its last axis emptied |
| `"range"` | out-of-range numbers: -1 and a huge negative int; -1.0, NaN, Inf for floats |
| `"zero"` | 0 (for a positive int) |

`check_finite_output(fn, kwargs)` is for degenerate but legal inputs: the call must succeed and
every floating tensor it returns (anywhere in a tuple / NamedTuple / dict) must be finite.
"""

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from hypothesis import strategies as st

_KINDS = (
    "type", "none", "nan", "inf", "negative", "dtype", "dtype:bool", "dtype:int", "dtype:float",
    "rank", "size", "empty", "range", "zero",
)  # fmt: skip
_DTYPE_OF = {"dtype:bool": torch.bool, "dtype:int": torch.int64, "dtype:float": torch.float32}


def bad_values(kind: str, valid: Any) -> list[Any]:
    """Bad values of class `kind` derived from the valid value `valid` (may be empty)."""
    if kind not in _KINDS:
        raise ValueError(f"`kind` must be one of {_KINDS}, got {kind!r}.")
    if kind == "none":
        return [None]
    if kind == "zero":
        return [0]
    if kind in _DTYPE_OF:
        return [valid.to(_DTYPE_OF[kind])] if isinstance(valid, torch.Tensor) else []
    if kind == "type":
        out: list[Any] = ["x", [1, 2]]
        if isinstance(valid, bool):
            out += [1, 1.0]
        elif isinstance(valid, int):
            out += [True, float(valid) + 0.5, float(valid)]
        elif isinstance(valid, float):
            out += [True, "0.5"]
        elif isinstance(valid, torch.Tensor):
            out += [valid.tolist(), 1.5]
        return out
    if kind == "range":
        if isinstance(valid, bool) or not isinstance(valid, (int, float)):
            return []
        return [-1, -(2**40)] if isinstance(valid, int) else [-1.0, math.nan, math.inf]
    if not isinstance(valid, torch.Tensor):
        if kind == "negative" and isinstance(valid, (int, float)) and not isinstance(valid, bool):
            return [-abs(valid) - 1]
        return []
    if kind in ("nan", "inf"):
        if not valid.dtype.is_floating_point or valid.numel() == 0:
            return []
        x = valid.clone()
        x.view(-1)[0] = math.nan if kind == "nan" else math.inf
        return [x]
    if kind == "negative":
        if valid.dtype == torch.bool or valid.numel() == 0:
            return []
        x = valid.clone()
        x.view(-1)[0] = -1
        return [x]
    if kind == "dtype":
        if valid.dtype == torch.bool:
            return [valid.to(torch.int64), valid.to(torch.float32)]
        if valid.dtype.is_floating_point:
            return [valid.to(torch.bool), valid.to(torch.int64)]
        return [valid.to(torch.bool), valid.to(torch.float32)]
    if kind == "rank":
        out = [valid[None]]
        if valid.ndim >= 1:
            out.append(valid.reshape(-1)[:1].reshape(()) if valid.ndim == 1 else valid[0])
        return out
    if kind == "size":
        if valid.ndim == 0:
            return []
        return [torch.cat([valid, valid.narrow(-1, 0, 1)], dim=-1)] if valid.shape[-1] else []
    if kind == "empty":
        if valid.ndim == 0:
            return []
        return [valid.narrow(-1, 0, 0)]
    return []


def bad_value_strategy(kind: str, valid: Any) -> st.SearchStrategy[Any]:
    """A hypothesis strategy over `bad_values(kind, valid)` (nothing() when there are none)."""
    values = bad_values(kind, valid)
    return st.sampled_from(values) if values else st.nothing()


def check_rejects(
    fn: Callable[..., Any],
    kwargs: dict[str, Any],
    arg: str,
    bad: Any,
    *,
    names: Iterable[str] = (),
) -> BaseException | None:
    """Call `fn(**{**kwargs, arg: bad})` and assert a proper rejection.

    The call must raise `ValueError` or `TypeError` whose message contains `` `arg` `` (or one
    of the backticked `names`, for a check that legitimately reports a related argument, e.g.
    `state['budget']` for `state`). Returns the exception. A call that succeeds fails the test
    ("silent acceptance"), and so does any other exception type.
    """
    call = {**kwargs, arg: bad}
    try:
        fn(**call)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        accepted = [arg, *names]
        if not any(f"`{n}" in message for n in accepted):
            pytest.fail(
                f"{_name(fn)}({arg}={_short(bad)}) raised {type(exc).__name__} not naming "
                f"`{arg}`: {message}"
            )
        return exc
    except Exception as exc:  # noqa: BLE001 - the point is to catch the wrong types
        pytest.fail(
            f"{_name(fn)}({arg}={_short(bad)}) raised {type(exc).__name__} (want ValueError or "
            f"TypeError): {exc}"
        )
    pytest.fail(f"{_name(fn)}({arg}={_short(bad)}) silently accepted a bad value.")
    return None


def check_finite_output(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call `fn(**kwargs)` (degenerate but legal input): it must succeed with finite floats."""
    out = fn(**kwargs)
    for path, x in _tensors(out, "out"):
        if x.dtype.is_floating_point and x.numel() and not bool(torch.isfinite(x).all()):
            pytest.fail(f"{_name(fn)} returned non-finite values at {path}: {x}")
    return out


def _tensors(tree: Any, path: str) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{path}[{key!r}]")
    elif isinstance(tree, tuple) and hasattr(tree, "_fields"):
        for field in tree._fields:
            yield from _tensors(getattr(tree, field), f"{path}.{field}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{path}[{i}]")


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return re.sub(r"\s+", " ", repr(value))[:60]
