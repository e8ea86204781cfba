"""Measurement helpers for actor updates: saved-activation bytes, CUDA peak memory, time and FLOPs.

These are small, dependency-free tools to drop into a training loop or a benchmark:

- `SavedTensorCounter` counts the bytes autograd keeps for the backward pass (the activation
  memory of a graph) through `torch.autograd.graph.saved_tensors_hooks`. It works on any device,
  including the CPU, where no allocator statistics exist.
- `CudaPeakMemory` records the CUDA allocator's peak over a block; on the CPU it records `None`.
- `time_function` times a callable with the `torch.utils.benchmark` clock (which synchronises
  the accelerator before each reading) and returns the median and interquartile range.
- `count_flops` counts the floating-point operations of a callable with
  `torch.utils.flop_counter.FlopCounterMode`, including the CPU attention kernel.

Backward-pass savings of chunk selection are ratios of these quantities between a full update and
a shrunk one; the physical limit of every ratio is `B / N`.
"""

import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.benchmark import Measurement, TaskSpec, set_torch_threads
from torch.utils.benchmark import timer as benchmark_clock
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from chunkmask._checks import check_positive_int, check_real

__all__ = [
    "CudaPeakMemory",
    "FlopCount",
    "SavedTensorCounter",
    "Timing",
    "count_flops",
    "time_function",
]


# --------------------------------------------------------------------------------------------
# Saved-tensor bytes
# --------------------------------------------------------------------------------------------


def _storage_of(t: Tensor) -> Any:
    """The untyped storage under ``t``, or None when it has no addressable one."""
    try:
        storage = t.untyped_storage()
        if storage.data_ptr() == 0:
            return None
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return storage


class SavedTensorCounter:
    """Count the bytes of the tensors that autograd saves for the backward pass.

    Inside the `with` block every tensor that an operation saves for its backward goes through a
    pack hook (`torch.autograd.graph.saved_tensors_hooks`). The counter identifies each saved
    tensor by its storage, so several views of one buffer (a slice, a transpose, an output that
    is also the next op's input) count once, and it counts the whole storage, because that is
    what stays allocated. A storage counts once for as long as it stays allocated, however many
    micro-batches save views of it (an input batch sliced into micro-batches counts once); once
    it is freed (the graph released by `backward()` and no other reference left), a new storage
    saved at the same address counts again. Tensors whose storage belongs to `exclude`
    (typically the model's parameters, which stay in memory whatever the batch size) never
    count. Tensors are returned unchanged: the hooks add bookkeeping only, never copies.

    What the attributes mean, in bytes of storage:

    - `bytes`: total distinct saved storage over the block. For one forward pass this is the
      activation memory of its graph; for several micro-batches, each running its backward
      inside the block, it is their sum, i.e. the activation memory the update would need if it
      ran as a single batch.
    - `peak_bytes`: the largest amount of saved storage allocated at the same time during the
      block, i.e. the activation memory a micro-batched update actually holds at its peak.
    - `live_bytes`: the saved storage still allocated now. A storage stays allocated while the
      graph or anyone else (e.g. the caller holding an output or the input batch) references it.
    - `tensor_bytes`: the naive sum of `numel * element_size` over every saved tensor, views
      counted each time they are saved (for comparison).
    - `num_tensors`: the number of pack-hook calls; `num_storages`: the number of distinct
      storages counted in `bytes`.

    Not counted: tensors saved outside the block, scalars saved as Python numbers, autograd's own
    metadata, gradients, optimizer state, and temporaries that are freed before the backward
    pass (the allocator peak of `CudaPeakMemory` sees those).

    Args:
        exclude: tensors whose storages never count, e.g. `model.parameters()`.

    Example:
        >>> import torch
        >>> x = torch.ones(1000, requires_grad=True)
        >>> with SavedTensorCounter() as saved:
        ...     y = (x * 2).exp()        # exp saves its float32 output: 4000 bytes
        ...     z = y[:500].sin()        # sin saves a view of the same storage: not counted again
        >>> saved.bytes, saved.tensor_bytes, saved.num_tensors, saved.num_storages
        (4000, 6000, 2, 1)
        >>> saved.live_bytes
        4000
        >>> (z.sum() + y.sum()).backward()   # frees the graph's references
        >>> del y                            # and this drops the last one: the storage is freed
        >>> saved.live_bytes
        0
    """

    def __init__(self, *, exclude: Iterable[Tensor] = ()) -> None:
        if isinstance(exclude, Tensor):
            exclude = [exclude]
        try:
            excluded = list(exclude)
        except TypeError:
            raise TypeError(
                f"`exclude` must be an iterable of tensors, got {type(exclude).__name__}."
            ) from None
        self._excluded: set[tuple[Any, ...]] = set()
        for i, t in enumerate(excluded):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"`exclude` must hold only tensors, got {type(t).__name__} at position {i}."
                )
            storage = _storage_of(t.detach())
            if storage is not None:
                self._excluded.add((str(t.device), storage.data_ptr()))
        self.bytes = 0
        self.peak_bytes = 0
        self.live_bytes = 0
        self.tensor_bytes = 0
        self.num_tensors = 0
        self.num_storages = 0
        # storage key -> bytes, for saved storages that are still allocated
        self._live: dict[tuple[Any, ...], int] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _release(self, key: tuple[Any, ...]) -> None:
        nbytes = self._live.pop(key, None)
        if nbytes is not None:
            self.live_bytes -= nbytes

    def _pack(self, t: Tensor) -> Tensor:
        self.num_tensors += 1
        nbytes = int(t.numel() * t.element_size())
        self.tensor_bytes += nbytes
        storage = _storage_of(t)
        if storage is None:
            # No addressable storage (meta, sparse, some subclasses): count the tensor itself.
            self.bytes += nbytes
            self.num_storages += 1
            self.peak_bytes = max(self.peak_bytes, self.live_bytes + nbytes)
            return t
        key = (str(t.device), storage.data_ptr())
        if key in self._excluded or key in self._live:
            return t
        nbytes = int(storage.nbytes())
        self._live[key] = nbytes
        self.bytes += nbytes
        self.num_storages += 1
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        # The storage's Python object lives exactly as long as the storage (torch preserves it),
        # so this fires when the memory is freed and its address may be reused.
        weakref.finalize(storage, self._release, key)
        return t

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    def __enter__(self) -> "SavedTensorCounter":
        if self._hooks is not None:
            raise RuntimeError("`SavedTensorCounter` is already active; it is not re-entrant.")
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.__exit__(*exc)

    def __repr__(self) -> str:
        return (
            f"SavedTensorCounter(bytes={self.bytes}, peak_bytes={self.peak_bytes}, "
            f"live_bytes={self.live_bytes}, num_tensors={self.num_tensors})"
        )


# --------------------------------------------------------------------------------------------
# CUDA peak memory
# --------------------------------------------------------------------------------------------


class CudaPeakMemory:
    """Record the CUDA allocator's peak memory over a block; a no-op (all `None`) elsewhere.

    On entry the device is synchronised and its peak statistics are reset; on exit it is
    synchronised again and `peak_bytes` (`torch.cuda.max_memory_allocated`), `start_bytes`
    (allocated on entry) and `peak_increase_bytes` (their difference: what the block added at its
    peak, activations and temporaries included) are read. With no CUDA device, or a non-CUDA
    `device`, the block runs unchanged and the three attributes stay `None`, so the same code runs
    on a CPU-only machine.

    Args:
        device: the CUDA device to watch. `None` watches the current CUDA device when CUDA is
            available and does nothing otherwise; a CPU (or other non-CUDA) device does nothing.

    Raises:
        ValueError: if `device` names a CUDA device but CUDA is not available.

    Example:
        >>> import torch
        >>> with CudaPeakMemory("cpu") as mem:
        ...     _ = torch.ones(1000) * 2
        >>> mem.active, mem.peak_bytes
        (False, None)
    """

    def __init__(self, device: torch.device | str | int | None = None) -> None:
        if device is None:
            self.device = torch.device("cuda") if torch.cuda.is_available() else None
        else:
            try:
                dev = torch.device(device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"`device` must be a torch.device, a device string or an index, got {device!r}."
                ) from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"`device` is {str(dev)!r} but CUDA is not available.")
            self.device = dev if dev.type == "cuda" else None
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self.peak_increase_bytes: int | None = None

    @property
    def active(self) -> bool:
        """Whether a CUDA device is being watched."""
        return self.device is not None

    def __enter__(self) -> "CudaPeakMemory":
        if self.device is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.peak_increase_bytes = self.peak_bytes - (self.start_bytes or 0)

    def __repr__(self) -> str:
        return (
            f"CudaPeakMemory(device={self.device}, peak_bytes={self.peak_bytes}, "
            f"peak_increase_bytes={self.peak_increase_bytes})"
        )


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Timing(NamedTuple):
    """Wall-clock statistics of one callable, in seconds per call.

    Attributes:
        median: median time per call.
        iqr: interquartile range of the per-call times (75th minus 25th percentile).
        mean: mean time per call.
        times: the per-call time of each measured block (block time / `number_per_run`).
        number_per_run: calls per measured block.
        measurement: the merged `torch.utils.benchmark.Measurement` (for `Compare` tables).
    """

    median: float
    iqr: float
    mean: float
    times: tuple[float, ...]
    number_per_run: int
    measurement: Measurement


def time_function(
    fn: Callable[[], Any],
    *,
    min_run_time: float = 0.2,
    min_repeats: int = 3,
    warmup: int = 1,
    block_time: float = 0.01,
    num_threads: int | None = None,
    label: str = "",
    sub_label: str | None = None,
    description: str | None = None,
) -> Timing:
    """Time a zero-argument callable with the `torch.utils.benchmark` clock and statistics.

    The callable runs `warmup` times untimed; the last warm-up call (or the first call when
    `warmup=0`) also estimates its cost. It is then timed in blocks of `number_per_run` calls,
    chosen so that a block lasts at least `block_time` seconds (one call per block for slow
    callables such as a whole actor update), until at least `min_repeats` blocks ran and at least
    `min_run_time` seconds were measured. Each block is read with `torch.utils.benchmark.timer`,
    which synchronises the accelerator before reading the clock, so queued CUDA work is included,
    and the blocks are summarised by a `torch.utils.benchmark.Measurement`. Unlike
    `Timer.timeit`, no hidden warm-up calls are made, so an expensive callable runs exactly
    `warmup` + (blocks x `number_per_run`) times.

    Args:
        fn: the callable to time; its result is discarded.
        min_run_time: least total measured time in seconds.
        min_repeats: least number of measured blocks (the median and IQR are over blocks).
        warmup: untimed calls before measuring. With `warmup=0` the first call is timed and,
            when blocks hold one call each (a slow callable), kept as the first block.
        block_time: least duration of one block in seconds (0: one call per block).
        num_threads: intra-op threads while timing (restored afterwards); defaults to the
            current `torch.get_num_threads()`.
        label: label stored on the `Measurement` (for `torch.utils.benchmark.Compare`).
        sub_label: sub-label stored on the `Measurement`.
        description: description stored on the `Measurement`.

    Returns:
        A `Timing` with the median, IQR and mean time per call in seconds.

    Raises:
        TypeError: if `fn` is not callable or a count is not an int.
        ValueError: if `min_run_time` or `block_time` is negative or not finite, or a count is out
            of range.

    Example:
        >>> import torch
        >>> x = torch.randn(64, 64)
        >>> t = time_function(lambda: x @ x, min_run_time=0.01, min_repeats=3)
        >>> t.median > 0, len(t.times) >= 3
        (True, True)
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
    min_run_time = check_real(min_run_time, "min_run_time")
    if min_run_time < 0:
        raise ValueError(f"`min_run_time` must be >= 0, got {min_run_time}.")
    block_time = check_real(block_time, "block_time")
    if block_time < 0:
        raise ValueError(f"`block_time` must be >= 0, got {block_time}.")
    min_repeats = check_positive_int(min_repeats, "min_repeats")
    warmup = check_positive_int(warmup, "warmup", allow_zero=True)
    if num_threads is None:
        num_threads = torch.get_num_threads()
    num_threads = check_positive_int(num_threads, "num_threads")

    def run_block(number: int) -> float:
        start = benchmark_clock()
        for _ in range(number):
            fn()
        return benchmark_clock() - start

    raw_times: list[float] = []
    with set_torch_threads(num_threads):
        for _ in range(warmup - 1):
            fn()
        first = run_block(1)
        number = max(1, math.ceil(block_time / max(first, 1e-9))) if block_time > 0 else 1
        if warmup == 0 and number == 1:
            raw_times.append(first)
        total = sum(raw_times)
        while len(raw_times) < min_repeats or total < min_run_time:
            elapsed = run_block(number)
            raw_times.append(elapsed)
            total += elapsed
    task = TaskSpec(
        stmt=getattr(fn, "__name__", "fn") + "()",
        setup="",
        label=label,
        sub_label=sub_label,
        description=description,
        num_threads=num_threads,
    )
    measurement = Measurement(number_per_run=number, raw_times=raw_times, task_spec=task)
    return Timing(
        median=float(measurement.median),
        iqr=float(measurement.iqr),
        mean=float(measurement.mean),
        times=tuple(float(t) for t in measurement.times),
        number_per_run=number,
        measurement=measurement,
    )


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for kernels `FlopCounterMode` does not know, keyed by op packet."""
    formulas: dict[Any, Callable[..., int]] = {}
    aten = torch.ops.aten
    # The CPU flash-attention kernel behind `scaled_dot_product_attention`: same count as the
    # CUDA flash kernel (two batched matmuls forward, four backward; causal masking not halved).
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            _cpu_sdpa_backward_flops
        )
    return formulas


class FlopCount(NamedTuple):
    """Floating-point operations counted while a callable ran.

    Attributes:
        total: total FLOPs (a multiply-add counts 2), forward and backward together when the
            callable runs both.
        by_operator: FLOPs per aten operator name, e.g. `{"mm": ..., "bmm": ...}`.
        output: what the callable returned.
    """

    total: int
    by_operator: dict[str, int]
    output: Any


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
    """Count the FLOPs of `fn(*args, **kwargs)` with `torch.utils.flop_counter.FlopCounterMode`.

    Only operators with a registered formula count: matrix multiplications, convolutions and
    attention kernels, forward and backward. Element-wise operations, reductions, softmax,
    indexing and the optimizer step count zero, so the total is the matmul-class compute, the part
    of an update that shrinking a batch is meant to remove. The CPU attention kernel
    (`_scaled_dot_product_flash_attention_for_cpu` and its backward), which torch's table lacks,
    is counted with the same formula as the CUDA kernels, so CPU and GPU totals agree.
    Counting runs the callable once, on the real device, with dispatch overhead.

    Args:
        fn: the callable; it may run a backward pass and an optimizer step.
        *args: positional arguments for `fn`.
        **kwargs: keyword arguments for `fn`.

    Returns:
        A `FlopCount` with the total, the per-operator split and `fn`'s return value.

    Raises:
        TypeError: if `fn` is not callable.

    Example:
        >>> import torch
        >>> a, b = torch.randn(8, 16), torch.randn(16, 4)
        >>> count = count_flops(torch.mm, a, b)
        >>> count.total, count.by_operator       # 2 * 8 * 16 * 4
        (1024, {'mm': 1024})
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
    mode = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    with mode:
        output = fn(*args, **kwargs)
    counts = mode.get_flop_counts().get("Global", {})
    by_operator = {str(getattr(op, "__name__", op)): int(n) for op, n in counts.items()}
    return FlopCount(total=int(mode.get_total_flops()), by_operator=by_operator, output=output)
