"""Phase sets and phase labelers: the gripper rule of App. E.2 and equal time segments.

A labeler maps every valid chunk of every trajectory to a phase id (int64); padding chunks get
`Phase.PAD` (-1). The labels depend only on the gripper trace (never on the outcome), so successful
and failed rollouts are compared under one shared phase partition. See App. E.2 of Anonymous et al.
(2026), Probabilistic Chunk Masking, arXiv 2605.16154.
"""

from enum import IntEnum
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int64, Integer, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_option,
    check_positive_int,
    check_range,
    check_real,
    check_tensor,
    resolve_valid,
)

__all__ = [
    "NUM_ONSET_PHASES",
    "NUM_PHASES",
    "OnsetPhase",
    "Phase",
    "gripper_close_fraction",
    "label_grasp_onset",
    "label_gripper_phases",
    "label_time_segments",
]


class Phase(IntEnum):
    """Phase ids of the gripper rule (App. E.2); `PAD` marks padding chunks.

    `len(Phase)` counts `PAD` too; use `NUM_PHASES` (5) for the number of real phases.
    """

    APPROACH = 0
    PRE_GRASP = 1
    ACTIVE_GRIP = 2
    RELEASE_RAMP = 3
    TAIL = 4
    PAD = -1


NUM_PHASES: int = 5
"""Number of real phases of the gripper rule (`Phase` without `PAD`)."""


class OnsetPhase(IntEnum):
    """Phase ids of the event-anchored rule `label_grasp_onset`; `PAD` marks padding chunks."""

    APPROACH = 0
    ONSET = 1
    HOLD = 2
    AFTER = 3
    PAD = -1


NUM_ONSET_PHASES: int = 4
"""Number of real phases of `label_grasp_onset` (`OnsetPhase` without `PAD`)."""

_CLOSE_OPTIONS = ("positive", "zero", "negative", "threshold")
_DEFAULT_THRESHOLD = {"positive": 0.0, "zero": 0.5, "negative": 0.0}


def gripper_close_fraction(
    gripper: Real[Tensor, "traj chunk step"],
    valid: Bool[Tensor, "traj chunk"] | None = None,
    *,
    close: Literal["positive", "zero", "negative", "threshold"] = "positive",
    close_threshold: float | None = None,
) -> Float[Tensor, "traj chunk"]:
    r"""Compute the fraction of steps of each chunk whose gripper command means "close".

    $$
    f_{i,t} = \frac{1}{H} \sum_{h=1}^{H} \mathbb{1}\bigl[g_{i,t,h} \text{ means close}\bigr]
    $$

    See App. E.2 of Anonymous et al. (2026), Probabilistic Chunk Masking, arXiv 2605.16154.

    Simulators and model heads disagree on the sign of the gripper command (the LIBERO
    environment closes on +1, the RLDS action head on 0), so the convention is explicit:

    | `close` | a step closes when | default `close_threshold` |
    |---|---|---|
    | `"positive"` | `g > close_threshold` (+1 closes, -1 or 0 opens) | 0 |
    | `"negative"` | `g < close_threshold` (-1 closes, +1 opens) | 0 |
    | `"zero"` | `g < close_threshold` (0 closes, 1 opens) | 0.5 |
    | `"threshold"` | `g >= close_threshold` | required |

    A NaN command never counts as "close".

    Args:
        gripper: `(traj, chunk, step)` gripper command of every step (float or int).
        valid: `(traj, chunk)` bool mask of real chunks; padding gets fraction 0.
        close: the command convention, see the table.
        close_threshold: the decision threshold; overrides the default of `close`, required for
            `close="threshold"`.

    Returns:
        `(traj, chunk)` close fractions in [0, 1], float32 (float64 for float64 input).

    Raises:
        TypeError: if `gripper` is not a real-valued tensor, `valid` not bool or
            `close_threshold` not a number.
        ValueError: if `gripper` is not 3-D or has no steps, `valid` has the wrong shape,
            `close` is unknown, `close_threshold` is missing for `close="threshold"` or not finite.

    Examples:
        >>> import torch
        >>> g = torch.tensor([[[-1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]])
        >>> gripper_close_fraction(g).tolist()
        [[0.5, 1.0]]
        >>> gripper_close_fraction(1 - (g > 0).float(), close="zero").tolist()
        [[0.5, 1.0]]
    """
    check_tensor(gripper, "gripper", ndim=3, dtypes=("float", "int"))
    if gripper.shape[2] == 0:
        raise ValueError(
            f"`gripper` must have at least one step per chunk, got shape {tuple(gripper.shape)}."
        )
    valid = resolve_valid(valid, gripper, ref_name="gripper")
    check_option(close, "close", _CLOSE_OPTIONS)
    if close_threshold is None:
        if close == "threshold":
            raise ValueError(
                '`close_threshold` must be given when `close="threshold"`, got None.'
            )
        close_threshold = _DEFAULT_THRESHOLD[close]
    threshold = check_real(close_threshold, "close_threshold")
    if close == "positive":
        closed = gripper > threshold
    elif close == "threshold":
        closed = gripper >= threshold
    else:  # "zero" and "negative": commands below the threshold close
        closed = gripper < threshold
    out_dtype = torch.float64 if gripper.dtype == torch.float64 else torch.float32
    fraction = closed.sum(dim=2).to(out_dtype) / gripper.shape[2]
    return torch.where(valid, fraction, 0.0)


def _check_thresholds(
    sustained: float, active: float, pre_min: float, tail_max: float, window: int
) -> tuple[float, float, float, float, int]:
    sustained = check_range(sustained, "sustained", low=0.0, high=1.0)
    active = check_range(active, "active", low=0.0, high=1.0)
    pre_min = check_range(pre_min, "pre_min", low=0.0, high=1.0)
    tail_max = check_range(tail_max, "tail_max", low=0.0, high=1.0)
    window = check_positive_int(window, "window", allow_zero=True)
    if active > sustained:
        raise ValueError(
            f"`active` must be <= `sustained` ({sustained}), got {active}: every sustained-close "
            "chunk must also be an active-grip chunk."
        )
    if pre_min > active:
        raise ValueError(f"`pre_min` must be <= `active` ({active}), got {pre_min}.")
    if tail_max > active:
        raise ValueError(f"`tail_max` must be <= `active` ({active}), got {tail_max}.")
    return sustained, active, pre_min, tail_max, window


def _check_close_values(close_fraction: Tensor, valid: Tensor) -> None:
    """Valid close fractions must be finite and in [0, 1] (one host sync)."""
    check_finite(close_fraction, "close_fraction", where=valid)
    out_of_range = valid & ((close_fraction < 0) | (close_fraction > 1))
    if bool(out_of_range.any()):
        raise ValueError(
            f"`close_fraction` must lie in [0, 1] at valid chunks, got "
            f"{int(out_of_range.sum())} value(s) outside."
        )


def label_gripper_phases(
    close_fraction: Float[Tensor, "traj chunk"],
    valid: Bool[Tensor, "traj chunk"] | None = None,
    *,
    sustained: float = 0.75,
    active: float = 0.5,
    pre_min: float = 0.1,
    tail_max: float = 0.1,
    window: int = 3,
    validate_args: bool = False,
) -> Int64[Tensor, "traj chunk"]:
    r"""Label every chunk with a gripper phase by the deterministic rule of App. E.2.

    A *sustained-close interval* is a maximal run of consecutive valid chunks with
    $f_{i,t} \ge f_{\mathrm{sus}}$ (`sustained`). With $W$ = `window`, and $e_i$ the last chunk
    of the final sustained interval of trajectory $i$ (its *final release*), the labels are, by
    priority (the first rule that applies wins):

    $$
    \varphi(i,t) =
    \begin{cases}
    \text{active-grip} & f_{i,t} \ge f_{\mathrm{act}} \\
    \text{pre-grasp} & f_{\mathrm{pre}} \le f_{i,t} < f_{\mathrm{act}},\
        t \in [s - W, s - 1] \text{ for an interval start } s \\
    \text{release-ramp} & f_{i,t} < f_{\mathrm{act}},\
        t \in [e + 1, e + W] \text{ for an interval end } e \\
    \text{tail} & f_{i,t} < f_{\mathrm{tail}},\ t > e_i \\
    \text{approach} & \text{otherwise}
    \end{cases}
    $$

    with $f_{\mathrm{act}}$ = `active`, $f_{\mathrm{pre}}$ = `pre_min`, $f_{\mathrm{tail}}$ =
    `tail_max`. See App. E.2 of Anonymous et al. (2026), Probabilistic Chunk Masking,
    arXiv 2605.16154.

    Notes:
        - Multi-grasp: every sustained interval has its own pre-grasp and release-ramp windows;
          open chunks between two grasp cycles (outside those windows) precede a later grasp and
          are approach.
        - No sustained close: the trajectory has no release, so every open chunk is approach;
          chunks with $f \ge f_{\mathrm{act}}$ are still active-grip.
        - Open chunks that fit neither approach nor tail, i.e. $f_{\mathrm{tail}} \le f <
          f_{\mathrm{act}}$ after the final release and outside its release-ramp window, are
          labelled **approach**: a partial closure after the last release reads as a further
          grasp attempt that never became sustained, not as idle post-release motion. Tail is
          thus exactly "open gripper ($f < f_{\mathrm{tail}}$) after the final release".
        - Padding: a padding chunk ends a sustained interval (intervals are never found across
          padding) and gets `Phase.PAD`. Windows are counted in chunk slots, so a padding slot
          inside a window uses up one of its $W$ slots. The final release is per trajectory.
        - The rule is vectorised over trajectories and chunks (shifts and reductions); only the
          `window` offsets are looped over.

    Args:
        close_fraction: `(traj, chunk)` gripper-close fraction $f_{i,t}$ in [0, 1], e.g. from
            `gripper_close_fraction`. Values at padding are ignored (NaN allowed).
        valid: `(traj, chunk)` bool mask of real chunks (default: all).
        sustained: threshold $f_{\mathrm{sus}}$ of a sustained-close chunk (0.75).
        active: threshold $f_{\mathrm{act}}$ of an active-grip chunk (0.5).
        pre_min: lower threshold $f_{\mathrm{pre}}$ of a pre-grasp chunk (0.1).
        tail_max: upper threshold $f_{\mathrm{tail}}$ (exclusive) of a tail chunk (0.1).
        window: number $W \ge 0$ of chunk slots before (pre-grasp) and after (release-ramp) a
            sustained interval (3).
        validate_args: check that valid close fractions are finite and in [0, 1] (one host sync).

    Returns:
        `(traj, chunk)` int64 phase ids (`Phase` values), `Phase.PAD` (-1) at padding.

    Raises:
        TypeError: if `close_fraction` is not floating point or `valid` not bool.
        ValueError: if the shapes disagree, a threshold lies outside [0, 1], the thresholds are
            not ordered as `pre_min <= active <= sustained` and `tail_max <= active`, `window` is
            negative, or (with `validate_args`) a valid close fraction is not finite or outside
            [0, 1].

    Examples:
        >>> import torch
        >>> f = torch.tensor([[0.0, 0.0, 0.25, 1.0, 1.0, 0.25, 0.0, 0.0, 0.0, 0.0]])
        >>> labels = label_gripper_phases(f, window=2)[0].tolist()
        >>> [Phase(p).name for p in labels]  # doctest: +NORMALIZE_WHITESPACE
        ['APPROACH', 'APPROACH', 'PRE_GRASP', 'ACTIVE_GRIP', 'ACTIVE_GRIP', 'RELEASE_RAMP',
         'RELEASE_RAMP', 'TAIL', 'TAIL', 'TAIL']
    """
    check_tensor(close_fraction, "close_fraction", ndim=2, dtypes="float")
    valid = resolve_valid(valid, close_fraction, ref_name="close_fraction")
    sustained, active, pre_min, tail_max, window = _check_thresholds(
        sustained, active, pre_min, tail_max, window
    )
    if validate_args:
        _check_close_values(close_fraction, valid)
    n_traj, n_chunk = close_fraction.shape
    device = close_fraction.device
    if n_chunk == 0:
        return torch.empty(n_traj, 0, dtype=torch.int64, device=device)
    f = torch.where(valid, close_fraction, 0.0)

    sus = valid & (f >= sustained)
    none = torch.zeros(n_traj, 1, dtype=torch.bool, device=device)
    sus_prev = torch.cat([none, sus[:, :-1]], dim=1)
    sus_next = torch.cat([sus[:, 1:], none], dim=1)
    start = sus & ~sus_prev  # first chunk of a sustained interval
    end = sus & ~sus_next  # last chunk of a sustained interval

    pre_window = torch.zeros_like(sus)
    ramp_window = torch.zeros_like(sus)
    for d in range(1, min(window, n_chunk - 1) + 1):
        pre_window[:, :-d] |= start[:, d:]
        ramp_window[:, d:] |= end[:, :-d]

    position = torch.arange(n_chunk, device=device)
    final_release = torch.where(sus, position, -1).amax(dim=1, keepdim=True)
    # A trajectory with no sustained close has no release (final_release = -1): nothing is after it.
    after_release = (position > final_release) & (final_release >= 0)

    open_ = f < active
    label = torch.full((n_traj, n_chunk), int(Phase.APPROACH), dtype=torch.int64, device=device)
    label = torch.where(after_release & (f < tail_max), int(Phase.TAIL), label)
    label = torch.where(ramp_window & open_, int(Phase.RELEASE_RAMP), label)
    label = torch.where(pre_window & open_ & (f >= pre_min), int(Phase.PRE_GRASP), label)
    label = torch.where(open_, label, int(Phase.ACTIVE_GRIP))
    return torch.where(valid, label, int(Phase.PAD))


def label_time_segments(
    valid: Bool[Tensor, "traj chunk"] | Integer[Tensor, " traj"],
    *,
    num_segments: int,
    num_chunks: int | None = None,
) -> Int64[Tensor, "traj chunk"]:
    r"""Label chunks by equal time segments of each trajectory's own valid length.

    With $r_{i,t}$ the rank of chunk $t$ among the $T_i$ valid chunks of trajectory $i$
    (0-based) and $S$ = `num_segments`:

    $$
    \varphi(i,t) = \left\lfloor \frac{r_{i,t}\, S}{T_i} \right\rfloor \in \{0, \dots, S-1\}
    $$

    A phase-free alternative to the gripper rule of App. E.2 of Anonymous et al. (2026),
    Probabilistic Chunk Masking, arXiv 2605.16154 ("any consistent decomposition suffices").
    When $T_i < S$ some segments are empty for that trajectory.

    Args:
        valid: either a `(traj, chunk)` bool mask of real chunks, or `(traj,)` integer valid
            lengths $T_i$ (the first $T_i$ chunks are valid).
        num_segments: number of segments $S \ge 1$.
        num_chunks: the padded number of chunks $N$ when `valid` holds lengths; defaults to the
            largest length (one host sync). Ignored for a mask.

    Returns:
        `(traj, chunk)` int64 segment ids in `[0, num_segments)`, -1 (`Phase.PAD`) at padding.

    Raises:
        TypeError: if `valid` is neither a bool mask nor integer lengths, or `num_segments` /
            `num_chunks` is not an int.
        ValueError: if `valid` has the wrong rank, `num_segments` is not positive, or a length
            is negative or exceeds `num_chunks`.

    Examples:
        >>> import torch
        >>> label_time_segments(torch.tensor([6, 3]), num_segments=3).tolist()
        [[0, 0, 1, 1, 2, 2], [0, 1, 2, -1, -1, -1]]
    """
    num_segments = check_positive_int(num_segments, "num_segments")
    check_tensor(valid, "valid", dtypes=("bool", "int"))
    if valid.dtype == torch.bool:
        check_tensor(valid, "valid", ndim=2)
        mask = valid
    else:
        check_tensor(valid, "valid", ndim=1)
        lengths = valid.to(torch.int64)
        if num_chunks is None:
            num_chunks = int(lengths.max()) if lengths.numel() else 0
        num_chunks = check_positive_int(num_chunks, "num_chunks", allow_zero=True)
        bad = (lengths < 0) | (lengths > num_chunks)
        if bool(bad.any()):
            raise ValueError(
                f"`valid` lengths must lie in [0, {num_chunks}] (`num_chunks`), got "
                f"{lengths[bad].tolist()}."
            )
        mask = torch.arange(num_chunks, device=valid.device) < lengths[:, None]
    rank = torch.cumsum(mask.to(torch.int64), dim=1) - 1
    total = mask.sum(dim=1, keepdim=True).clamp_min(1)
    segment = torch.div(rank.clamp_min(0) * num_segments, total, rounding_mode="floor")
    return torch.where(mask, segment, int(Phase.PAD))


def label_grasp_onset(
    close_fraction: Float[Tensor, "traj chunk"],
    valid: Bool[Tensor, "traj chunk"] | None = None,
    *,
    lead: int = 2,
    active: float = 0.5,
    validate_args: bool = False,
) -> Int64[Tensor, "traj chunk"]:
    r"""Label chunks relative to the first grasp attempt: the event that decides pick-and-place.

    With $s_i$ the first valid chunk of trajectory $i$ whose close fraction reaches
    $f_{\mathrm{act}}$ (`active`) and $L$ = `lead`,

    $$
    \varphi(i,t) =
    \begin{cases}
    \text{approach} & t < s_i - L \text{ (or no attempt at all)} \\
    \text{onset} & s_i - L \le t \le s_i \\
    \text{hold} & t > s_i,\ f_{i,t} \ge f_{\mathrm{act}} \\
    \text{after} & t > s_i,\ f_{i,t} < f_{\mathrm{act}}
    \end{cases}
    $$

    The gripper rule of App. E.2 (`label_gripper_phases`) gives every grasp cycle its own
    pre-grasp and release windows, so a failed rollout that retries a dozen times fills those
    phases with chunks that follow the failure rather than cause it, and `V_c` (Eq. 5) ranks
    them high. Anchoring on the first attempt separates the chunks that decide the outcome
    (onset, and the approach to it) from holding, transport and retries. Combine it with
    `ProbabilisticChunkMasker(..., labeler=..., num_phases=NUM_ONSET_PHASES,
    scored_phases=(OnsetPhase.APPROACH, OnsetPhase.ONSET))` to score only the chunks up to
    the first divergence. A chunk-phase partition of Anonymous et al. (2026), Probabilistic
    Chunk Masking, arXiv 2605.16154, Sec. 4.2 ("any consistent decomposition suffices").

    Notes:
        - Labels depend on the gripper trace only, never on the outcome.
        - Padding chunks get `OnsetPhase.PAD` and never count as an attempt; `lead` counts chunk
          slots, padding included.
        - Vectorised over trajectories and chunks (no Python loop).

    Args:
        close_fraction: `(traj, chunk)` gripper-close fraction in [0, 1]
            (`gripper_close_fraction`); values at padding are ignored (NaN allowed).
        valid: `(traj, chunk)` bool mask of real chunks (default: all).
        lead: chunks $L \ge 0$ before the first attempt that belong to the onset (2).
        active: threshold $f_{\mathrm{act}}$ in [0, 1] of a closing chunk (0.5).
        validate_args: check that valid close fractions are finite and in [0, 1] (one host sync).

    Returns:
        `(traj, chunk)` int64 `OnsetPhase` ids, -1 at padding.

    Raises:
        TypeError: if `close_fraction` is not floating point, `valid` not bool or `lead` not an
            int.
        ValueError: if the shapes disagree, `lead` is negative, `active` lies outside [0, 1], or
            (with `validate_args`) a valid close fraction is not finite or outside [0, 1].

    Examples:
        >>> import torch
        >>> f = torch.tensor([[0.0, 0.0, 0.0, 0.25, 1.0, 1.0, 0.0, 1.0, 0.0]])
        >>> [OnsetPhase(p).name for p in label_grasp_onset(f, lead=1)[0].tolist()]
        ... # doctest: +NORMALIZE_WHITESPACE
        ['APPROACH', 'APPROACH', 'APPROACH', 'ONSET', 'ONSET', 'HOLD', 'AFTER', 'HOLD', 'AFTER']
    """
    check_tensor(close_fraction, "close_fraction", ndim=2, dtypes="float")
    valid = resolve_valid(valid, close_fraction, ref_name="close_fraction")
    lead = check_positive_int(lead, "lead", allow_zero=True)
    active = check_range(active, "active", low=0.0, high=1.0)
    if validate_args:
        _check_close_values(close_fraction, valid)
    n_traj, n_chunk = close_fraction.shape
    device = close_fraction.device
    if n_chunk == 0:
        return torch.empty(n_traj, 0, dtype=torch.int64, device=device)
    closing = valid & (torch.where(valid, close_fraction, 0.0) >= active)
    position = torch.arange(n_chunk, device=device)
    # The first attempt s_i (n_chunk + lead when there is none: every chunk is then approach).
    first = torch.where(closing, position, n_chunk + lead).amin(dim=1, keepdim=True)
    label = torch.full((n_traj, n_chunk), int(OnsetPhase.APPROACH), dtype=torch.int64, device=device)
    label = torch.where(position >= first - lead, int(OnsetPhase.ONSET), label)
    after = position > first
    label = torch.where(after & closing, int(OnsetPhase.HOLD), label)
    label = torch.where(after & ~closing, int(OnsetPhase.AFTER), label)
    return torch.where(valid, label, int(OnsetPhase.PAD))
