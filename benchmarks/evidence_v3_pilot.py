"""Pilot for the v3 evidence study: find a testbed configuration where GRPO itself learns far.

    python benchmarks/evidence_v3_pilot.py --name lr1e-4 --seed 100 --lr 1e-4 --demos 30

Runs GRPO alone (dynamic sampling on, as in the study) from one SFT checkpoint and writes
`benchmarks/results/evidence_v3/pilot/{name}_seed{seed}.json`: the SFT success and the success
after every `--eval-every` steps on `--eval-episodes` fresh states, and the rollout and update
times (one torch thread), so that the update's share of a GRPO step is measured. Pilot seeds are
100 and above: the study's seeds (0-19) never appear in the pilot.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from chunkmask.testbed import sample_initial_states, train
from chunkmask.testbed.demo import DemoConfig, make_policy, sft_checkpoint
from chunkmask.testbed.trainer import evaluate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--demos", type=int, default=100)
    p.add_argument("--expert-noise", type=float, default=0.05)
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--mini-batch", type=int, default=64)
    p.add_argument("--agg", default="token-mean")
    p.add_argument("--objects", type=int, default=1)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--pool", type=int, default=0, help="TrainConfig.prompt_pool")
    p.add_argument("--keep-failed-demos", action="store_true", help="(smoke tests) clone failures")
    p.add_argument("--adam-eps", type=float, default=None,
                   help="diagnostic: AdamW's eps (large values make the steps gradient-scaled)")
    p.add_argument("--positive-only", action="store_true",
                   help="diagnostic: clamp advantages at 0 (no push-down of failed samples)")
    p.add_argument("--distraction", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-episodes", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("runs/evidence_v3_pilot"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/evidence_v3/pilot"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.adam_eps is not None:
        from functools import partial

        from chunkmask.testbed import trainer

        trainer.torch.optim.AdamW = partial(torch.optim.AdamW, eps=args.adam_eps)
    if args.positive_only:
        from chunkmask.testbed import trainer

        plain = trainer.group_relative_advantages
        trainer.group_relative_advantages = lambda *a, **k: plain(*a, **k).clamp_min(0.0)

    cfg = DemoConfig(
        seed=args.seed, demos=args.demos, expert_noise=args.expert_noise,
        sft_steps=args.sft_steps, d_model=args.d_model, depth=args.depth,
        max_steps=args.max_steps, num_objects=args.objects, distraction=args.distraction,
        speed=args.speed, keep_failed_demos=args.keep_failed_demos,
    )
    env_cfg = cfg.env_config()
    args.out.mkdir(parents=True, exist_ok=True)
    sft_key = f"d{args.demos}_n{args.expert_noise}_s{args.sft_steps}_m{args.d_model}x{args.depth}_t{args.max_steps}_o{args.objects}_x{args.distraction}_v{args.speed}"
    state = sft_checkpoint(cfg, env_cfg, args.out / f"sft_{sft_key}_seed{args.seed}.pt")
    states = sample_initial_states(
        args.eval_episodes, config=env_cfg, generator=torch.Generator().manual_seed(90_000 + args.seed)
    )
    if args.pool:  # evaluate on the task's own states (fresh episodes)
        from chunkmask.testbed.trainer import prompt_pool_states

        pool = prompt_pool_states(
            replace(cfg.train, prompt_pool=args.pool, prompts_per_step=args.prompts, seed=args.seed),
            env_cfg,
        )
        states = pool.take(torch.arange(args.eval_episodes) % pool.num)
    policy = make_policy(cfg, env_cfg)
    policy.load_state_dict(state)
    curve = [(0, evaluate(policy, states, seed=80_000 + args.seed, config=env_cfg,
                           temperature=args.temperature))]
    print(f"{args.name} seed {args.seed} SFT: {curve[0][1]:.3f}", flush=True)
    tc = replace(
        cfg.train, selector="full", dynamic_sampling=True, lr=args.lr, steps=args.eval_every,
        prompts_per_step=args.prompts, group_size=args.group, mini_batch=args.mini_batch,
        eval_every=10_000, eval_episodes=2, seed=args.seed, loss_agg_mode=args.agg,
        temperature=args.temperature, prompt_pool=args.pool,
    )
    records, opt, t0 = [], None, time.perf_counter()
    for stop in range(args.eval_every, args.steps + 1, args.eval_every):
        tc = replace(tc, steps=stop)
        result = train(policy, tc, env_config=env_cfg, start_step=stop - args.eval_every,
                       optimizer_state=opt)
        opt = result.optimizer_state
        records += result.records
        curve.append((stop, evaluate(policy, states, seed=80_000 + args.seed, config=env_cfg,
                           temperature=args.temperature)))
        ent = sum(r["entropy"] for r in result.records) / len(result.records)
        print(f"{args.name} seed {args.seed} step {stop}: {curve[-1][1]:.3f} entropy {ent:.3f}",
              flush=True)
    rollout_s = sum(r["rollout_s"] for r in records)
    update_s = sum(r["update_s"] for r in records)
    out = {
        "name": args.name, "args": {k: str(v) for k, v in vars(args).items()},
        "curve": curve, "gain_pp": 100 * (curve[-1][1] - curve[0][1]),
        "rollout_s": rollout_s, "update_s": update_s, "update_share": update_s / (rollout_s + update_s),
        "train_success": [r["train_success"] for r in records],
        "entropy": [r["entropy"] for r in records],
        "chunks_updated_per_step": [r["chunks_updated"] for r in records],
        "chunks_updated": sum(r["chunks_updated"] for r in records),
        "chunks_executed": sum(r["chunks_executed"] for r in records),
        "wall_s": time.perf_counter() - t0,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}_seed{args.seed}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("curve", "gain_pp", "update_share", "wall_s")}))


if __name__ == "__main__":
    main()
