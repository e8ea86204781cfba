"""One GPU check: device-parametrised tests, backward savings with peak memory, integrations in bf16.

    python benchmarks/gpu_check.py                      # writes benchmarks/results/gpu_check.json

On a CUDA machine it runs, in under 8 minutes on one GPU:

1. the device-parametrised tests (`DEVICES` includes "cuda" when CUDA is available) and the
   CUDA-only tests, with `pytest -k cuda` over the files that hold them;
2. `backward_savings.py --preset small --device cuda` (speed-up, bytes saved for backward and
   the CUDA allocator peak for each PCM budget);
3. the trainer integrations' losses on CUDA in bfloat16 against float64 on the CPU: verl's
   `chunkmask_pcm` loss function and RLinf's (called directly, so neither trainer needs to be
   installed), the SimpleVLA-RL gather, and the Horvitz-Thompson fold.

Without CUDA every step is recorded as skipped, with the reason, and the JSON is still written.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE_TEST_FILES = [
    "tests/test_action_tokenizer.py",
    "tests/test_masker.py",
    "tests/test_phases.py",
    "tests/test_profiling.py",
    "tests/test_properties.py",
    "tests/test_sampling.py",
    "tests/test_scores.py",
    "tests/test_shrinking.py",
]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"


def _skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def device_tests(timeout_s: int) -> dict[str, Any]:
    """Run the CUDA cases of the device-parametrised tests in a subprocess."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
           *DEVICE_TEST_FILES]  # fmt: skip
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    tail = (out.stdout + out.stderr).strip().splitlines()[-15:]
    return {
        "status": "passed" if out.returncode == 0 else "failed",
        "returncode": out.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(cmd[1:]),
        "tail": tail,
    }


def backward_savings(device: str) -> dict[str, Any]:
    """The backward-savings benchmark on `device` (small preset), peak memory included."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import backward_savings as bench

    t0 = time.perf_counter()
    result = bench.main(["--preset", "small", "--device", device, "--repeats", "3"])
    records = [
        {k: r.get(k) for k in ("budget", "chunks_selected", "chunks_total", "speedup",
                               "peak_saved_ratio", "cuda_peak_bytes", "cuda_peak_ratio")}
        for r in result.get("records", [])
    ]  # fmt: skip
    return {"status": "passed", "seconds": round(time.perf_counter() - t0, 1), "records": records}


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> dict[str, Any]:
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    err = float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-12))
    return {"relative_error": err, "ok": err <= rtol}


def integrations_bf16(device: str) -> dict[str, Any]:
    """The integrations' losses in bf16 on `device` against float64 on the CPU."""
    from chunkmask import masked_grpo_loss, pps_sample
    from chunkmask.batch import gather_chunks, horvitz_thompson_weights
    from chunkmask.integrations.rlinf import pcm_actor_loss
    from chunkmask.integrations.verl._loss import pcm_policy_loss

    g = torch.Generator().manual_seed(0)
    rows, length = 64, 256
    logp = torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.3
    old = logp + 0.1 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    adv = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, length)
    mask = torch.rand(rows, length, generator=g) < 0.9
    config = {"clip_ratio": 0.2, "clip_ratio_high": 0.28, "global_batch_info": {}}
    out: dict[str, Any] = {}
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        ref, _ = pcm_policy_loss(old, logp, adv, mask, mode, config)
        x = logp.to(device, torch.bfloat16).requires_grad_()
        got, _ = pcm_policy_loss(old.to(device, torch.bfloat16), x, adv.to(device, torch.bfloat16),
                                 mask.to(device), mode, config)  # fmt: skip
        got.backward()
        out[f"verl/{mode}"] = _close(got, ref, 2e-2) | {"grad_finite": bool(x.grad.isfinite().all())}
    kw = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "max_episode_steps": 64}
    l3 = logp.reshape(rows, 32, 8)
    o3 = old.reshape(rows, 32, 8)
    a3 = adv.reshape(rows, 32, 8)[..., :1]
    m3 = mask.reshape(rows, 32, 8)[..., :1]
    s3 = m3.sum(1, keepdim=True).expand_as(m3).clamp_min(1)
    ref, _ = pcm_actor_loss(logprobs=l3, old_logprobs=o3, advantages=a3, loss_mask=m3,
                            loss_mask_sum=s3, **kw)  # fmt: skip
    dev = {k: v.to(device) for k, v in dict(advantages=a3, loss_mask=m3, loss_mask_sum=s3).items()}
    dev["advantages"] = dev["advantages"].to(torch.bfloat16)
    got, _ = pcm_actor_loss(logprobs=l3.to(device, torch.bfloat16),
                            old_logprobs=o3.to(device, torch.bfloat16), **dev, **kw)  # fmt: skip
    out["rlinf/embodied"] = _close(got, ref, 2e-2)
    valid = torch.ones(rows, 32, dtype=torch.bool)
    sel = pps_sample(torch.rand(rows, 32, generator=g) + 0.1, 8, valid=valid, scope="trajectory",
                     generator=g)  # fmt: skip
    sel_dev = sel._replace(indices=sel.indices.to(device), mask=sel.mask.to(device),
                           num_chunks=sel.num_chunks.to(device),
                           inclusion=sel.inclusion.to(device))  # fmt: skip
    gathered = gather_chunks(l3.to(device, torch.bfloat16), sel_dev)
    out["simplevla/gather"] = {"ok": bool(torch.equal(gathered.cpu(), gather_chunks(
        l3.to(torch.bfloat16), sel)))}  # fmt: skip
    w = horvitz_thompson_weights(sel_dev, "token-mean", tokens_per_chunk=8)
    traj, slot = sel_dev.packed_slot_index()
    chunk = sel_dev.indices[traj, slot]
    lp = l3.to(device)[traj, chunk].to(torch.bfloat16)
    op = o3.to(device)[traj, chunk].to(torch.bfloat16)
    ap = a3.to(device)[traj, chunk, 0].to(torch.bfloat16)
    ht = masked_grpo_loss(lp, old_logp=op, advantages=ap, selection=sel_dev,
                          loss_agg_mode="token-mean", estimator="horvitz_thompson")  # fmt: skip
    folded = masked_grpo_loss(lp, old_logp=op, advantages=ap * w[traj, slot].to(ap.dtype),
                              selection=sel_dev, loss_agg_mode="token-mean")  # fmt: skip
    out["fold/token-mean"] = _close(folded.loss, ht.loss, 2e-2)
    ok = all(v.get("ok", True) for v in out.values())
    return {"status": "passed" if ok else "failed", "checks": out}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every step (or skip them without CUDA) and return the JSON record."""
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    record: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if cuda:
        steps = {
            "device_tests": lambda: device_tests(args.test_timeout_s),
            "backward_savings": lambda: backward_savings("cuda"),
            "integrations_bf16": lambda: integrations_bf16("cuda"),
        }
        for name, step in steps.items():
            try:
                record[name] = step()
            except Exception as exc:  # one failing step must not hide the others' results
                record[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    else:
        reason = "no CUDA device" if not torch.cuda.is_available() else "--cpu-smoke"
        record["device_tests"] = _skipped(reason)
        record["backward_savings"] = _skipped(reason)
        if args.cpu_smoke:
            record["integrations_bf16"] = integrations_bf16("cpu")
        else:
            record["integrations_bf16"] = _skipped(reason)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    statuses = [v["status"] for v in record.values() if isinstance(v, dict) and "status" in v]
    record["status"] = "failed" if "failed" in statuses else (
        "skipped" if all(s == "skipped" for s in statuses) else "passed")  # fmt: skip
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--test-timeout-s", type=int, default=300)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the integrations' bf16 checks on the CPU (for tests)")  # fmt: skip
    args = p.parse_args(argv)
    record = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v.get("status") if isinstance(v, dict) else v for k, v in record.items()}))
    return record


if __name__ == "__main__":
    record = main()
    sys.exit(1 if record["status"] == "failed" else 0)
