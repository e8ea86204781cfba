"""The whole PCM pipeline on synthetic rollouts: label, score, select, shrink, masked GRPO loss.

Synthetic pick-and-place-like rollouts: each trajectory approaches, closes the gripper for a while,
transports and releases, with variable lengths (padding). Success depends on the actions in the
chunks just before the grasp, so the success-failure variance concentrates on the pre-grasp and
active-grip phases, and PCM learns to spend its budget there.

    python examples/pcm_synthetic.py [--steps 6] [--budget 12] [--seed 0]
"""

import argparse
import time

import torch
from torch import nn

import chunkmask

H, D, BINS = 8, 7, 256  # steps per chunk, action dims (gripper last), action-token bins


def synthetic_rollouts(num_prompts: int, group_size: int, max_chunks: int, generator: torch.Generator):
    """Rollouts padded to `max_chunks` chunks, with gripper-last continuous actions."""
    traj = num_prompts * group_size
    lengths = torch.randint(max_chunks // 2, max_chunks + 1, (traj,), generator=generator)
    chunk = torch.arange(max_chunks)
    valid = chunk[None, :] < lengths[:, None]
    grasp_start = (lengths * 0.3).long() + torch.randint(0, 3, (traj,), generator=generator)
    grasp_end = (lengths * 0.75).long()
    closed = (chunk[None, :] >= grasp_start[:, None]) & (chunk[None, :] < grasp_end[:, None])
    actions = 0.1 * torch.randn(traj, max_chunks, H, D, generator=generator)
    gripper = torch.where(closed, 1.0, -1.0)[..., None].expand(traj, max_chunks, H).clone()
    # The gripper starts closing near the end of the chunk before the grasp (a pre-grasp chunk).
    pre = chunk[None, :] == (grasp_start[:, None] - 1)
    gripper[pre] = torch.cat([-torch.ones(H - 3), torch.ones(3)])  # f = 3/8: pre-grasp
    actions[..., -1] = gripper
    # Outcome: a good alignment just before and at the grasp decides success.
    near_grasp = (chunk[None, :] >= grasp_start[:, None] - 2) & (chunk[None, :] <= grasp_start[:, None] + 1)
    offset = torch.randn(traj, generator=generator)
    actions[..., :3] += torch.where(near_grasp, offset[:, None], 0.0)[..., None, None]
    success = offset.abs() < 0.8
    group = torch.arange(num_prompts).repeat_interleave(group_size)
    obs = torch.randn(traj, max_chunks, 32, generator=generator)
    return obs, actions, valid, success, group


class TokenMLPPolicy(nn.Module):
    """An MLP from a chunk's observation to its H*D discretised action tokens (256 bins each)."""

    def __init__(self, obs_dim: int = 32, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(obs_dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, H * D * BINS)

    def log_prob(self, obs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.body(obs)).view(*obs.shape[:-1], H * D, BINS)
        return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data_gen = torch.Generator().manual_seed(args.seed)
    policy = TokenMLPPolicy()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    masker = chunkmask.ProbabilisticChunkMasker(
        budget=args.budget, num_phases=chunkmask.NUM_PHASES,
        scoring=chunkmask.PhaseScoring(refresh_every=3), seed=args.seed,
    )
    names = [p.name.lower() for p in chunkmask.pcm.Phase if p != chunkmask.pcm.Phase.PAD]
    print(f"PCM on synthetic rollouts: {args.prompts} prompts x {args.group_size} rollouts, "
          f"N={args.chunks} chunks, budget B={args.budget}")
    print(f"{'step':>4} {'succ':>5} {'kept':>9} {'loss':>9} {'|grad|':>7} {'ms':>6}  "
          "keep probabilities / selected chunks per phase")
    last = {}
    for step in range(args.steps):
        obs, actions, valid, success, group = synthetic_rollouts(args.prompts, args.group_size, args.chunks, data_gen)
        tokens = ((actions.clamp(-1, 1) + 1) / 2 * (BINS - 1)).round().long().flatten(2)  # (traj, N, H*D)
        with torch.no_grad():
            old_logp = policy.log_prob(obs, tokens)  # behaviour log-probs, as the rollout recorded them

        start = time.perf_counter()
        # --- the PCM part of the update ---
        adv = chunkmask.group_relative_advantages(success.float(), group)
        info = masker.update(actions=actions, success=success, group=group, valid=valid)  # once a step
        sel = masker.draw(info.phases, valid=valid)
        batch = chunkmask.shrink({"obs": obs, "tokens": tokens, "old_logp": old_logp, "adv": adv}, sel)
        logp = policy.log_prob(batch["obs"], batch["tokens"])
        out = chunkmask.masked_grpo_loss(
            logp, old_logp=batch["old_logp"], advantages=batch["adv"], selection=sel
        )
        # ---
        optimizer.zero_grad()
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm=2.0)
        optimizer.step()
        ms = 1e3 * (time.perf_counter() - start)

        kept = int(sel.counts.sum())
        total = int(valid.sum())
        keep = " ".join(f"{n}={p:.2f}" for n, p in zip(names, info.keep_probabilities.tolist(), strict=True))
        alloc = " ".join(f"{n}={c}" for n, c in zip(names, info.selected_per_phase(sel).tolist(), strict=True))
        print(f"{step:>4} {success.float().mean():>5.2f} {kept:>4}/{total:<4} {out.loss.item():>9.4f} {grad_norm.item():>7.3f} {ms:>6.1f}  {keep}")
        print(f"{'':>45}{alloc}")
        last = {
            "loss": out.loss.item(),
            "grad_norm": grad_norm.item(),
            "kept": kept,
            "total": total,
            "keep_probabilities": info.keep_probabilities.tolist(),
            "selected_per_phase": info.selected_per_phase(sel).tolist(),
        }
    print(f"first trajectory's selected chunks: {sel.indices[0, : int(sel.counts[0])].tolist()} "
          f"(phases {info.phases[0, sel.indices[0, : int(sel.counts[0])]].tolist()})")
    return last


if __name__ == "__main__":
    main()
