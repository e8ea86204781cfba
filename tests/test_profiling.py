import pytest
import torch

from chunkmask.eval._profiling import (
    CudaPeakMemory,
    FlopCount,
    SavedTensorCounter,
    Timing,
    count_flops,
    time_function,
)

# --------------------------------------------------------------------------------------------
# SavedTensorCounter
# --------------------------------------------------------------------------------------------


def test_saved_counts_output_of_exp_once_across_views():
    x = torch.ones(1000, requires_grad=True)
    with SavedTensorCounter() as saved:
        y = x.exp()  # saves its output
        z = y[:500].sin()  # saves a view of the same storage
        w = y.t().cos()  # another view (1-D transpose is a no-op view)
    assert saved.bytes == 4000
    assert saved.num_storages == 1
    assert saved.num_tensors == 3
    assert saved.tensor_bytes == 4000 + 2000 + 4000
    (z.sum() + w.sum()).backward()


@pytest.mark.parametrize(
    "dtype, size", [(torch.float32, 4), (torch.float64, 8), (torch.bfloat16, 2)]
)
def test_saved_bytes_follow_dtype(dtype, size):
    x = torch.ones(10, 3, dtype=dtype, requires_grad=True)
    with SavedTensorCounter() as saved:
        x.exp()
    assert saved.bytes == 30 * size


def test_nothing_saved_under_no_grad_or_outside_block():
    x = torch.ones(100, requires_grad=True)
    with SavedTensorCounter() as saved:
        with torch.no_grad():
            x.exp()
    x.exp()  # outside the block
    assert (saved.bytes, saved.num_tensors, saved.peak_bytes) == (0, 0, 0)


def test_exclude_parameters():
    lin = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(5, 8, requires_grad=True)
    with SavedTensorCounter() as everything:
        lin(x)
    with SavedTensorCounter(exclude=lin.parameters()) as activations:
        lin(x)
    # mm saves the input (for the weight grad) and the weight (for the input grad).
    assert everything.bytes == 5 * 8 * 4 + 4 * 8 * 4
    assert activations.bytes == 5 * 8 * 4


def test_exclude_accepts_a_single_tensor():
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3, requires_grad=True)
    with SavedTensorCounter(exclude=w) as saved:
        (w * x).sum()  # mul saves both factors; `w` is excluded
    assert saved.num_tensors == 2
    assert saved.bytes == 12


def test_micro_batches_sum_and_peak():
    # Two micro-batches, each freed by its backward: `bytes` sums them, `peak_bytes` sees one.
    x = torch.ones(1000, requires_grad=True)
    with SavedTensorCounter() as saved:
        for _ in range(2):
            y = (x * 2).exp()
            y.sum().backward()
            del y
    assert saved.bytes == 8000
    assert saved.peak_bytes == 4000
    assert saved.live_bytes == 0
    assert saved.num_storages == 2


def test_long_lived_input_counts_once_across_micro_batches():
    # Slices of one input batch are saved by every micro-batch; the batch stays allocated, so
    # its storage counts once.
    w = torch.randn(4, requires_grad=True)
    data = torch.randn(6, 4)
    with SavedTensorCounter(exclude=[w]) as saved:
        for i in range(3):
            (data[2 * i : 2 * i + 2] * w).sum().backward()
    assert saved.bytes == data.numel() * 4
    assert saved.num_storages == 1
    assert saved.live_bytes == data.numel() * 4


def test_live_bytes_drop_when_graph_and_references_go():
    x = torch.ones(250, requires_grad=True)
    with SavedTensorCounter() as saved:
        y = x.exp()
    assert saved.live_bytes == 1000
    y.sum().backward()
    assert saved.live_bytes == 1000  # the caller still holds `y`
    del y
    assert saved.live_bytes == 0
    assert saved.bytes == 1000


def test_counter_is_not_reentrant():
    counter = SavedTensorCounter()
    with counter:
        with pytest.raises(RuntimeError, match="already active"):
            counter.__enter__()


def test_counter_can_be_reused_sequentially():
    x = torch.ones(10, requires_grad=True)
    counter = SavedTensorCounter()
    with counter:
        a = x.exp()
    with counter:
        b = x.sin()  # saves x itself
    assert counter.bytes == 80
    del a, b


def test_exclude_type_errors():
    with pytest.raises(TypeError, match="`exclude` must be an iterable of tensors, got int"):
        SavedTensorCounter(exclude=3)
    with pytest.raises(TypeError, match="`exclude` must hold only tensors, got str at position 1"):
        SavedTensorCounter(exclude=[torch.ones(1), "w"])


def test_repr_mentions_bytes():
    assert "bytes=0" in repr(SavedTensorCounter())


# --------------------------------------------------------------------------------------------
# CudaPeakMemory
# --------------------------------------------------------------------------------------------


def test_cuda_peak_memory_is_a_noop_on_cpu():
    with CudaPeakMemory("cpu") as mem:
        torch.ones(100).sum()
    assert not mem.active
    assert (mem.start_bytes, mem.peak_bytes, mem.peak_increase_bytes) == (None, None, None)
    assert "peak_bytes=None" in repr(mem)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only default")
def test_cuda_peak_memory_default_without_cuda():
    with CudaPeakMemory() as mem:
        pass
    assert not mem.active and mem.peak_bytes is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_peak_memory_rejects_cuda_without_cuda():
    with pytest.raises(ValueError, match="`device` is 'cuda:0' but CUDA is not available"):
        CudaPeakMemory("cuda:0")


def test_cuda_peak_memory_rejects_bad_device():
    with pytest.raises(ValueError, match="`device` must be a torch.device"):
        CudaPeakMemory("not-a-device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_on_cuda():
    with CudaPeakMemory("cuda") as mem:
        x = torch.empty(2**20, device="cuda")  # 4 MiB
        del x
    assert mem.active
    assert mem.peak_increase_bytes >= 4 * 2**20


# --------------------------------------------------------------------------------------------
# time_function
# --------------------------------------------------------------------------------------------


def test_time_function_counts_calls_and_returns_stats():
    calls = []
    t = time_function(
        lambda: calls.append(1), min_run_time=0.0, min_repeats=4, warmup=2, block_time=0.0
    )
    assert isinstance(t, Timing)
    assert t.number_per_run == 1
    assert len(t.times) == 4
    assert len(calls) == 2 + 4
    assert t.median >= 0 and t.iqr >= 0 and t.mean >= 0
    assert t.measurement.median == pytest.approx(t.median)


def test_time_function_warmup_zero_keeps_first_call():
    calls = []
    t = time_function(
        lambda: calls.append(1), min_run_time=0.0, min_repeats=1, warmup=0, block_time=0.0
    )
    assert len(calls) == 1 and len(t.times) == 1


def test_time_function_blocks_cheap_calls():
    t = time_function(lambda: None, min_run_time=0.0, min_repeats=2, block_time=0.001)
    assert t.number_per_run > 1
    assert len(t.times) == 2


def test_time_function_keeps_thread_count():
    before = torch.get_num_threads()
    time_function(lambda: None, min_run_time=0.0, min_repeats=1, num_threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"min_run_time": -1.0}, ValueError, "`min_run_time` must be >= 0, got -1.0"),
        ({"min_run_time": float("nan")}, ValueError, "`min_run_time` must be finite"),
        ({"block_time": -0.1}, ValueError, "`block_time` must be >= 0, got -0.1"),
        ({"min_repeats": 0}, ValueError, "`min_repeats` must be > 0, got 0"),
        ({"min_repeats": 1.5}, TypeError, "`min_repeats` must be an int"),
        ({"warmup": -1}, ValueError, "`warmup` must be >= 0, got -1"),
        ({"num_threads": 0}, ValueError, "`num_threads` must be > 0, got 0"),
    ],
)
def test_time_function_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        time_function(lambda: None, **kwargs)


def test_time_function_rejects_non_callable():
    with pytest.raises(TypeError, match="`fn` must be callable, got int"):
        time_function(3)


# --------------------------------------------------------------------------------------------
# count_flops
# --------------------------------------------------------------------------------------------


def test_count_flops_mm_and_output():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    count = count_flops(torch.mm, a, b)
    assert isinstance(count, FlopCount)
    assert count.total == 2 * 8 * 16 * 4
    assert count.by_operator == {"mm": 2 * 8 * 16 * 4}
    torch.testing.assert_close(count.output, a @ b)


def test_count_flops_forward_and_backward_of_linear():
    lin = torch.nn.Linear(16, 4, bias=False)
    x = torch.randn(8, 16, requires_grad=True)

    def step():
        lin(x).sum().backward()

    # forward 2*b*i*o; backward twice that (input and weight gradients).
    assert count_flops(step).total == 3 * 2 * 8 * 16 * 4


def test_count_flops_elementwise_is_free():
    assert count_flops(lambda: torch.randn(100).exp().sum()).total == 0


def test_count_flops_counts_cpu_attention():
    b, h, s, d = 2, 3, 8, 4
    q = torch.randn(b, h, s, d, requires_grad=True)
    fwd = count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q, is_causal=True)
    assert fwd.total == 4 * b * h * s * s * d  # QK^T and PV, 2 FLOPs per multiply-add

    def both():
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    assert count_flops(both).total > fwd.total


def test_count_flops_kwargs_and_errors():
    assert count_flops(torch.matmul, torch.randn(2, 3), other=torch.randn(3, 5)).total == 60
    with pytest.raises(TypeError, match="`fn` must be callable, got str"):
        count_flops("mm")
