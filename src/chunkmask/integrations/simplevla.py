r"""chunkmask for SimpleVLA-RL (its vendored verl 0.1 `dp_rob` actor): `select_chunks`.

SimpleVLA-RL holds one trajectory per row: `responses` `(bs, T, K)` (on LIBERO `T = 64` chunks of
`K = 56` tokens, 8 actions x 7 tokens), `input_ids`, `attention_mask`, `pixel_values` (and
`proprio`) stacked on dim 1 by chunk, `old_log_probs` and `advantages` flat `(bs, T * K)`, and
`finish_step (bs,)` counting valid env steps. Its actor masks tokens with
`arange(T * K) < finish_step * action_token_len` and walks dim 1 in slices of
`traj_mini_batch_size`. PCM goes in `RayTrainer.fit` between `compute_advantage` and
`update_actor`: `select_chunks` gathers each trajectory's `B` selected chunks into a fixed
`(bs, B, ...)` batch (`chunkmask.batch.gather_chunks`), so the actor's forward and backward see
`B` chunks instead of `T`, with static shapes.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from chunkmask._checks import check_positive_int, check_tensor
from chunkmask.batch._gather import gather_chunks
from chunkmask.batch._selection import Selection

CHUNK_KEYS = ("input_ids", "attention_mask", "pixel_values", "responses", "proprio")
"""Keys stacked by chunk on dim 1, gathered to `(bs, B, ...)`."""

FLAT_KEYS = ("old_log_probs", "advantages", "ref_log_prob")
"""Keys flat over `(T * K)` tokens on dim 1, gathered to `(bs, B * K)`."""


def _layout(batch: Mapping[str, Any], action_token_len: int) -> tuple[int, int, int, int]:
    if not isinstance(batch, Mapping) and not hasattr(batch, "keys"):
        raise TypeError(f"`batch` must be a mapping of tensors, got {type(batch).__name__}.")
    for key in ("responses", "finish_step"):
        if key not in batch.keys():
            raise ValueError(f"`batch` must hold `{key}`, got keys {sorted(batch.keys())}.")
    responses = check_tensor(batch["responses"], "batch['responses']", ndim=3)
    bs, num_chunks, tokens = responses.shape
    a_tok = check_positive_int(action_token_len, "action_token_len")
    if tokens % a_tok:
        raise ValueError(
            f"`batch['responses']` must hold whole actions of `action_token_len`={a_tok} tokens "
            f"per chunk, got {tokens} tokens per chunk."
        )
    return bs, num_chunks, tokens, tokens // a_tok


def valid_chunks(batch: Mapping[str, Any], *, action_token_len: int = 7) -> Tensor:
    """`(bs, T)` bool: the chunks with at least one valid env step (`finish_step`).

    Pass it as `valid` to a sampler (`pps_sample`, the masker) to draw a selection.

    Args:
        batch: a SimpleVLA-RL batch (`responses`, `finish_step`).
        action_token_len: tokens per action (7 for OpenVLA-OFT on LIBERO).

    Raises:
        TypeError: if `batch` is not a mapping.
        ValueError: if `responses` or `finish_step` is missing or misshapen.

    Examples:
        >>> import torch
        >>> batch = {"responses": torch.zeros(2, 3, 14), "finish_step": torch.tensor([3, 6])}
        >>> valid_chunks(batch).tolist()  # 2 actions per chunk
        [[True, True, False], [True, True, True]]
    """
    bs, num_chunks, _, steps = _layout(batch, action_token_len)
    finish = check_tensor(batch["finish_step"], "batch['finish_step']", ndim=1, dtypes="int")
    if finish.shape[0] != bs:
        raise ValueError(f"`batch['finish_step']` must have shape ({bs},), got {tuple(finish.shape)}.")
    start = torch.arange(num_chunks, device=finish.device) * steps
    return start[None, :] < finish[:, None]


def select_chunks(
    batch: Mapping[str, Any],
    selection: Selection,
    *,
    action_token_len: int = 7,
    traj_mini_batch_size: int | None = None,
    fold_inclusion: bool = True,
) -> dict[str, Any]:
    r"""Gather each trajectory's selected chunks into a fixed `(bs, B, ...)` SimpleVLA-RL batch.

    With `B = selection.k`: every key of `CHUNK_KEYS` goes from `(bs, T, ...)` to `(bs, B, ...)`,
    every key of `FLAT_KEYS` from `(bs, T * K)` to `(bs, B * K)`, and `finish_step` becomes the
    number of valid env steps in the selected slots, $\sum_s \mathrm{clip}(f_i - c_s a, 0, a)$
    ($f_i$ the old `finish_step`, $c_s$ the slot's chunk, $a$ actions per chunk). Valid steps
    form a prefix of a trajectory and the selected chunks are ascending, so only the last
    selected slot can be partly valid and the new `finish_step` marks exactly the old valid
    tokens of the selected chunks; flagged slots (fewer than `B` valid chunks) fall after it and
    are masked. Other keys pass through.

    Under SimpleVLA-RL's own rule (per trajectory, the token mean over valid tokens; mean over
    the mini-batch) the gathered batch's loss is the masked full batch's loss: Eq. (11) of the
    PCM paper. With `fold_inclusion` and a selection carrying `inclusion`, `advantages` are
    multiplied by $n^{sel}_i / (n_i \pi_{i,t})$, so the same rule computes the Horvitz-Thompson
    estimate instead (exact for PPO-clip; `chunkmask.batch.horvitz_thompson_weights`).

    Args:
        batch: the actor's batch (a dict or `TensorDict` with the keys above).
        selection: one row per trajectory, `chunks_total == T`.
        action_token_len: tokens per action (`config.action_token_len`, 7 on LIBERO).
        traj_mini_batch_size: the actor's `traj_mini_batch_size`; must divide `B`.
        fold_inclusion: fold the Horvitz-Thompson weights when `selection.inclusion` is set.

    Returns:
        A new dict; build `TensorDict(out, batch_size=[bs])` for the `DataProto`.

    Raises:
        TypeError: if `selection` is not a `Selection` or `batch` not a mapping.
        ValueError: if `traj_mini_batch_size` does not divide `B`, a key's shape disagrees with
            `(bs, T, ...)` / `(bs, T * K)`, or the selection's shape with the batch.

    Examples:
        >>> import torch
        >>> from chunkmask import Selection
        >>> batch = {"responses": torch.arange(12).reshape(1, 3, 4), "finish_step": torch.tensor([5])}
        >>> sel = Selection.from_mask(torch.tensor([[True, False, True]]), k=2)
        >>> out = select_chunks(batch, sel, action_token_len=2)  # 2 actions per chunk
        >>> out["responses"].tolist(), out["finish_step"].tolist()
        ([[[0, 1, 2, 3], [8, 9, 10, 11]]], [3])
    """
    if not isinstance(selection, Selection):
        raise TypeError(f"`selection` must be a chunkmask.Selection, got {type(selection).__name__}.")
    bs, num_chunks, tokens, steps = _layout(batch, action_token_len)
    if selection.num_traj != bs or selection.chunks_total != num_chunks:
        raise ValueError(
            f"`selection` must have {bs} trajectories of {num_chunks} chunks (the batch's "
            f"`responses`), got {selection.num_traj} of {selection.chunks_total}."
        )
    k = selection.k
    if traj_mini_batch_size is not None:
        size = check_positive_int(traj_mini_batch_size, "traj_mini_batch_size")
        if k % size:
            raise ValueError(
                f"`traj_mini_batch_size` must divide the number of selected slots B={k} (the "
                f"actor slices each trajectory in steps of it), got {size}: pick a budget that "
                f"is a multiple of it."
            )
    valid_chunks(batch, action_token_len=action_token_len)  # checks `finish_step`
    finish = batch["finish_step"]
    out: dict[str, Any] = {}
    for key in batch.keys():
        value = batch[key]
        if key in CHUNK_KEYS and isinstance(value, Tensor):
            if value.ndim < 2 or tuple(value.shape[:2]) != (bs, num_chunks):
                raise ValueError(
                    f"`batch['{key}']` must be shaped (bs, T, ...) = ({bs}, {num_chunks}, ...), "
                    f"got {tuple(value.shape)}."
                )
            out[key] = gather_chunks(value, selection)
        elif key in FLAT_KEYS and isinstance(value, Tensor):
            if tuple(value.shape) != (bs, num_chunks * tokens):
                raise ValueError(
                    f"`batch['{key}']` must be shaped (bs, T * K) = ({bs}, {num_chunks * tokens}), "
                    f"got {tuple(value.shape)}."
                )
            slots = gather_chunks(value.reshape(bs, num_chunks, tokens), selection)
            out[key] = slots.reshape(bs, k * tokens)
        else:
            out[key] = value
    chunk = selection.indices.to(finish.device)
    slot_steps = (finish[:, None] - chunk * steps).clamp(0, steps)
    slot_steps = torch.where(selection.mask.to(finish.device), slot_steps, 0)
    new_finish = slot_steps.sum(1).to(finish.dtype)
    out["finish_step"] = new_finish
    if fold_inclusion and selection.inclusion is not None and "advantages" in out:
        dtype = torch.promote_types(selection.inclusion.dtype, torch.float32)
        pi = torch.where(selection.mask, selection.inclusion.to(dtype), 1.0).to(finish.device)
        ratio = new_finish.to(dtype) / finish.to(dtype).clamp_min(1)
        w = torch.where(slot_steps > 0, ratio[:, None] / pi, 0.0)
        adv = out["advantages"]
        w_tok = w.repeat_interleave(tokens, dim=1).to(adv.device)
        out["advantages"] = (adv * w_tok).to(adv.dtype)
    return out
