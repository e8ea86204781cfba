"""Advantage-weighted chunk weight per phase: full GRPO against PCM's masked objective (Eq. 11).

    python benchmarks/phase_weights.py --sft runs/repro/sft_seed0.pt

Under GRPO every token of trajectory `i` carries its advantage `A_i`, and group advantages sum to
zero, so behaviour shared by successes and failures cancels. What a phase's shared behaviour
receives is `sum_i A_i w_i(phase)`, with `w_i(phase)` the weight of the trajectory's chunks in
that phase: `n_i(phase) / T_i` for full GRPO (`seq-mean-token-mean`), and in expectation
`sum_{t in phase} pi_{i,t} / k_i` for the masked objective, with `pi` the exact inclusion
probabilities of the masker and `k_i` its chunks drawn. The Horvitz-Thompson estimator restores
the full-GRPO weights in expectation. Zero means the phase's shared behaviour cancels.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from chunkmask import NUM_PHASES, ProbabilisticChunkMasker, group_relative_advantages
from chunkmask.pcm import Phase, inclusion_probabilities
from chunkmask.testbed.demo import DemoConfig, make_policy
from chunkmask.testbed.env import PickPlaceConfig, PickPlaceVectorEnv, sample_initial_states
from chunkmask.testbed.rollout import rollout


def weights_by_phase(phases, valid, inclusion, success, group) -> list[dict]:
    """Per-phase weights of both objectives from one batch's tensors (`[traj, chunk]` each)."""
    adv = group_relative_advantages(success.float(), group)
    valid = valid.float()
    pi = inclusion.float() * valid
    weights = {
        "full": valid / valid.sum(1, keepdim=True).clamp_min(1),
        "masked": pi / pi.sum(1, keepdim=True).clamp_min(1e-12),
    }
    rows = []
    for c in range(NUM_PHASES):
        in_phase = (phases == c).float()
        row = {"phase": Phase(c).name.lower()}
        for name, w in weights.items():
            per_traj = (w * in_phase).sum(1)
            row[name] = {
                "success_mean": float(per_traj[success].mean()),
                "failure_mean": float(per_traj[~success].mean()),
                "advantage_weighted": float((adv * per_traj).sum()),
            }
        rows.append(row)
    return rows


def phase_weights(policy, env_cfg, *, prompts: int, group_size: int, budget: int, seed: int):
    """Roll `policy` out in groups, run the masker, and return `weights_by_phase` of the batch."""
    env = PickPlaceVectorEnv(prompts * group_size, env_cfg)
    states = sample_initial_states(
        prompts, config=env_cfg, generator=torch.Generator().manual_seed(seed)
    )
    batch = rollout(
        policy,
        env,
        states.repeat_interleave(group_size),
        generator=torch.Generator().manual_seed(seed + 1),
    )
    group = torch.arange(prompts).repeat_interleave(group_size)
    masker = ProbabilisticChunkMasker(budget=budget, num_phases=NUM_PHASES, seed=seed)
    info = masker.update(
        actions=batch.actions, success=batch.success, group=group, valid=batch.valid
    )
    pi = inclusion_probabilities(  # every chunk's pi under this step's keep probabilities
        masker.weights(info.phases, batch.valid), budget, valid=batch.valid
    )
    return {
        "success_rate": float(batch.success.float().mean()),
        "V_c": info.scores.tolist(),
        "keep_probabilities": info.keep_probabilities.tolist(),
        "phases": weights_by_phase(info.phases, batch.valid, pi, batch.success, group),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", help="SFT checkpoint of the main job's policy")
    parser.add_argument("--quick", action="store_true", help="untrained tiny policy, short run")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.sft is None and not args.quick:
        parser.error("give --sft PATH (or --quick)")
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    env_cfg = PickPlaceConfig(max_steps=cfg.max_steps)
    policy = make_policy(cfg, env_cfg)
    if args.sft is not None:
        policy.load_state_dict(torch.load(args.sft))
    result = phase_weights(
        policy,
        env_cfg,
        prompts=args.prompts,
        group_size=args.group_size,
        budget=args.budget,
        seed=args.seed,
    )
    print(f"success rate {100 * result['success_rate']:.1f}%")
    print("| phase | full GRPO | masked PCM (expected) |")
    print("|---|---|---|")
    for row in result["phases"]:
        full, masked = row["full"]["advantage_weighted"], row["masked"]["advantage_weighted"]
        print(f"| {row['phase']} | {full:+.2f} | {masked:+.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
