"""Run a function in several gloo processes and collect what each saved (shared by the DP tests)."""

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60


def init_gloo(rank: int, world: int, init_file: str) -> None:
    """Join a file-initialised gloo group; one thread per process keeps the machine responsive."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )


def _entry(rank, fn, world, init_file, out_dir):
    try:
        init_gloo(rank, world, init_file)
        result = fn(rank, world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # report to the parent through a file; the exit code alone loses the cause
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        raise


def run_workers(fn, world, tmp_path):
    """Run `fn(rank, world)` in `world` spawned gloo processes; return each rank's result.

    `fn` must be a module-level function (it is pickled) and return something `torch.save` takes.
    """
    ctx = mp.start_processes(
        _entry,
        args=(fn, world, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the distributed workers did not finish in time")
    except mp.ProcessRaisedException as err:
        errors = [p.read_text() for p in tmp_path.glob("error*.txt")]
        pytest.fail(f"a worker failed: {err}\n" + "\n".join(errors))
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
