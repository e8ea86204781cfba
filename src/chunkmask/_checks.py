"""Argument checks shared by every module.

Each check raises a `ValueError` (bad shape, value or option) or a `TypeError` (bad type or dtype)
whose message names the argument, says what was expected and shows what was received. Metadata
checks (type, dtype, shape) cost nothing and are safe under `torch.compile`; value checks (finite,
ranges over tensor contents) synchronise with the device and run only where a caller asks.
"""

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

_DTYPE_KINDS = {
    "float": lambda d: d.is_floating_point,
    "int": lambda d: (not d.is_floating_point) and (not d.is_complex) and d != torch.bool,
    "bool": lambda d: d == torch.bool,
}


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def check_tensor(
    x: Any,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: str | Iterable[str | torch.dtype] | None = None,
) -> Tensor:
    """Check that ``x`` is a tensor of an allowed dtype kind and rank; return it.

    ``dtypes`` holds kinds (``"float"``, ``"int"``, ``"bool"``) or concrete ``torch.dtype`` values.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if dtypes is not None:
        allowed = [dtypes] if isinstance(dtypes, (str, torch.dtype)) else list(dtypes)
        ok = any(
            (_DTYPE_KINDS[d](x.dtype) if isinstance(d, str) else x.dtype == d) for d in allowed
        )
        if not ok:
            wanted = " or ".join(str(d) for d in allowed)
            article = "an" if wanted[0] in "aeiou" else "a"
            raise TypeError(f"`{name}` must have {article} {wanted} dtype, got {x.dtype}.")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(
                f"`{name}` must have {want} dimensions, got {x.ndim} (shape {_shape(x)})."
            )
    return x


def check_min_ndim(x: Tensor, name: str, ndim: int) -> None:
    """Check that ``x`` has at least ``ndim`` dimensions."""
    if x.ndim < ndim:
        raise ValueError(
            f"`{name}` must have at least {ndim} dimensions, got {x.ndim} (shape {_shape(x)})."
        )


def check_shape(x: Tensor, name: str, shape: Sequence[int | None]) -> None:
    """Check ``x.shape`` against ``shape``, where ``None`` matches any size."""
    got = _shape(x)
    if len(got) != len(shape) or any(
        s is not None and s != g for s, g in zip(shape, got, strict=True)
    ):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"`{name}` must have shape {want}, got {got}.")


def check_same_shape(x: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    """Check that ``x`` has exactly the shape of ``ref``."""
    if x.shape != ref.shape:
        raise ValueError(
            f"`{name}` must have the same shape as `{ref_name}` {_shape(ref)}, got {_shape(x)}."
        )


def check_same_device(x: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    """Check that ``x`` lives on the device of ``ref``."""
    if x.device != ref.device:
        raise ValueError(
            f"`{name}` must be on the device of `{ref_name}` ({ref.device}), got {x.device}."
        )


def check_positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    """Check that ``value`` is a Python (or 0-d integer tensor) int > 0 (or >= 0); return it."""
    if isinstance(value, Tensor) and value.ndim == 0 and not value.dtype.is_floating_point:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return value


def check_real(value: Any, name: str) -> float:
    """Check that ``value`` is a finite real Python number; return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    return value


def check_range(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check that a finite number lies in the interval given by ``low``/``high``; return it."""
    value = check_real(value, name)
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"`{name}` must lie in {interval}, got {value}.")
    return value


def check_probability(value: Any, name: str, *, low_open: bool = True) -> float:
    """Check that ``value`` lies in (0, 1] (or [0, 1] with ``low_open=False``)."""
    return check_range(value, name, low=0.0, high=1.0, low_open=low_open)


def check_option(value: Any, name: str, options: Sequence[Any]) -> Any:
    """Check that ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"`{name}` must be one of {tuple(options)!r}, got {value!r}.")
    return value


def check_finite(x: Tensor, name: str, where: Tensor | None = None) -> None:
    """Check that ``x`` holds no NaN/Inf (only at ``where`` if given). Synchronises."""
    bad = ~torch.isfinite(x)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        count = int(bad.sum())
        raise ValueError(f"`{name}` must be finite, got {count} NaN/Inf value(s).")


def resolve_valid(
    valid: Tensor | None, ref: Tensor, name: str = "valid", ref_name: str = "input"
) -> Tensor:
    """Return a bool ``[traj, chunk]`` mask matching ``ref.shape[:2]`` (all True when None)."""
    if valid is None:
        return torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)
    check_tensor(valid, name, ndim=2, dtypes="bool")
    if valid.shape != ref.shape[:2]:
        raise ValueError(
            f"`{name}` must have shape {_shape(ref)[:2]} (the first two sizes of `{ref_name}`), "
            f"got {_shape(valid)}."
        )
    check_same_device(valid, name, ref, ref_name)
    return valid


def resolve_mask(mask: Any, name: str, ref: Tensor, ref_name: str) -> Tensor:
    """Return ``mask`` checked against ``ref`` (bool, same shape and device), or all True if None."""
    if mask is None:
        return torch.ones(ref.shape, dtype=torch.bool, device=ref.device)
    check_tensor(mask, name, dtypes="bool")
    check_same_shape(mask, name, ref, ref_name)
    check_same_device(mask, name, ref, ref_name)
    return mask


def values_checkable(x: Tensor, validate_args: bool) -> bool:
    """Whether value checks on ``x`` should run: exactly when the caller asks.

    One rule everywhere (as in torchmetrics): metadata checks (type, dtype, shape, device) always
    run, because they read no tensor contents; value checks (finite, in range, layout invariants)
    read contents on the host, which synchronises an accelerator, so they run only with
    ``validate_args=True``, on every device. ``x`` is accepted for call-site symmetry.
    """
    del x
    return bool(validate_args)


def check_packed_rows(rows: int, name: str, selection_mask: Tensor, validate_args: bool) -> None:
    """Check that a packed tensor has one row per selected chunk (``selection.mask.sum()``).

    Runs where value checks run (see `values_checkable`): it reads the selection's count.
    """
    if values_checkable(selection_mask, validate_args):
        selected = int(selection_mask.sum())
        if selected != rows:
            raise ValueError(
                f"`{name}` must have one row per selected chunk of `selection` ({selected}), "
                f"got {rows} rows."
            )


def check_power(value: Any, name: str = "power") -> float:
    """Check that ``value`` is a positive finite real number (an exponent); return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if not 0 < value < float("inf"):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
    return value


def check_process_group(group: Any, name: str = "process_group") -> Any:
    """Check that ``group`` is None or a ``torch.distributed`` process group; return it."""
    if group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            f"`{name}` must be a torch.distributed.ProcessGroup or None, got "
            f"{type(group).__name__}."
        )
    return group


def check_finite_nonnegative(
    x: Tensor, name: str, where: Tensor | None = None, where_desc: str = ""
) -> None:
    """Check that ``x`` is finite and >= 0 (only at ``where`` if given). Synchronises once.

    The happy path is one fused reduction (``aminmax`` propagates NaN); the counting pass runs
    only to word the error. ``where_desc`` (e.g. ``" at valid chunks"``) goes after the rule.
    """
    if x.numel() == 0:
        return
    xs = x if where is None else torch.where(where, x, 0)
    if xs.dtype == torch.bool:
        return
    low, high = torch.aminmax(xs.detach())
    if float(low) >= 0 and float(high) < float("inf"):  # NaN fails both
        return
    bad = ~((xs >= 0) & (xs < float("inf")))
    first = xs[bad][0].item()
    raise ValueError(
        f"`{name}` must be finite and non-negative{where_desc}, got {int(bad.sum())} bad "
        f"value(s) (first: {first})."
    )


def check_bool(value: Any, name: str) -> bool:
    """Check that ``value`` is a Python bool (or a 0-d bool tensor); return it as bool."""
    if isinstance(value, Tensor) and value.ndim == 0 and value.dtype == torch.bool:
        return bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}.")
    return value


def count_tensor(value: Any, name: str, device: torch.device) -> Tensor:
    """A count >= 0 given as an int or a 0-d integer tensor, as a 0-d int64 tensor on `device`.

    A tensor is not read on the host (no sync); an int is checked by `check_positive_int`.
    """
    if isinstance(value, Tensor):
        check_tensor(value, name, ndim=0, dtypes="int")
        return value.to(device=device, dtype=torch.int64)
    count = check_positive_int(value, name, allow_zero=True)
    return torch.tensor(count, dtype=torch.int64, device=device)


def check_generator(generator: Any) -> None:
    """Check that `generator` is a torch.Generator or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__}."
        )
