"""Backward savings of PCM on the real OpenVLA-OFT architecture (tiny random configs, CPU).

Runs the LIBERO example's own actor update (`examples/libero/train.py::update`: `shrink`, the
OFT forward through `OFTActionModel`, `masked_grpo_loss`, backward, AdamW) on one trajectory of
`N` chunks, for

- `full`: every chunk (`Selection.from_mask(valid)`);
- `pcm`: `B` of the `N` chunks (a uniform draw of `B` positions: the backward cost depends on how
  many chunks are kept, not on which; the selection's own cost is in `selection_overhead.json`).

The two are measured side by side, interleaved (full, pcm, full, pcm, ...) in one process, with
the bytes autograd saves for backward (`chunkmask.eval.SavedTensorCounter`: total over the update
and the peak held at once) and the wall time of each update. Ratios `pcm / full` have the limit
`B / N`. Needs the environment of `.ci/libero_real.sh` (the real OFT modeling code).

    python benchmarks/libero_real_backward.py --threads 1 --out benchmarks/results/libero_real_backward.json

The images are 112 px by default, not OFT's 224: at 224 px the full update of 64 chunks holds
more than 21 GB at its peak and does not fit a 24 GB machine (the saved-bytes ratio depends on
the chunks kept, not on the image size). glibc's mmap threshold is fixed at 1 MiB
(`_return_freed_memory`), so that freed activation buffers go back to the system between
updates; with glibc's adaptive threshold, repeated full updates grew the process past 24 GB.
"""

import argparse
import ctypes
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "libero"))

import train  # noqa: E402
from libero_envs import StandInVecEnv  # noqa: E402
from oft_real import TinyOFTSize  # noqa: E402
from vla_policy import build_tiny_real_policy  # noqa: E402

from chunkmask import ActionTokenizer, Selection  # noqa: E402
from chunkmask.eval import SavedTensorCounter  # noqa: E402

CONFIGS = {
    "tiny": TinyOFTSize(),
    "medium": TinyOFTSize(hidden=256, intermediate=512, layers=4, heads=4),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=CONFIGS)
    parser.add_argument("--chunks", type=int, default=64, help="N, chunks of the trajectory")
    parser.add_argument("--budget", type=int, default=12, help="B, chunks PCM keeps")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved pairs")
    parser.add_argument("--image-size", type=int, default=112,
                        help="the ViTs' input size (OFT: 224; see the module doc)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 0 < args.budget <= args.chunks:
        raise ValueError(f"`budget` must be in [1, {args.chunks}], got {args.budget}.")
    if args.repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {args.repeats}.")
    return args


def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold (M_MMAP_THRESHOLD = -3) at 1 MiB; a no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        pass


def make_batch(policy: Any, chunks: int) -> dict[str, Any]:
    """One trajectory of `chunks` chunks: the stored inputs, sampled tokens, behaviour log-probs."""
    env = StandInVecEnv("spatial", 1, image_size=32)
    inputs = policy.prepare(env.reset([0], [0]), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tokens, logp = policy.sample(inputs, temperature=1.6, generator=gen)
    rep = {k: v[:, None].expand(1, chunks, *v.shape[1:]).clone() for k, v in inputs.items()}
    return {
        "inputs": rep,
        "tokens": tokens[:, None].expand(1, chunks, -1).clone(),
        "old_logp": logp[:, None].expand(1, chunks, -1).clone().float(),
    }


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    size = dataclasses.replace(CONFIGS[name], image_size=args.image_size)
    policy = build_tiny_real_policy(
        ActionTokenizer(), prompt_len=args.prompt_len, lora_r=32, lora_alpha=32, size=size
    )
    model = policy.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cfg = train.Config(micro_batch=1, bf16=False)
    dist = train.Dist(train.Config(smoke=True))
    batch = make_batch(policy, args.chunks)
    valid = torch.ones(1, args.chunks, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    keep = torch.zeros(1, args.chunks, dtype=torch.bool)
    keep[0, torch.randperm(args.chunks, generator=gen)[: args.budget]] = True
    selections = {"full": Selection.from_mask(valid), "pcm": Selection.from_mask(keep)}
    advantages = torch.ones(1)
    seq_len = batch["inputs"]["input_ids"].shape[-1]
    rows: dict[str, list[dict[str, float]]] = {"full": [], "pcm": []}
    for _ in range(args.repeats):
        for arm, selection in selections.items():
            with SavedTensorCounter() as saved:
                t0 = time.perf_counter()
                c0 = time.process_time()
                train.update(policy, batch, selection, advantages, optimizer, params, cfg, dist)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows[arm].append(
                {
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "saved_bytes": saved.bytes,
                    "saved_peak_bytes": saved.peak_bytes,
                }
            )
            print(f"[{name}] {arm}: {rows[arm][-1]}", flush=True)
    summary: dict[str, Any] = {}
    for arm, values in rows.items():
        summary[arm] = {key: statistics.median(v[key] for v in values) for key in values[0]}
    ratios = {key: summary["pcm"][key] / summary["full"][key] for key in summary["full"]}
    oft = policy.model.oft
    return {
        "config": {
            **size.as_dict(),
            "patches_per_sample": oft.vision_backbone.get_num_patches() * size.num_images,
            "text_tokens_per_chunk": seq_len,
            "base_parameters": sum(
                p.numel() for n, p in oft.named_parameters() if "lora_" not in n
            ),
            "trainable_parameters": sum(p.numel() for p in params),
            "lora_r": 32,
            "lora_alpha": 32,
        },
        "median": summary,
        "ratio_pcm_over_full": ratios,
        "limit": args.budget / args.chunks,
        "repeats": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    _return_freed_memory()
    import transformers

    result = {
        "what": "examples/libero update (shrink + OFT forward + masked GRPO + backward + AdamW), "
        "one trajectory, full vs PCM, interleaved",
        "chunks": args.chunks,
        "budget": args.budget,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "configs": {name: run_config(name, args) for name in args.configs},
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
