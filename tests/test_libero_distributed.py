"""A 2-process gloo run of examples/libero/train.py --smoke (DDP on CPU).

Checks that the PCM keep probabilities (the all-reduced `PhaseScoreBuffer`) and the LoRA weights
after each DDP step are identical on both ranks, while each rank selects its own chunks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "libero" / "train.py"


def test_two_rank_gloo_smoke_run_agrees(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        cmd = [
            sys.executable,
            str(TRAIN),
            "--smoke",
            "--env",
            "stand-in",
            "--no-progress",
            "--log-all-ranks",
            "--prompts-per-step",
            "4",
            "--init-method",
            init,
            "--out",
            str(tmp_path / "run"),
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:  # pragma: no cover
            for p in procs:
                p.kill()
            raise
        outputs.append(out.decode(errors="replace"))
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    run = tmp_path / "run"
    ranks = [
        [json.loads(line) for line in (run / name).read_text().splitlines()]
        for name in ("metrics.jsonl", "metrics.rank1.jsonl")
    ]
    assert [len(r) for r in ranks] == [2, 2]
    for r0, r1 in zip(*ranks, strict=True):
        assert (r0["rank"], r1["rank"]) == (0, 1)
        assert r0["keep_probabilities"] == r1["keep_probabilities"]
        assert r0["param_checksum"] == r1["param_checksum"]  # DDP kept the LoRA weights equal
        for key in ("chunks_executed", "chunks_backpropagated", "selected_per_phase", "success"):
            assert r0[key] == r1[key]  # global (all-reduced) counts
        local = r0["local_chunks_backpropagated"] + r1["local_chunks_backpropagated"]
        assert local == r0["chunks_backpropagated"]
        assert r0["global_batch_size"] == r1["global_batch_size"] == r0["kept_trajectories"]
    assert "world=2" in outputs[0]
