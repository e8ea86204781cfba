"""The one module the benchmark scripts share: workload, actor trainer and CLI scaffolding.

- the workload: a VLA-like policy stand-in (`VLAStandIn`) and a synthetic rollout batch
  (`make_rollouts`), sized by a `PolicyConfig` preset;
- the actor update the benchmarks time (`ActorTrainer`: micro-batches, masked GRPO loss,
  backward, AdamW step) and `Setup`, which builds the policy, the batch and one update function
  per configuration (full GRPO, PCM at a budget, mask-only);
- the command-line and reporting scaffolding (`base_parser`, `parse`, `torch_device`,
  `metadata`, `emit`), so that every script takes the same core options and writes the same
  metadata.

The stand-in mimics a discrete-token vision-language-action model such as OpenVLA-OFT: each action
chunk is an independent sequence of observation tokens (stand-ins for image patches and the
instruction) followed by `H * D` action tokens, each a bin out of 256. A causal transformer reads
the sequence and predicts every action token from the positions before it. Because the policy is
re-run per chunk, the cost of a forward and backward pass is linear in the number of chunks, which
is what makes dropping chunks from the actor update pay off. Optional LoRA: the base weights are
frozen and low-rank adapters are trained (the PCM paper's setting), so the optimizer step is tiny
and activations dominate.

Nothing here is part of the library: the benchmarks use `chunkmask` only through its public API,
and nothing outside `benchmarks/` (and their tests) imports this module.
"""

import argparse
import contextlib
import datetime
import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from chunkmask import (
    ProbabilisticChunkMasker,
    Selection,
    group_relative_advantages,
    masked_grpo_loss,
    shrink,
)


@dataclass(frozen=True)
class PolicyConfig:
    """Sizes of the stand-in policy and of the rollout batch it is trained on."""

    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    obs_tokens: int = 8
    obs_dim: int = 32
    horizon: int = 8  # H, steps per chunk
    action_dim: int = 7  # D, the last one is the gripper
    bins: int = 256
    lora_rank: int = 0  # 0: train every weight; r > 0: frozen base + rank-r adapters
    # batch
    num_traj: int = 80
    num_chunks: int = 64
    group_size: int = 10
    micro_batch_chunks: int = 128

    @property
    def tokens_per_chunk(self) -> int:
        """Action tokens per chunk, `H * D`."""
        return self.horizon * self.action_dim

    def to_dict(self) -> dict:
        """The fields as a plain dict (for JSON)."""
        return asdict(self)


PRESETS: dict[str, PolicyConfig] = {
    # Seconds per full 80 x 64 update on two CPU cores.
    "small": PolicyConfig(width=32, depth=2, heads=2, obs_tokens=8, obs_dim=16),
    # A GPU-sized model: ~85M parameters, 256 observation tokens per chunk.
    "large": PolicyConfig(
        width=768, depth=12, heads=12, obs_tokens=256, obs_dim=64, micro_batch_chunks=128
    ),
    # For smoke tests only: a fraction of a second per update.
    "tiny": PolicyConfig(
        width=16,
        depth=1,
        heads=2,
        obs_tokens=2,
        obs_dim=8,
        horizon=2,
        action_dim=3,
        num_traj=20,
        num_chunks=8,
        micro_batch_chunks=16,
    ),
}


def get_config(preset: str, **overrides) -> PolicyConfig:
    """A preset with some fields replaced (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"`preset` must be one of {tuple(PRESETS)!r}, got {preset!r}.")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update `x A^T B^T * (alpha / r)`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = (alpha if alpha is not None else 2.0 * rank) / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def _linear(fan_in: int, fan_out: int, rank: int, bias: bool = True) -> nn.Module:
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    return LoRALinear(layer, rank) if rank > 0 else layer


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        w, r = cfg.width, cfg.lora_rank
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(w)
        self.qkv = _linear(w, 3 * w, r)
        self.proj = _linear(w, w, r)
        self.norm2 = nn.LayerNorm(w)
        self.fc1 = _linear(w, cfg.mlp_ratio * w, r)
        self.fc2 = _linear(cfg.mlp_ratio * w, w, r)

    def forward(self, x: Tensor) -> Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, w // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VLAStandIn(nn.Module):
    """Causal transformer over `[obs tokens | action tokens]`, one independent sequence per chunk.

    `log_prob(obs, tokens)` returns the log-probability of each of the `H * D` action tokens of
    each chunk, predicting token `j` from the observation tokens and tokens `< j`.
    """

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"`width` {cfg.width} must be divisible by `heads` {cfg.heads}.")
        self.cfg = cfg
        w, k = cfg.width, cfg.tokens_per_chunk
        self.obs_proj = nn.Linear(cfg.obs_dim, w)
        self.token_emb = nn.Embedding(cfg.bins + 1, w)  # the last id is a start-of-action token
        self.pos_emb = nn.Parameter(torch.randn(cfg.obs_tokens + k, w) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, cfg.bins)
        if cfg.lora_rank > 0:
            # Frozen base: only the adapters (inside the blocks) train, as in LoRA fine-tuning.
            for name, p in self.named_parameters():
                if "lora_" not in name:
                    p.requires_grad_(False)

    def log_prob(self, obs: Tensor, tokens: Tensor) -> Tensor:
        """`(m, K)` log-probabilities of the action `tokens` `(m, K)` given `obs` `(m, n_obs, d)`."""
        m, k = tokens.shape
        start = torch.full((m, 1), self.cfg.bins, dtype=tokens.dtype, device=tokens.device)
        prev = torch.cat([start, tokens[:, :-1]], dim=1)
        x = torch.cat([self.obs_proj(obs), self.token_emb(prev)], dim=1) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x[:, -k:]))
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates."""
    return [p for p in model.parameters() if p.requires_grad]


def make_rollouts(
    cfg: PolicyConfig, *, seed: int = 0, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """A synthetic batch shaped like pick-and-place rollouts.

    Each trajectory approaches with the gripper open, closes it for a sustained stretch, releases
    and idles; grasp timing and action noise differ between successful and failed rollouts, so the
    phases have different success-failure variance. Groups hold `group_size` rollouts of one
    prompt with mixed outcomes. All `num_chunks` chunks are valid, so the full batch has exactly
    `num_traj * num_chunks` chunks and the physical limit of selecting `B` is `B / N`.

    Returns:
        A dict with `obs` `(T, N, n_obs, d)`, `actions` `(T, N, H, D)` in [-1, 1] (last dim: the
        gripper command, +1 closes), `tokens` `(T, N, H * D)` int64 bins, `success` `(T,)` bool,
        `rewards` `(T,)` float, `group` `(T,)` int64 and `valid` `(T, N)` bool.
    """
    g = torch.Generator().manual_seed(seed)
    t_, n, h, d = cfg.num_traj, cfg.num_chunks, cfg.horizon, cfg.action_dim
    group = torch.arange(t_) // cfg.group_size
    success = torch.rand(t_, generator=g) < 0.5
    # Make sure every group has mixed outcomes (first success, second failure).
    first = torch.arange(t_) % cfg.group_size
    success = torch.where(first == 0, True, torch.where(first == 1, False, success))
    steps = n * h
    time = torch.arange(steps, dtype=torch.float32)
    close_start = (torch.rand(t_, generator=g) * 0.2 + 0.25) * steps
    close_len = (torch.rand(t_, generator=g) * 0.15 + 0.25) * steps
    close_start = close_start + torch.where(success, 0.0, 0.05 * steps)
    closed = (time >= close_start[:, None]) & (time < (close_start + close_len)[:, None])
    gripper = torch.where(closed, 1.0, -1.0).view(t_, n, h)
    arm = torch.randn(t_, n, h, d - 1, generator=g) * 0.3
    arm = arm + torch.where(success, 0.2, -0.2)[:, None, None, None] * closed.view(t_, n, h, 1)
    actions = torch.cat([arm.clamp(-1, 1), gripper[..., None]], dim=-1)
    tokens = ((actions + 1) / 2 * (cfg.bins - 1)).round().long().clamp(0, cfg.bins - 1)
    obs = torch.randn(t_, n, cfg.obs_tokens, cfg.obs_dim, generator=g)
    out = {
        "obs": obs,
        "actions": actions,
        "tokens": tokens.view(t_, n, h * d),
        "success": success,
        "rewards": success.float(),
        "group": group,
        "valid": torch.ones(t_, n, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in out.items()}


@torch.no_grad()
def behaviour_log_probs(
    policy: VLAStandIn, obs: Tensor, tokens: Tensor, micro_batch_chunks: int
) -> Tensor:
    """`(T, N, K)` log-probabilities under the current policy (the rollout's `old_logp`)."""
    t_, n = tokens.shape[:2]
    flat_obs, flat_tokens = obs.flatten(0, 1), tokens.flatten(0, 1)
    parts = [
        policy.log_prob(
            flat_obs[i : i + micro_batch_chunks], flat_tokens[i : i + micro_batch_chunks]
        )
        for i in range(0, t_ * n, micro_batch_chunks)
    ]
    return torch.cat(parts).view(t_, n, -1)


# ------------------------------------------------------------------------------------------
# A minimal actor trainer: micro-batches of whole trajectories, at most `micro_batch_chunks`
# chunks each, gradient accumulation, one optimizer step.
# ------------------------------------------------------------------------------------------


def plan_micro_batches(
    counts: list[int], micro_batch_chunks: int
) -> list[tuple[int, int, int, int]]:
    """Group consecutive trajectories into micro-batches of at most `micro_batch_chunks` chunks.

    Returns `(traj_start, traj_stop, row_start, row_stop)` per micro-batch, rows being packed
    chunks. A trajectory longer than the limit gets a micro-batch of its own.
    """
    plan, t0, r0, rows = [], 0, 0, 0
    for t, c in enumerate(counts):
        if rows and rows + c > micro_batch_chunks:
            plan.append((t0, t, r0, r0 + rows))
            t0, r0, rows = t, r0 + rows, 0
        rows += c
    if rows or t0 < len(counts):
        plan.append((t0, len(counts), r0, r0 + rows))
    return plan


class ActorTrainer:
    """Forward/backward in micro-batches with the masked GRPO loss, then one AdamW step.

    The per-micro-batch loss is scaled by its share of trajectories, so the accumulated gradient
    equals that of the `seq-mean-token-mean` loss over the whole (packed) batch.
    """

    def __init__(
        self,
        policy: VLAStandIn,
        *,
        micro_batch_chunks: int,
        lr: float = 1e-5,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.policy = policy
        self.micro_batch_chunks = micro_batch_chunks
        self.optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=lr, foreach=True)
        self.autocast_dtype = autocast_dtype
        self.device_type = next(policy.parameters()).device.type

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's autocast context (a no-op in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def update(
        self,
        batch: dict[str, torch.Tensor],
        selection: Selection,
        counts: list[int],
        mask: torch.Tensor | None = None,
    ) -> int:
        """One actor update on a packed batch; returns the number of micro-batches."""
        num_micro_batches = self.accumulate(batch, selection, counts, mask)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return num_micro_batches

    def accumulate(
        self,
        batch: dict[str, torch.Tensor],
        selection: Selection,
        counts: list[int],
        mask: torch.Tensor | None = None,
    ) -> int:
        """Forward and backward over the micro-batches, accumulating gradients (no step)."""
        plan = plan_micro_batches(counts, self.micro_batch_chunks)
        num_traj = len(counts)
        for t0, t1, r0, r1 in plan:
            with self.autocast():
                logp = self.policy.log_prob(batch["obs"][r0:r1], batch["tokens"][r0:r1])
            out = masked_grpo_loss(
                logp,
                old_logp=batch["old_logp"][r0:r1],
                advantages=batch["adv"][r0:r1],
                selection=selection.rows(slice(t0, t1)),
                mask=None if mask is None else mask[r0:r1],
            )
            (out.loss * ((t1 - t0) / num_traj)).backward()
        return len(plan)


# ------------------------------------------------------------------------------------------
# The configurations
# ------------------------------------------------------------------------------------------


class Setup:
    """The policy, the rollout batch and one update function per configuration."""

    def __init__(self, cfg: PolicyConfig, *, device: torch.device, dtype: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = device
        self.policy = VLAStandIn(cfg).to(device)
        autocast = torch.bfloat16 if dtype == "bfloat16" else None
        self.trainer = ActorTrainer(
            self.policy, micro_batch_chunks=cfg.micro_batch_chunks, autocast_dtype=autocast
        )
        data = make_rollouts(cfg, seed=seed, device=device)
        self.data = data
        with self.trainer.autocast():
            old_logp = behaviour_log_probs(
                self.policy, data["obs"], data["tokens"], cfg.micro_batch_chunks
            ).float()
        self.adv = group_relative_advantages(data["rewards"], data["group"])
        self.per_chunk = {
            "obs": data["obs"],
            "tokens": data["tokens"],
            "old_logp": old_logp,
            "adv": self.adv,
        }
        t_, n = cfg.num_traj, cfg.num_chunks
        # Every chunk is valid, so the packed full batch is the row-major flattening: no gather.
        self.full_batch = {
            "obs": data["obs"].flatten(0, 1),
            "tokens": data["tokens"].flatten(0, 1),
            "old_logp": old_logp.flatten(0, 1),
            "adv": self.adv[:, None].expand(t_, n).reshape(-1),
        }
        self.seed = seed

    def masker(self, budget: int) -> ProbabilisticChunkMasker:
        """A fresh PCM masker with budget `budget`, seeded like the setup."""
        return ProbabilisticChunkMasker(budget, seed=self.seed)

    def select(self, masker: ProbabilisticChunkMasker) -> Selection:
        """`masker`'s selection on the rollout batch."""
        d = self.data
        return masker.select(
            actions=d["actions"], success=d["success"], group=d["group"], valid=d["valid"]
        )

    # -- update functions; each returns the number of chunks forwarded and of micro-batches --

    def full_update(self) -> tuple[int, int]:
        selection = Selection.from_mask(self.data["valid"])
        counts = selection.counts.tolist()
        return sum(counts), self.trainer.update(self.full_batch, selection, counts)

    def pcm_update_fn(self, budget: int) -> tuple[Callable[[], tuple[int, int]], Callable[[], Any]]:
        masker = self.masker(budget)

        def select_and_shrink() -> tuple[dict[str, torch.Tensor], Selection, list[int]]:
            selection = self.select(masker)
            counts = selection.counts.tolist()  # the one host sync: sizes the micro-batches
            batch = shrink(self.per_chunk, selection, size=sum(counts), validate_args=False)
            return batch, selection, counts

        def update() -> tuple[int, int]:
            batch, selection, counts = select_and_shrink()
            return sum(counts), self.trainer.update(batch, selection, counts)

        return update, select_and_shrink

    def mask_only_update_fn(
        self, budget: int
    ) -> tuple[Callable[[], tuple[int, int]], Callable[[], Any]]:
        masker = self.masker(budget)
        k = self.cfg.tokens_per_chunk

        def select_mask() -> tuple[torch.Tensor, Selection, list[int]]:
            chosen = self.select(masker).chunk_mask()
            token_mask = chosen.reshape(-1, 1).expand(-1, k)
            full = Selection.from_mask(self.data["valid"])
            return token_mask, full, full.counts.tolist()

        def update() -> tuple[int, int]:
            token_mask, full, counts = select_mask()
            return sum(counts), self.trainer.update(self.full_batch, full, counts, mask=token_mask)

        return update, select_mask


# ------------------------------------------------------------------------------------------
# Command line and reporting
# ------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes.

    `--preset`, `--device`, `--dtype`, `--threads`, `--num-traj`, `--num-chunks`, `--seed` and
    `--out` (the JSON path); each script adds its own options and then calls `parse`.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16 runs the forward under autocast",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1; 0 keeps torch's default)",
    )
    p.add_argument("--num-traj", type=int, default=None)
    p.add_argument("--num-chunks", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    return p


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv` (the command line when None) and record it as `args.argv` for `metadata`."""
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def torch_device(args: argparse.Namespace) -> torch.device:
    """Apply `--threads` (0 keeps torch's default) and return the `--device`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def metadata(
    benchmark: str,
    args: argparse.Namespace,
    device: torch.device,
    cfg: PolicyConfig,
    **extra: Any,
) -> dict[str, Any]:
    """The `meta` block of a result: software, machine, preset, configuration, date, argv."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "benchmark": benchmark,
        "torch_version": torch.__version__,
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "dtype": args.dtype,
        "preset": args.preset,
        **extra,
        "config": cfg.to_dict(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(args.argv),
    }


def emit(result: dict[str, Any], table: str, out: Path | None) -> None:
    """Print the table and, when `out` is given, write `result` there as JSON."""
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
