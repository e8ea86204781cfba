"""Action-chunked PPO with self behaviour cloning (and PCM chunk selection) on MetaWorld, on CPU.

A small chunked Gaussian policy with a value head is first fitted by behaviour cloning to a few
demonstrations of MetaWorld's own scripted expert (`metaworld.policies`), so that it starts good but
imperfect (the SFT policy). Then one of three post-training variants runs from that start:

- ``ppo``: chunk-level PPO (`chunk_rewards`, `chunk_gae` with gamma^H between chunks,
  `chunk_log_prob`, the clipped surrogate `chunked_ppo_loss`, the clipped Huber `value_loss`);
- ``ppo_sbc``: the same plus self behaviour cloning: successful rollouts enter a `SuccessBuffer`
  and a `bc_loss` on it is added with an adaptive weight (`--bc-weight`: ``constant``,
  ``success_rate``, ``loss_balance`` or ``product``, see `make_bc_weight`);
- ``ppo_sbc_pcm``: the same, but the PPO and value losses see only the chunks that
  `ProbabilisticChunkMasker` selects (select, `shrink`, loss on the packed batch).

``ppo_sbc+<rule>`` (and ``ppo_sbc_pcm+<rule>``) runs the variant with weight rule ``<rule>``: the
weight-rule ablation.

Each run reports the deterministic (mean-action) success rate and steps-to-success on a fixed set of
evaluation goals (`--eval-episodes`, 50 by default: the first goals the evaluation env draws for
the seed, the same for SFT and every variant), the wall-clock and CPU time split into rollout,
update and evaluation, the environment steps, the PPO and BC gradient norms per iteration, and
learning curves (on the first `--curve-episodes` of those goals) as PNG.

The SFT demonstrations come from the scripted expert on the first goals of the training env's
sequence, with MetaWorld's full horizon (500 steps) whatever the RL episode cap; training then
starts from the next goal.

Environment conventions: state observations (39-d), actions in [-1, 1]^4 whose last dim is the
gripper (+1 closes). Reward: the MetaWorld dense reward divided by 100 per step; on success the
episode terminates with a terminal bonus of ``10 * 0.01 / (1 - gamma)`` (= 10 for gamma = 0.99),
the discounted value of staying at the maximum reward forever, so reaching success sooner is always
better. Episodes are cut at ``--max-steps`` (truncation, bootstrapped by the critic).

Results are resumable per (task, seed, variant): the SFT checkpoint goes to
``OUT/<task>/seed<k>/sft.pt`` and one JSON record per finished variant (and ``sft.json``) to
``RESULTS/<task>/seed<k>/`` (``--results``, default ``--out``); a variant whose record exists is
loaded, not rerun, and a record made with another config is refused. The study driver is
``benchmarks/chunked_ppo_study.py``.

Usage::

    python examples/metaworld_chunked_ppo.py --task pick-place-v3 --seed 0 \
        --variants ppo ppo_sbc ppo_sbc_pcm ppo_sbc+loss_balance --out runs/chunked_ppo
    python examples/metaworld_chunked_ppo.py --quick      # seconds; used by the tests

Requires the ``metaworld`` extra (``pip install chunkmask[metaworld]``).
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chunkmask import (
    NUM_PHASES,
    Clip,
    ProbabilisticChunkMasker,
    Selection,
    bc_loss,
    chunk_gae,
    chunk_log_prob,
    chunked_ppo_loss,
    shrink,
    value_loss,
)
from chunkmask.advantages import chunk_rewards, whiten_advantages
from chunkmask.selfbc import (
    ConstantBCWeight,
    EvictOldest,
    EvictSlowest,
    LossBalanceBCWeight,
    ProductBCWeight,
    SuccessBuffer,
    SuccessRateBCWeight,
)

VARIANTS = ("ppo", "ppo_sbc", "ppo_sbc_pcm")
# The adaptive PPO/BC weight rules (`--bc-weight`); "balance" and "success" are older aliases.
BC_WEIGHT_RULES = ("constant", "success_rate", "loss_balance", "product")
_BC_WEIGHT_ALIASES = {"balance": "loss_balance", "success": "success_rate"}
# MetaWorld's own episode horizon (`max_path_length`): the scripted experts are given this long.
EXPERT_HORIZON = 500

# Number of expert demonstrations for the SFT start, chosen so that the SFT policy (mean action) is
# imperfect: about 0.35 / 0.35 / 0.6 success on seed 0's evaluation goals. Other tasks default to 5.
TASK_DEMOS = {"pick-place-v3": 10, "drawer-close-v3": 1, "window-open-v3": 2}


@dataclasses.dataclass
class Config:
    task: str = "pick-place-v3"
    seed: int = 0
    chunk_size: int = 5
    max_steps: int = 150
    hidden: int = 128
    # SFT
    num_demos: int = 0  # 0: TASK_DEMOS.get(task, 5)
    # Scale of the expert's arm (xyz) actions in the demos; < 1 gives slower demonstrations (as
    # human teleoperation is slower than a scripted controller), which RL can then speed up.
    demo_speed: float = 1.0
    sft_steps: int = 1500
    sft_batch: int = 256
    sft_lr: float = 1e-3
    init_log_std: float = -1.6
    # PPO
    # 40 x 32 episodes (about 120k-145k env steps): the budget the pilots chose
    # (docs/chunked_ppo_pilot.md); 30 x 8 stopped at 0.5 success.
    iterations: int = 40
    episodes_per_iter: int = 32
    ppo_epochs: int = 4
    num_minibatches: int = 4
    lr: float = 3e-4
    critic_lr: float = 1e-3
    gamma: float = 0.99
    lam: float = 0.95
    clip_low: float = 0.2
    clip_high: float = 0.28
    value_clip: float = 0.2
    huber_delta: float = 10.0
    max_grad_norm: float = 1.0
    reward_scale: float = 0.01
    critic_warmup_iters: int = 2
    # self-BC
    buffer_capacity: int = 128
    bc_batch_traj: int = 8
    buffer_eviction: str = "slowest"  # slowest | oldest
    # One of BC_WEIGHT_RULES (or the aliases balance / success). In the study's ablation
    # (docs/chunked_ppo.md) no rule changed success and the strong-BC rules were slower, so the
    # default is success_rate; its BC term is small (about 3% of the gradient).
    bc_weight: str = "success_rate"
    bc_constant: float = 0.1
    bc_balance_cap: float = 10.0
    # Clip the actor's and the critic's gradients separately, so that the critic's gradient norm
    # does not set the actor's step (under Adam a common rescaling changes little; not measured).
    separate_clip: bool = True
    # PCM
    pcm_budget: int = 8
    # evaluation
    eval_episodes: int = 50
    curve_episodes: int = 20  # intermediate evaluations use the first `curve_episodes` goals
    eval_every: int = 10
    quick: bool = False


def quick_config(cfg: Config) -> Config:
    """A tiny configuration that exercises every code path in seconds."""
    return dataclasses.replace(
        cfg,
        max_steps=60,
        hidden=32,
        num_demos=2,
        sft_steps=20,
        iterations=2,
        critic_warmup_iters=0,
        episodes_per_iter=2,
        ppo_epochs=1,
        num_minibatches=2,
        buffer_capacity=4,
        bc_batch_traj=2,
        pcm_budget=2,
        eval_episodes=1,
        curve_episodes=1,
        eval_every=2,
        quick=True,
    )


# --------------------------------------------------------------------------------------------
# Environment and expert


def make_env(task: str, seed: int, max_steps: int):
    """A single MetaWorld MT1 environment; the seed fixes the sequence of goals drawn by reset."""
    import gymnasium as gym
    import metaworld  # noqa: F401  (registers the Meta-World/ environments)

    warnings.filterwarnings("ignore", module="gymnasium")
    return gym.make(
        "Meta-World/MT1",
        env_name=task,
        seed=seed,
        max_episode_steps=max_steps,
        disable_env_checker=True,
    )


def checkpoint(env):
    """The state (task RNG, sampled goal sequence) of a MetaWorld env, to replay its goals."""
    return _checkpointer(env).get_checkpoint()


def restore(env, state) -> None:
    _checkpointer(env).load_checkpoint([state])


def _checkpointer(env):
    w = env
    while not hasattr(type(w), "get_checkpoint"):
        if not hasattr(w, "env"):
            raise RuntimeError("This MetaWorld env has no CheckpointWrapper.")
        w = w.env
    return w


def expert_policy(task: str):
    """MetaWorld's scripted expert for `task` (e.g. pick-place-v3 -> SawyerPickPlaceV3Policy)."""
    import metaworld.policies as policies

    base = task.rsplit("-v", 1)[0]
    name = "Sawyer" + "".join(p.capitalize() for p in base.split("-")) + "V3Policy"
    if not hasattr(policies, name):
        raise ValueError(f"`task` has no scripted expert {name!r} in metaworld.policies.")
    return getattr(policies, name)()


def collect_demos(env, task: str, num: int, max_steps: int = EXPERT_HORIZON,
                  max_tries: int | None = None, speed: float = 1.0) -> list[dict[str, np.ndarray]]:
    """Roll the scripted expert until success; keep `num` successful demonstrations.

    The expert gets `max_steps` steps per try (MetaWorld's own horizon by default, whatever the
    RL episode cap), because some experts are slow: drawer-close-v3's needs more than 60 steps.
    `speed` scales the expert's arm (xyz) actions, not the gripper's. Each demo's ``"try"`` is
    the number of resets up to it (the last demo's is the number of goals used).

    Raises:
        ValueError: if `num` or `max_steps` is not a positive int.
        RuntimeError: if fewer than `num` of `max_tries` (default `5 * num`) tries succeed.
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"`num` must be a positive int, got {num!r}.")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive int, got {max_steps!r}.")
    if not 0.0 < speed <= 1.0:
        raise ValueError(f"`speed` must lie in (0, 1], got {speed!r}.")
    scale = np.array([speed, speed, speed, 1.0], np.float32)
    max_tries = 5 * num if max_tries is None else max_tries
    expert = expert_policy(task)
    demos: list[dict[str, np.ndarray]] = []
    tries = 0
    while len(demos) < num and tries < max_tries:
        tries += 1
        obs, _ = env.reset()
        obs_l, act_l = [], []
        for _ in range(max_steps):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                act = np.clip(expert.get_action(obs), -1.0, 1.0).astype(np.float32) * scale
            obs_l.append(obs.astype(np.float32))
            act_l.append(act)
            obs, _, terminated, truncated, info = env.step(act)
            if info["success"]:
                demos.append({"obs": np.stack(obs_l), "actions": np.stack(act_l), "try": tries})
                break
            if terminated or truncated:
                break
    if len(demos) < num:
        raise RuntimeError(
            f"The scripted expert of {task} succeeded in {len(demos)} of {tries} tries within "
            f"{max_steps} steps; {num} demonstrations were asked for."
        )
    return demos


# --------------------------------------------------------------------------------------------
# Policy


class GaussianChunkPolicy(nn.Module):
    """Gaussian policy over action chunks (H x D, tanh-bounded mean, learned log-std) + critic."""

    def __init__(self, obs_dim: int, act_dim: int, chunk_size: int, hidden: int, init_log_std: float):
        super().__init__()
        self.chunk_size, self.act_dim = chunk_size, act_dim
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.actor = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, chunk_size * act_dim),
        )
        self.log_std = nn.Parameter(torch.full((chunk_size, act_dim), float(init_log_std)))
        self.critic = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, 1),
        )

    def norm(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs - self.obs_mean) / self.obs_std).clamp(-10, 10)

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.actor(self.norm(obs))
        return torch.tanh(out).view(*obs.shape[:-1], self.chunk_size, self.act_dim)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.norm(obs)).squeeze(-1)

    def dim_log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Per-step, per-dim Gaussian log-densities `(..., H, D)` of `actions`."""
        mu = self.mean(obs)
        log_std = self.log_std.clamp(-5.0, 1.0)
        z = (actions - mu) / log_std.exp()
        return -0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)

    def actor_parameters(self) -> list[nn.Parameter]:
        return list(self.actor.parameters()) + [self.log_std]


def fit_sft(policy: GaussianChunkPolicy, demos, cfg: Config, gen: torch.Generator) -> dict[str, float]:
    """Behaviour cloning on the demos: each step's observation predicts the next H actions."""
    obs_all = torch.from_numpy(np.concatenate([d["obs"] for d in demos]))
    policy.obs_mean.copy_(obs_all.mean(0))
    policy.obs_std.copy_(obs_all.std(0).clamp_min(1e-2))
    H, D = cfg.chunk_size, demos[0]["actions"].shape[1]
    obs_l, tgt_l, mask_l = [], [], []
    for d in demos:
        T = len(d["actions"])
        acts = np.concatenate([d["actions"], np.zeros((H, D), np.float32)])
        for t in range(T):
            obs_l.append(d["obs"][t])
            tgt_l.append(acts[t : t + H])
            mask_l.append(np.arange(H) < T - t)
    obs = torch.from_numpy(np.stack(obs_l))
    tgt = torch.from_numpy(np.stack(tgt_l))
    step_mask = torch.from_numpy(np.stack(mask_l))
    opt = torch.optim.Adam(policy.actor.parameters(), lr=cfg.sft_lr)
    loss = torch.zeros(())
    for _ in range(cfg.sft_steps):
        idx = torch.randint(len(obs), (min(cfg.sft_batch, len(obs)),), generator=gen)
        logp = chunk_log_prob(
            policy.dim_log_prob(obs[idx], tgt[idx]),
            mask=step_mask[idx, :, None].expand(-1, -1, D),
            event_dims=2,
        )
        loss = bc_loss(logp, event_size=H * D)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"sft_loss": float(loss.detach()), "sft_samples": len(obs)}


# --------------------------------------------------------------------------------------------
# Rollouts


def run_episodes(env, policy: GaussianChunkPolicy, cfg: Config, num: int, *, deterministic: bool,
                 gen: torch.Generator | None = None) -> dict[str, Any]:
    """Run `num` episodes chunk by chunk; return padded `(traj, N, ...)` tensors and outcomes."""
    H, D = cfg.chunk_size, policy.act_dim
    N = math.ceil(cfg.max_steps / H)
    obs_dim = policy.obs_mean.shape[0]
    out = {
        "obs": torch.zeros(num, N, obs_dim),
        "next_obs": torch.zeros(num, N, obs_dim),
        "actions": torch.zeros(num, N, H, D),
        "rewards": torch.zeros(num, N, H),
        "step_mask": torch.zeros(num, N, H, dtype=torch.bool),
        "valid": torch.zeros(num, N, dtype=torch.bool),
        "terminated": torch.zeros(num, N, dtype=torch.bool),
        "truncated": torch.zeros(num, N, dtype=torch.bool),
    }
    success = torch.zeros(num, dtype=torch.bool)
    steps_to_success = torch.full((num,), cfg.max_steps, dtype=torch.int64)
    lengths = torch.zeros(num, dtype=torch.int64)
    bonus = 10.0 * cfg.reward_scale / (1.0 - cfg.gamma)
    for i in range(num):
        obs, _ = env.reset()
        t_env = 0
        for c in range(N):
            o = torch.as_tensor(obs, dtype=torch.float32)
            with torch.no_grad():
                mu = policy.mean(o)
                if deterministic:
                    chunk = mu
                else:
                    std = policy.log_std.clamp(-5.0, 1.0).exp()
                    chunk = mu + std * torch.randn(mu.shape, generator=gen)
            out["obs"][i, c] = o
            out["actions"][i, c] = chunk
            out["valid"][i, c] = True
            done = False
            exec_chunk = chunk.clamp(-1.0, 1.0).numpy()
            for j in range(H):
                obs, r, terminated, truncated, info = env.step(exec_chunk[j])
                t_env += 1
                out["step_mask"][i, c, j] = True
                reward = cfg.reward_scale * float(r)
                if info["success"]:
                    reward += bonus
                    success[i] = True
                    steps_to_success[i] = t_env
                    out["terminated"][i, c] = True
                    done = True
                elif truncated or t_env >= cfg.max_steps:
                    out["truncated"][i, c] = True
                    done = True
                out["rewards"][i, c, j] = reward
                if done:
                    break
            out["next_obs"][i, c] = torch.as_tensor(obs, dtype=torch.float32)
            if done:
                break
        lengths[i] = t_env
    out.update(success=success, steps_to_success=steps_to_success, lengths=lengths)
    return out


def episode_summary(success: list[bool], steps: list[int]) -> dict[str, float]:
    """Success rate, mean steps over successes (NaN if none) and mean steps with failures at cap."""
    wins = [s for s, ok in zip(steps, success, strict=True) if ok]
    return {
        "success": sum(success) / len(success),
        "steps_to_success": sum(wins) / len(wins) if wins else float("nan"),
        "steps_all": sum(steps) / len(steps),
    }


def evaluate(eval_env, eval_state, policy: GaussianChunkPolicy, cfg: Config,
             episodes: int | None = None) -> dict[str, Any]:
    """Mean-action success and steps-to-success on the same goals every time.

    The goals are the first `episodes` (default `cfg.eval_episodes`) of the sequence that the
    evaluation env draws from `eval_state`, so every variant (and SFT) of a seed sees the same ones.
    """
    restore(eval_env, eval_state)
    res = run_episodes(eval_env, policy, cfg, episodes or cfg.eval_episodes, deterministic=True)
    succ = res["success"]
    steps = res["steps_to_success"].float()
    return {
        "success": float(succ.float().mean()),
        # Mean over the successful episodes (the paper's "steps to success").
        "steps_to_success": float(steps[succ].mean()) if bool(succ.any()) else float("nan"),
        # Failures counted as the episode cap: comparable across different success rates.
        "steps_all": float(steps.mean()),
        "per_episode_success": succ.tolist(),
        "per_episode_steps": res["steps_to_success"].tolist(),
    }


# --------------------------------------------------------------------------------------------
# Post-training


def bc_weight_rule_name(name: str) -> str:
    """The canonical rule name of `name` (one of `BC_WEIGHT_RULES` or an alias)."""
    rule = _BC_WEIGHT_ALIASES.get(name, name)
    if rule not in BC_WEIGHT_RULES:
        raise ValueError(f"`bc_weight` must be one of {BC_WEIGHT_RULES} (or an alias in "
                         f"{tuple(_BC_WEIGHT_ALIASES)}), got {name!r}.")
    return rule


def make_bc_weight(cfg: Config):
    """The PPO/BC weight rule named by `cfg.bc_weight`.

    - ``constant``: `ConstantBCWeight(bc_constant)`;
    - ``success_rate``: `SuccessRateBCWeight(0.02, 0.5, momentum=0.5)`, high while rollouts fail;
    - ``loss_balance``: `LossBalanceBCWeight(0.5)` on the two gradient norms, capped at
      `bc_balance_cap`;
    - ``product``: loss_balance times a success-rate factor in [0, 1].
    """
    rule = bc_weight_rule_name(cfg.bc_weight)
    if rule == "constant":
        return ConstantBCWeight(cfg.bc_constant)
    if rule == "success_rate":
        return SuccessRateBCWeight(low=0.02, high=0.5, momentum=0.5)
    balance = LossBalanceBCWeight(ratio=0.5, momentum=0.8, high=cfg.bc_balance_cap, initial=0.1)
    if rule == "loss_balance":
        return balance
    return ProductBCWeight(balance, SuccessRateBCWeight(low=0.0, high=1.0, momentum=0.5))


def split_variant(variant: str) -> tuple[str, str | None]:
    """Split ``"ppo_sbc+<rule>"`` (a weight-rule ablation) into its base variant and rule."""
    base, sep, rule = variant.partition("+")
    if base not in VARIANTS or (sep and base == "ppo"):
        raise ValueError(f"`variant` must be one of {VARIANTS}, optionally with '+<bc weight rule>' "
                         f"after ppo_sbc or ppo_sbc_pcm, got {variant!r}.")
    if not sep:
        return base, None
    return base, bc_weight_rule_name(rule)


def _grad_norm(grads) -> float:
    total = torch.zeros(())
    for g in grads:
        if g is not None:
            total = total + g.detach().float().square().sum()
    return float(total.sqrt())


def post_train(policy: GaussianChunkPolicy, variant: str, cfg: Config, env, eval_env, eval_ckpt,
               sft_eval: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run one variant from the SFT policy; return its history and final evaluation."""
    base, rule = split_variant(variant)
    if rule is not None:
        cfg = dataclasses.replace(cfg, bc_weight=rule)
    from tqdm.auto import tqdm

    use_bc = base in ("ppo_sbc", "ppo_sbc_pcm")
    use_pcm = base == "ppo_sbc_pcm"
    gen = torch.Generator().manual_seed(10_000 * cfg.seed + 17)
    opt = torch.optim.Adam(
        [
            {"params": policy.actor_parameters(), "lr": cfg.lr},
            {"params": policy.critic.parameters(), "lr": cfg.critic_lr},
        ]
    )
    eviction = {"slowest": EvictSlowest, "oldest": EvictOldest}.get(cfg.buffer_eviction)
    if eviction is None:
        raise ValueError(f"`buffer_eviction` must be one of ('slowest', 'oldest'), "
                         f"got {cfg.buffer_eviction!r}.")
    buffer = SuccessBuffer(cfg.buffer_capacity, eviction=eviction()) if use_bc else None
    weight_rule = make_bc_weight(cfg) if use_bc else None
    masker = ProbabilisticChunkMasker(cfg.pcm_budget, NUM_PHASES, seed=cfg.seed) if use_pcm else None
    H, D = cfg.chunk_size, policy.act_dim
    history: list[dict[str, Any]] = []
    n_curve = min(cfg.curve_episodes, cfg.eval_episodes)

    def curve_point(it: int, ev: dict[str, Any]) -> dict[str, Any]:
        # Every point of the curve uses the same first `n_curve` goals.
        return {"iteration": it, **episode_summary(ev["per_episode_success"][:n_curve],
                                                   ev["per_episode_steps"][:n_curve])}

    curve = [curve_point(0, sft_eval)]
    t_rollout = t_update = t_eval = 0.0
    env_steps = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(1, cfg.iterations + 1), desc=f"{cfg.task} {variant} s{cfg.seed}",
               disable=not progress, leave=False)
    for it in bar:
        t0 = time.perf_counter()
        batch = run_episodes(env, policy, cfg, cfg.episodes_per_iter, deterministic=False, gen=gen)
        t_rollout += time.perf_counter() - t0
        env_steps += int(batch["lengths"].sum())

        t0 = time.perf_counter()
        valid = batch["valid"]
        with torch.no_grad():
            step_mask_d = batch["step_mask"][..., None].expand(-1, -1, -1, D)
            old_logp = chunk_log_prob(policy.dim_log_prob(batch["obs"], batch["actions"]),
                                      mask=step_mask_d, event_dims=2)
            old_values = policy.value(batch["obs"])
            next_values = policy.value(batch["next_obs"])
        rewards = chunk_rewards(batch["rewards"], mask=batch["step_mask"], gamma=cfg.gamma)
        gae = chunk_gae(
            rewards, old_values, valid=valid,
            terminated=batch["terminated"], truncated=batch["truncated"], next_values=next_values,
            chunk_steps=batch["step_mask"].sum(-1), gamma=cfg.gamma, lam=cfg.lam,
            chunk_size=H,
        )
        adv = whiten_advantages(gae.advantages, mask=valid)
        success = batch["success"]
        if use_pcm:
            selection = masker.select(actions=batch["actions"].clamp(-1, 1), success=success,
                                      group=torch.zeros_like(success, dtype=torch.int64),
                                      valid=valid)
        else:
            selection = Selection.from_mask(valid)
        packed = shrink(
            {"obs": batch["obs"], "actions": batch["actions"], "step_mask": step_mask_d,
             "old_logp": old_logp, "adv": adv, "returns": gae.returns, "old_values": old_values},
            selection,
        )
        M = packed["obs"].shape[0]
        if buffer is not None:
            buffer.add_batch(
                {"obs": batch["obs"], "actions": batch["actions"].clamp(-1, 1),
                 "step_mask": batch["step_mask"], "valid": valid},
                success=success, steps=batch["steps_to_success"],
            )
        critic_only = it <= cfg.critic_warmup_iters
        stats = {"ppo_gn": 0.0, "bc_gn": 0.0, "critic_gn": 0.0, "bc_loss": 0.0, "clip_frac": 0.0,
                 "v_loss": 0.0}
        n_mb = 0
        weight = weight_rule.value if weight_rule is not None else 0.0
        actor_params = policy.actor_parameters()
        critic_params = list(policy.critic.parameters())
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(M, generator=gen)
            for mb in perm.chunk(cfg.num_minibatches):
                opt.zero_grad()
                logp = chunk_log_prob(policy.dim_log_prob(packed["obs"][mb], packed["actions"][mb]),
                                      mask=packed["step_mask"][mb], event_dims=2)
                pol = chunked_ppo_loss(logp, old_logp=packed["old_logp"][mb],
                                       advantages=packed["adv"][mb],
                                       clip=Clip(low=cfg.clip_low, high=cfg.clip_high))
                vl = value_loss(policy.value(packed["obs"][mb]), returns=packed["returns"][mb],
                                old_values=packed["old_values"][mb], value_clip=cfg.value_clip,
                                huber_delta=cfg.huber_delta)
                if critic_only:
                    vl.backward()
                else:
                    (pol.loss + vl).backward()
                stats["ppo_gn"] += _grad_norm([p.grad for p in actor_params])
                if buffer is not None and len(buffer) > 0 and not critic_only:
                    demo = buffer.sample(cfg.bc_batch_traj, generator=gen)
                    dv = demo["valid"]
                    d_logp = chunk_log_prob(
                        policy.dim_log_prob(demo["obs"][dv], demo["actions"][dv]),
                        mask=demo["step_mask"][dv][..., None].expand(-1, -1, D), event_dims=2)
                    lbc = bc_loss(d_logp, event_size=H * D)
                    grads = torch.autograd.grad(lbc, actor_params)
                    stats["bc_gn"] += _grad_norm(grads)
                    stats["bc_loss"] += float(lbc.detach())
                    for p, g in zip(actor_params, grads, strict=True):
                        p.grad = g * weight if p.grad is None else p.grad + weight * g
                stats["critic_gn"] += _grad_norm([p.grad for p in critic_params])
                if cfg.separate_clip:
                    nn.utils.clip_grad_norm_(actor_params, cfg.max_grad_norm)
                    nn.utils.clip_grad_norm_(critic_params, cfg.max_grad_norm)
                else:
                    nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                opt.step()
                stats["clip_frac"] += float((pol.clip_frac_low + pol.clip_frac_high).detach())
                stats["v_loss"] += float(vl.detach())
                n_mb += 1
        stats = {k: v / max(n_mb, 1) for k, v in stats.items()}
        if weight_rule is not None and not critic_only and stats["bc_gn"] > 0:
            # Updated only once the buffer holds successes (the BC gradient exists).
            weight = weight_rule.update(success_rate=float(success.float().mean()),
                                        ppo_scale=stats["ppo_gn"], bc_scale=stats["bc_gn"])
        t_update += time.perf_counter() - t0

        row = {
            "iteration": it,
            "train_success": float(success.float().mean()),
            "train_steps": float(batch["steps_to_success"].float().mean()),
            "chunks": int(valid.sum()),
            "chunks_updated": M,
            "bc_weight": weight,
            "buffer": len(buffer) if buffer is not None else 0,
            "log_std": float(policy.log_std.detach().mean()),
            # PPO over (unweighted) BC gradient norm: what LossBalanceBCWeight divides.
            "grad_ratio": stats["ppo_gn"] / stats["bc_gn"] if stats["bc_gn"] > 0 else None,
            "env_steps": env_steps,
            **stats,
        }
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            t0 = time.perf_counter()
            last = it == cfg.iterations
            ev = evaluate(eval_env, eval_ckpt, policy, cfg,
                          episodes=cfg.eval_episodes if last else min(cfg.curve_episodes, cfg.eval_episodes))
            t_eval += time.perf_counter() - t0
            row.update(eval_success=ev["success"], eval_steps=ev["steps_to_success"])
            curve.append(curve_point(it, ev))
            final_eval = ev
        history.append(row)
        bar.set_postfix(train=f"{row['train_success']:.2f}", w=f"{weight:.2f}")
        if not progress and (it % cfg.eval_every == 0 or it == cfg.iterations):
            print(f"{cfg.task} {variant} s{cfg.seed} it {it}: train {row['train_success']:.2f} "
                  f"eval {row.get('eval_success', float('nan')):.2f} w {weight:.3g} "
                  f"ratio {row['grad_ratio'] or 0:.3g} steps {env_steps}", flush=True)
    total = time.perf_counter() - start
    return {
        "variant": variant,
        "config": dataclasses.asdict(cfg),
        "cpu_s": time.process_time() - cpu_start,
        "final": final_eval,
        "history": history,
        "curve": curve,
        "wall_clock_s": total,
        "rollout_s": t_rollout,
        "update_s": t_update,
        "eval_s": t_eval,
        "env_steps": env_steps,
    }


# --------------------------------------------------------------------------------------------
# One task and seed: SFT (cached) and the variants


# Config fields the SFT stage depends on: a cached `sft.pt` made with other values is not reused.
SFT_KEYS = ("task", "seed", "chunk_size", "max_steps", "hidden", "num_demos", "demo_speed", "sft_steps",
            "sft_batch", "sft_lr", "init_log_std", "eval_episodes", "reward_scale", "gamma")


def config_mismatch(saved: dict[str, Any], cfg: Config, keys=None) -> list[str]:
    """The config fields (all, or `keys`) on which a saved record's config differs from `cfg`."""
    now = dataclasses.asdict(cfg)
    return [k for k in (keys or now) if saved.get(k, now[k]) != now[k]]


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON atomically (a temporary file, then a rename), so that a killed run
    never leaves a half-written result that a resumed run would take as finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=True))
    os.replace(tmp, path)


def sft_stage(cfg: Config, out_dir: Path | None, progress: bool = True):
    """Build the envs, fit (or load) the SFT policy and evaluate it; return everything needed."""
    torch.manual_seed(cfg.seed)
    env = make_env(cfg.task, cfg.seed, cfg.max_steps)
    eval_env = make_env(cfg.task, 1000 + cfg.seed, cfg.max_steps)
    eval_ckpt = checkpoint(eval_env)
    obs_dim = env.observation_space.shape[0]
    act_dim = env.action_space.shape[0]
    policy = GaussianChunkPolicy(obs_dim, act_dim, cfg.chunk_size, cfg.hidden, cfg.init_log_std)
    sft_path = out_dir / "sft.pt" if out_dir is not None else None
    saved = torch.load(sft_path, weights_only=False) if sft_path is not None and sft_path.exists() else None
    if saved is not None and config_mismatch(saved.get("config", {}), cfg, SFT_KEYS):
        raise ValueError(
            f"{sft_path} was made with a different config (fields "
            f"{config_mismatch(saved['config'], cfg, SFT_KEYS)}); use another --out or delete it.")
    if saved is not None:
        policy.load_state_dict(saved["policy"])
        sft_eval, sft_info, env_ckpt = saved["eval"], saved["info"], saved["env"]
        restore(env, env_ckpt)
    else:
        t0, c0 = time.perf_counter(), time.process_time()
        num_demos = cfg.num_demos or TASK_DEMOS.get(cfg.task, 5)
        # The expert runs in a twin of the training env (same seed, so the same goal sequence)
        # with MetaWorld's full horizon, so that a short episode cap (--quick) cannot starve a
        # slow expert. The training env then skips the goals the demos used, as if it had drawn
        # them itself.
        demo_env = make_env(cfg.task, cfg.seed, EXPERT_HORIZON)
        demos = collect_demos(demo_env, cfg.task, num_demos, EXPERT_HORIZON, speed=cfg.demo_speed)
        demo_env.close()
        for _ in range(demos[-1]["try"]):
            env.reset()
        gen = torch.Generator().manual_seed(cfg.seed)
        sft_info = fit_sft(policy, demos, cfg, gen)
        sft_info["demo_steps"] = [len(d["actions"]) for d in demos]
        sft_info["sft_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sft_eval = evaluate(eval_env, eval_ckpt, policy, cfg)
        sft_eval["eval_s"] = time.perf_counter() - t0
        sft_info["cpu_s"] = time.process_time() - c0
        env_ckpt = checkpoint(env)
        if sft_path is not None:
            sft_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = sft_path.with_name(f".sft.{os.getpid()}.tmp")
            torch.save({"policy": policy.state_dict(), "eval": sft_eval, "info": sft_info,
                        "env": env_ckpt, "config": dataclasses.asdict(cfg)}, tmp)
            os.replace(tmp, sft_path)
    return env, eval_env, eval_ckpt, policy, sft_eval, sft_info, env_ckpt


def run_task_seed(cfg: Config, variants, out_dir: Path | None, progress: bool = True,
                  results_dir: Path | None = None) -> dict[str, Any]:
    """SFT once, then each variant from a copy of the SFT policy and the same env state.

    Checkpoints (`sft.pt`) go to `out_dir`; the small JSON records (`sft.json`, one
    `<variant>.json` per finished variant) to `results_dir` (default `out_dir`). A variant whose
    JSON exists is loaded, not rerun: the run resumes per (task, seed, variant).
    """
    results_dir = out_dir if results_dir is None else results_dir
    done: dict[str, Any] = {}
    for v in variants:
        split_variant(v)
        path = results_dir / f"{v}.json" if results_dir is not None else None
        if path is not None and path.exists():
            done[v] = json.loads(path.read_text())
            diff = config_mismatch(done[v].get("base_config", {}), cfg)
            if diff:
                raise ValueError(f"{path} was made with a different config (fields {diff}); use "
                                 "another --results directory or delete it.")
    env, eval_env, eval_ckpt, sft_policy, sft_eval, sft_info, env_ckpt = sft_stage(cfg, out_dir, progress)
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "sft": {**sft_eval, **sft_info}}
    if results_dir is not None:
        write_json(results_dir / "sft.json", {"variant": "sft", "config": dataclasses.asdict(cfg),
                                              "final": sft_eval, "info": sft_info})
    for variant in variants:
        path = results_dir / f"{variant}.json" if results_dir is not None else None
        if variant in done:
            results[variant] = done[variant]
            continue
        torch.manual_seed(cfg.seed)
        restore(env, env_ckpt)  # every variant sees the same training goals
        res = post_train(copy.deepcopy(sft_policy), variant, cfg, env, eval_env, eval_ckpt,
                         sft_eval, progress)
        res["base_config"] = dataclasses.asdict(cfg)
        if path is not None:
            write_json(path, res)
        results[variant] = res
    return results


def plot_curves(results: dict[str, Any], path: Path, title: str) -> None:
    """Success and steps-to-success against iteration for each variant (SFT as iteration 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for variant in (k for k in results if k not in ("config", "sft")):
        res = results[variant]
        hist = res["history"]
        axes[0].plot([h["iteration"] for h in hist], [h["train_success"] for h in hist], label=variant)
        c = res["curve"]
        axes[1].plot([p["iteration"] for p in c], [p["success"] for p in c], marker="o", label=variant)
        axes[2].plot([p["iteration"] for p in c], [p["steps_all"] for p in c], marker="o", label=variant)
    axes[0].set_title("rollout success (stochastic)")
    axes[1].set_title("eval success (mean action)")
    axes[2].set_title("eval steps (failures = cap)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarise(results: dict[str, Any]) -> str:
    lines = [f"{'variant':<13} {'success':>8} {'steps':>7} {'steps_all':>9} {'wall_s':>8} {'update_s':>9}"]
    s = results["sft"]
    lines.append(f"{'sft':<13} {s['success']:>8.2f} {s['steps_to_success']:>7.1f} {s['steps_all']:>9.1f} {'':>8} {'':>9}")
    for v in (k for k in results if k not in ("config", "sft")):
        if v in results:
            r = results[v]
            f = r["final"]
            lines.append(f"{v:<13} {f['success']:>8.2f} {f['steps_to_success']:>7.1f} {f['steps_all']:>9.1f} "
                         f"{r['wall_clock_s']:>8.1f} {r['update_s']:>9.2f}")
    return "\n".join(lines)


def _parse_bool(text: str) -> bool:
    """`true`/`1`/`yes` or `false`/`0`/`no` (argparse's `bool` would read "False" as True)."""
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="pick-place-v3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        help=f"any of {VARIANTS}; 'ppo_sbc+<rule>' runs ppo_sbc with weight rule "
                             f"<rule> in {BC_WEIGHT_RULES}")
    parser.add_argument("--out", type=Path, default=None, help="directory for checkpoints and PNG "
                        "(and the JSON records unless --results is given); OUT/<task>/seed<k>/")
    parser.add_argument("--results", type=Path, default=None,
                        help="directory for the JSON records, RESULTS/<task>/seed<k>/")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--no-progress", action="store_true")
    for field in dataclasses.fields(Config):
        if field.name in ("task", "seed", "quick"):
            continue
        kind = _parse_bool if isinstance(field.default, bool) else type(field.default)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = Config(task=args.task, seed=args.seed)
    if args.quick:
        cfg = quick_config(cfg)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if f.name not in ("task", "seed", "quick") and getattr(args, f.name) is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    for v in args.variants:
        try:
            split_variant(v)
        except ValueError as err:
            parser.error(str(err))
    out_dir = args.out / cfg.task / f"seed{cfg.seed}" if args.out is not None else None
    res_dir = args.results / cfg.task / f"seed{cfg.seed}" if args.results is not None else None
    results = run_task_seed(cfg, args.variants, out_dir, progress=not args.no_progress,
                            results_dir=res_dir)
    print(summarise(results))
    if out_dir is not None:
        plot_curves(results, out_dir / "curves.png", f"{cfg.task} seed {cfg.seed}")
        print(f"wrote {out_dir}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("MUJOCO_GL", "egl")
    main()
