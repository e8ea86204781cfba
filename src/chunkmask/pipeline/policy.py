"""`ChunkPolicy`: the interface of the chunked policy that the pipeline's stages call.

Plain Python, no Ray. The pipeline never imports a concrete policy: `policy_fn()` builds any
`torch.nn.Module` that has the methods below (the testbed's `TokenChunkPolicy` is one).
"""

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class ChunkPolicy(Protocol):
    """What `InferenceServer` and `Learner` (`decoupled_grpo_update`) call on the policy.

    A chunk is `K` discrete action tokens decoded into `H` steps of `D`-dimensional actions.
    Besides the three methods below, the stages use the ordinary `torch.nn.Module` methods
    `train`, `eval`, `parameters`, `state_dict` and `load_state_dict` (and `copy.deepcopy`).
    `isinstance(policy, ChunkPolicy)` checks that every one of them exists (not the signatures).
    """

    def sample(
        self, obs: Tensor, *, temperature: float, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Any]:
        """Sample one chunk per row of `obs (n, obs)`: `(tokens (n, K) int64, logp (n, K), _)`.

        The third element (the entropy in `TokenChunkPolicy`) is ignored by the pipeline.
        """
        ...

    def chunk_actions(self, tokens: Tensor) -> Tensor:
        """Decode `tokens (n, K)` into `(n, H, D)` continuous actions (gripper last)."""
        ...

    def log_prob(self, obs: Tensor, tokens: Tensor, *, temperature: float) -> tuple[Tensor, Any]:
        """`(logp (M, K), _)`: differentiable per-token log-probabilities of `tokens` given `obs`.

        The second element (the per-token entropy in `TokenChunkPolicy`) is ignored.
        """
        ...

    def train(self, mode: bool = True) -> Any:
        """`torch.nn.Module.train`."""
        ...

    def eval(self) -> Any:
        """`torch.nn.Module.eval`."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        """`torch.nn.Module.parameters`."""
        ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """`torch.nn.Module.state_dict`."""
        ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """`torch.nn.Module.load_state_dict`."""
        ...
