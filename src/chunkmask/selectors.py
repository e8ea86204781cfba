"""A registry of chunk selectors: one name -> function dispatch for every trainer.

A *selector* decides which chunks of a rollout batch enter the actor update. Every selector is
a callable with one signature, `selector(inputs: SelectorInputs) -> Selection`: it reads the
fields of `SelectorInputs` it needs (always `valid`; the others as documented per selector) and
raises `ValueError` naming a missing one. Trainers (the testbed, the asynchronous pipeline, the
LIBERO example) look a selector up by name with `get_selector` instead of writing their own
`if`/`elif` chain over names.

The generic selectors below are built from public chunkmask functions only:

| name | selection | needs |
| --- | --- | --- |
| `"full"` | every valid chunk (vanilla GRPO) | - |
| `"pcm"` | `masker.draw(phases, ...)` (PCM, Eq. 10) | `masker`, `phases` (`advantages` if the masker is advantage-aware) |
| `"random"` | `budget` chunks uniformly at random (`uniform_sample`), or `budgets` per trajectory | `budget` or `budgets` |
| `"top_phase"` | `budget` chunks from the highest-`V_c` phase (`top_phase_sample`) | `phases`, `scores` |
| `"entropy_topk"` | the `budget` chunks of highest entropy (`topk_sample`) | `entropy` |
| `"pps"` | probability proportional to `|A_i|` x `score_norms` (`pps_sample`) | `advantages`, `score_norms` |
| `"neyman"` | `budget` chunks per trajectory split over phases by `neyman_allocation` (`sigma_c = sqrt(V_c)`, at least one per non-empty phase), uniform inside each phase (`stratified_sample`; exact inclusion) | `phases`, `scores` |

Trainers may register their own arms (the testbed registers `"pods"` and `"token_entropy"`)
with `register_selector`.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int64, Real
from torch import Tensor

from chunkmask.batch._selection import Selection
from chunkmask.pcm._allocation import neyman_allocation
from chunkmask.pcm._pps import pps_sample
from chunkmask.pcm._sampling import (
    plackett_luce_sample,
    stratified_sample,
    top_phase_sample,
    topk_sample,
    uniform_sample,
)

if TYPE_CHECKING:
    from chunkmask.pcm._masker import ProbabilisticChunkMasker


class SelectorInputs(NamedTuple):
    """Everything a selector may read; each selector uses only the fields it needs.

    Attributes:
        valid: `(traj, N)` bool mask of the chunks that may be selected.
        budget: chunks per trajectory `B` (`"random"`, `"top_phase"`, `"entropy_topk"`,
            `"pps"`: the average over the batch).
        generator: the random generator of the stochastic selectors.
        phases: `(traj, N)` int64 phase ids (`PhaseUpdate.phases`; `"pcm"`, `"top_phase"`).
        scores: `(phase,)` phase scores `V_c` (`PhaseUpdate.scores`; `"top_phase"`).
        advantages: `(traj,)` advantages (`"pps"`; `"pcm"` with an advantage-aware masker).
        entropy: `(traj, N)` per-chunk policy entropy (`"entropy_topk"`).
        score_norms: `(traj, N)` `chunk_score_norm` of the behaviour log-probabilities (`"pps"`).
        budgets: `(traj,)` per-trajectory budgets; `"random"` then draws `budgets[i]` chunks of
            trajectory `i` (for example `advantage_aware_budgets`) instead of `budget`.
        masker: the `ProbabilisticChunkMasker` that draws for `"pcm"` (its generator is used).
    """

    valid: Bool[Tensor, "traj chunk"]
    budget: int = 1
    generator: torch.Generator | None = None
    phases: Int64[Tensor, "traj chunk"] | None = None
    scores: Real[Tensor, " phase"] | None = None
    advantages: Real[Tensor, " traj"] | None = None
    entropy: Float[Tensor, "traj chunk"] | None = None
    score_norms: Float[Tensor, "traj chunk"] | None = None
    budgets: Int64[Tensor, " traj"] | None = None
    masker: "ProbabilisticChunkMasker | None" = None


Selector = Callable[[SelectorInputs], Selection]
"""A chunk selector: `selector(inputs) -> Selection`."""

_REGISTRY: dict[str, Selector] = {}


def register_selector(name: str, *, replace: bool = False) -> Callable[[Selector], Selector]:
    """Decorator registering `fn(inputs: SelectorInputs) -> Selection` under `name`.

    Registering a name twice raises `ValueError` unless `replace=True` (re-registering the same
    function, for example on a module reload, is allowed).

    Example:
        >>> @register_selector("first_chunk_doc")
        ... def first_chunk(inputs):
        ...     return uniform_sample(inputs.valid, 1, generator=inputs.generator)
        >>> get_selector("first_chunk_doc") is first_chunk
        True
        >>> unregister_selector("first_chunk_doc")
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty str, got {name!r}.")

    def decorator(fn: Selector) -> Selector:
        if not callable(fn):
            raise TypeError(f"`selector` {name!r} must be callable, got {type(fn).__name__}.")
        old = _REGISTRY.get(name)
        same = old is not None and (
            getattr(old, "__module__", None),
            getattr(old, "__qualname__", None),
        ) == (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
        if old is not None and not replace and not same:
            raise ValueError(f"`selector` {name!r} is already registered (pass replace=True).")
        _REGISTRY[name] = fn
        return fn

    return decorator


def unregister_selector(name: str) -> None:
    """Remove `name` from the registry (`ValueError` if it is not registered)."""
    get_selector(name)
    del _REGISTRY[name]


def available_selectors() -> tuple[str, ...]:
    """The registered selector names, in registration order."""
    return tuple(_REGISTRY)


def get_selector(name: str) -> Selector:
    """The selector registered under `name`.

    Raises:
        ValueError: if `name` is not registered; the message lists the registered names.

    Example:
        >>> sel = get_selector("full")(SelectorInputs(valid=torch.tensor([[True, False]])))
        >>> sel.counts.tolist()
        [1]
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"`selector` must be one of {available_selectors()}, got {name!r}."
        ) from None


def _need(inputs: SelectorInputs, field: str, selector: str) -> Any:
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"`{field}` must be given for selector {selector!r}, got None.")
    return value


@register_selector("full")
def full_selector(inputs: SelectorInputs) -> Selection:
    """Every valid chunk (vanilla GRPO)."""
    return Selection.from_mask(inputs.valid)


@register_selector("pcm")
def pcm_selector(inputs: SelectorInputs) -> Selection:
    """PCM: `inputs.masker.draw(inputs.phases, valid=, advantages=)`.

    The masker's `update` is the caller's: it advances the score state once per step.
    """
    masker = _need(inputs, "masker", "pcm")
    phases = _need(inputs, "phases", "pcm")
    advantages = inputs.advantages if masker.advantage_aware else None
    return masker.draw(phases, valid=inputs.valid, advantages=advantages)


@register_selector("random")
def random_selector(inputs: SelectorInputs) -> Selection:
    """`budget` chunks per trajectory uniformly at random, or `budgets[i]` if `budgets` is given."""
    if inputs.budgets is not None:
        valid = inputs.valid
        return plackett_luce_sample(
            valid.float(), inputs.budgets, valid=valid, generator=inputs.generator
        )
    return uniform_sample(inputs.valid, inputs.budget, generator=inputs.generator)


@register_selector("top_phase")
def top_phase_selector(inputs: SelectorInputs) -> Selection:
    """`budget` chunks from each trajectory's highest-`V_c` phase ("full masking")."""
    phases = _need(inputs, "phases", "top_phase")
    scores = _need(inputs, "scores", "top_phase")
    return top_phase_sample(
        phases, scores, inputs.budget, valid=inputs.valid, generator=inputs.generator
    )


@register_selector("entropy_topk")
def entropy_topk_selector(inputs: SelectorInputs) -> Selection:
    """The `budget` chunks of highest policy entropy per trajectory."""
    entropy = _need(inputs, "entropy", "entropy_topk")
    return topk_sample(entropy, inputs.budget, valid=inputs.valid)


@register_selector("pps")
def pps_selector(inputs: SelectorInputs) -> Selection:
    """`budget` chunks per trajectory on average, probability proportional to `|A_i|` x norm."""
    advantages = _need(inputs, "advantages", "pps")
    norms = _need(inputs, "score_norms", "pps")
    sizes = advantages.abs()[:, None] * norms
    return pps_sample(sizes, inputs.budget, valid=inputs.valid, generator=inputs.generator)


@register_selector("neyman")
def neyman_selector(inputs: SelectorInputs) -> Selection:
    r"""`budget` chunks per trajectory by the Neyman allocation over phases (Eq. 6, Theorem 1).

    Trajectory $i$'s budget $B$ is split over its phases by `neyman_allocation` with phase
    sizes $N_{i,c}$ (its valid chunks in phase $c$) and $\sigma_c = \sqrt{V_c}$ (the phase
    scores, Eq. 5), then drawn uniformly without replacement inside each phase
    (`stratified_sample`). Every non-empty phase gets at least one chunk when the trajectory has
    no more non-empty phases than $B$, so every valid chunk has a positive inclusion probability
    $\pi = n_{i,c} / N_{i,c}$ (carried by the Selection) and the Horvitz-Thompson loss is
    unbiased; with more non-empty phases than $B$ the floor is dropped for that trajectory.
    Before any phase has a positive score the split is proportional to the phase sizes.
    Synchronises with the host (through `stratified_sample`).
    """
    phases = _need(inputs, "phases", "neyman")
    scores = _need(inputs, "scores", "neyman")
    valid = inputs.valid & (phases >= 0)
    num_phases = scores.shape[0]
    one_hot = torch.nn.functional.one_hot(phases.clamp(0, num_phases - 1), num_phases)
    sizes = (one_hot * valid[..., None]).sum(1)  # (traj, phase)
    nonempty = sizes > 0
    floor_fits = nonempty.sum(1, keepdim=True) <= inputs.budget
    lower = (nonempty & floor_fits).to(torch.int64)
    stds = scores.to(torch.float64).clamp_min(0.0).sqrt()
    if not bool((stds > 0).any()):  # no phase scored yet: proportional allocation
        stds = torch.ones_like(stds)
    stds = stds.expand_as(sizes)
    allocation = neyman_allocation(inputs.budget, sizes, stds.contiguous(), lower=lower)
    if not bool(allocation.any()):  # no valid chunk anywhere (e.g. every group dropped)
        empty = Selection.from_mask(valid)
        return empty.with_inclusion(torch.ones(valid.shape, dtype=torch.float64))
    return stratified_sample(
        torch.where(valid, phases, -1), allocation, valid=valid, generator=inputs.generator
    )


GENERIC_SELECTORS: tuple[str, ...] = available_selectors()
"""The selectors the core registers: `("full", "pcm", "random", "top_phase", "entropy_topk",
"pps", "neyman")`."""
