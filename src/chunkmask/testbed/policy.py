"""A small VLA-like chunked policy: a transformer over state tokens and a task token.

Like OpenVLA-OFT, the policy decodes a whole action chunk in parallel: `H` learned step queries
attend to the scene tokens (end effector, each object, the bin) and the task token, and each query
emits `D` categorical distributions over 256 action bins. A chunk is therefore `H * D` discrete
action tokens, ordered step-major (token `h * D + d` is dimension `d` of step `h`), each with its
own log-probability. Sampling divides the logits by a temperature.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int64
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from chunkmask._checks import check_positive_int, check_range
from chunkmask.testbed.env import ACTION_DIM, EE_FEATURES, OBJ_FEATURES, ObsLayout


def actions_to_tokens(
    actions: Float[Tensor, "*batch dim"], bins: int = 256
) -> Int64[Tensor, "*batch dim"]:
    """Discretise actions in `[-1, 1]` into `bins` uniform bins (nearest bin centre).

    Example:
        >>> actions_to_tokens(torch.tensor([-1.0, 0.0, 1.0])).tolist()
        [0, 128, 255]
    """
    scaled = (actions.clamp(-1, 1) + 1) / 2 * (bins - 1)
    return scaled.round().long()


def tokens_to_actions(
    tokens: Int64[Tensor, "*batch dim"], bins: int = 256
) -> Float[Tensor, "*batch dim"]:
    """Map action tokens back to the centres of their bins in `[-1, 1]`.

    Example:
        >>> tokens_to_actions(torch.tensor([0, 255])).tolist()
        [-1.0, 1.0]
    """
    return tokens.float() / (bins - 1) * 2 - 1


class TokenChunkPolicy(nn.Module):
    """Transformer policy emitting a chunk of `horizon x action_dim` discretised action tokens.

    Args:
        layout: observation layout of the environment (`PickPlaceVectorEnv.layout`).
        num_tasks: number of task ids (the task token's vocabulary).
        horizon: chunk length `H` (steps).
        action_dim: action dimensions `D`.
        bins: bins per action dimension.
        d_model: transformer width.
        depth: transformer layers.
        heads: attention heads.
        mlp_ratio: feed-forward width as a multiple of `d_model`.
        gradient_checkpointing: recompute each layer's activations in the backward pass when
            training (as RL actor configurations of verl and SimpleVLA-RL do by default).

    Example:
        >>> from chunkmask.testbed.env import obs_layout
        >>> policy = TokenChunkPolicy(obs_layout(2), num_tasks=2, d_model=32, depth=1, heads=2)
        >>> obs = torch.zeros(3, 23)
        >>> policy(obs).shape
        torch.Size([3, 40, 256])
    """

    def __init__(
        self,
        layout: ObsLayout,
        *,
        num_tasks: int,
        horizon: int = 8,
        action_dim: int = ACTION_DIM,
        bins: int = 256,
        d_model: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        gradient_checkpointing: bool = False,
    ) -> None:
        for name, value in (
            ("num_tasks", num_tasks),
            ("horizon", horizon),
            ("action_dim", action_dim),
            ("bins", bins),
            ("d_model", d_model),
            ("depth", depth),
            ("heads", heads),
            ("mlp_ratio", mlp_ratio),
        ):
            check_positive_int(value, name)
        if d_model % heads:
            raise ValueError(f"`d_model` must be divisible by `heads`={heads}, got {d_model}.")
        super().__init__()
        self.layout = layout
        self.horizon = horizon
        self.action_dim = action_dim
        self.bins = bins
        self.num_tokens = horizon * action_dim
        # Scene tokens get their features plus offsets to the end effector (and the bin); the
        # episode clock is left out so that the policy reacts to the scene, not the time.
        self.ee_proj = nn.Linear(EE_FEATURES - 1, d_model)
        self.obj_proj = nn.Linear(OBJ_FEATURES + 5, d_model)
        self.obj_slot = nn.Parameter(torch.randn(layout.num_objects, d_model) * 0.02)
        self.bin_proj = nn.Linear(2 + 3, d_model)
        self.task_embed = nn.Embedding(num_tasks, d_model)
        self.queries = nn.Parameter(torch.randn(horizon, d_model) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                heads,
                d_model * mlp_ratio,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.gradient_checkpointing = gradient_checkpointing
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, action_dim * bins)

    def _tokens(self, obs: Tensor) -> Tensor:
        lay = self.layout
        n = obs.shape[0]
        ee = obs[:, lay.ee]
        objs = obs[:, lay.objects].reshape(n, lay.num_objects, OBJ_FEATURES)
        bin_xy = obs[:, lay.bin]
        ee_xyz = ee[:, None, :3]
        obj_rel = objs[..., :3] - ee_xyz
        obj_to_bin = objs[..., :2] - bin_xy[:, None]
        bin_rel = torch.cat([bin_xy, bin_xy - ee[:, :2], -ee[:, 2:3]], dim=1)
        task = obs[:, lay.task].long().clamp(0, self.task_embed.num_embeddings - 1)
        return torch.cat(
            [
                self.ee_proj(ee[:, : EE_FEATURES - 1])[:, None],
                self.obj_proj(torch.cat([objs, obj_rel, obj_to_bin], dim=-1)) + self.obj_slot,
                self.bin_proj(bin_rel)[:, None],
                self.task_embed(task)[:, None],
                self.queries.expand(n, -1, -1),
            ],
            dim=1,
        )

    def forward(self, obs: Float[Tensor, "batch obs"]) -> Float[Tensor, "batch token bin"]:
        """Logits of every action token, `(batch, H * D, bins)`."""
        x = self._tokens(obs)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        steps = self.norm(x[:, -self.horizon :])
        logits = self.head(steps)  # (batch, H, D * bins)
        return logits.reshape(obs.shape[0], self.num_tokens, self.bins)

    def log_prob(
        self,
        obs: Float[Tensor, "batch obs"],
        tokens: Int64[Tensor, "batch token"],
        *,
        temperature: float = 1.0,
    ) -> tuple[Float[Tensor, "batch token"], Float[Tensor, "batch token"]]:
        """Per-token log-probabilities of `tokens` and per-token entropies, at `temperature`."""
        check_range(temperature, "temperature", low=0.0, low_open=True)
        logp_all = F.log_softmax(self(obs) / temperature, dim=-1)
        logp = logp_all.gather(-1, tokens[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    @torch.no_grad()
    def sample(
        self,
        obs: Float[Tensor, "batch obs"],
        *,
        temperature: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        with_entropy: bool = True,
    ) -> tuple[
        Int64[Tensor, "batch token"], Float[Tensor, "batch token"], Float[Tensor, " batch"] | None
    ]:
        """Sample a chunk of tokens.

        Returns:
            `(tokens, logp, entropy)`: `(batch, H * D)` tokens and their log-probabilities at
            `temperature`, and the chunk's mean token entropy `(batch,)`.
        """
        check_range(temperature, "temperature", low=0.0, low_open=True)
        logp_all = F.log_softmax(self(obs) / temperature, dim=-1)
        probs = logp_all.exp()
        if greedy:
            tokens = logp_all.argmax(-1)
        else:
            # Inverse-CDF draw: one uniform per token, reproducible through `generator`.
            u = torch.rand((*probs.shape[:-1], 1), generator=generator, device=probs.device)
            cdf = probs.cumsum(-1)
            tokens = torch.searchsorted(cdf, u * cdf[..., -1:])[..., 0].clamp_max(self.bins - 1)
        logp = logp_all.gather(-1, tokens[..., None])[..., 0]
        entropy = -(probs * logp_all).sum(-1).mean(-1) if with_entropy else None
        return tokens, logp, entropy

    def chunk_actions(
        self, tokens: Int64[Tensor, "batch token"]
    ) -> Float[Tensor, "batch step dim"]:
        """Decode a chunk of tokens into `(batch, H, D)` continuous actions."""
        return tokens_to_actions(tokens, self.bins).reshape(-1, self.horizon, self.action_dim)
