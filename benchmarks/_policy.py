"""A VLA-like policy stand-in and a synthetic rollout batch, shared by the benchmark scripts.

The policy mimics a discrete-token vision-language-action model such as OpenVLA-OFT: each action
chunk is an independent sequence of observation tokens (stand-ins for image patches and the
instruction) followed by `H * D` action tokens, each a bin out of 256. A causal transformer reads
the sequence and predicts every action token from the positions before it. Because the policy is
re-run per chunk, the cost of a forward and backward pass is linear in the number of chunks, which
is what makes dropping chunks from the actor update pay off.

Optional LoRA: the base weights are frozen and low-rank adapters are trained (the PCM paper's
setting), so the optimizer step is tiny and activations dominate.

Nothing here is part of the library: the benchmarks use `chunkmask` only through its public API.
"""

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F


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


class ChunkPolicy(nn.Module):
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
    policy: ChunkPolicy, obs: Tensor, tokens: Tensor, micro_batch_chunks: int
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
