"""Driver-side chunk selection for verl: edit the masks, drop rows to a legal multiple."""

import math
from typing import Any

import torch
from torch import Tensor

from chunkmask._checks import check_option, check_positive_int
from chunkmask.batch._fold import _MODES
from chunkmask.batch._selection import Selection


def _chunk_token_mask(selection: Selection, tokens_per_chunk: int) -> Tensor:
    """`(rows, N * K)` bool: True on the tokens of selected chunks."""
    return selection.chunk_mask().repeat_interleave(tokens_per_chunk, dim=1)


def _fold_weights(
    selection: Selection, before: Tensor, after: Tensor, tokens_per_chunk: int, mode: str
) -> Tensor:
    r"""`(rows, N * K)` Horvitz-Thompson weights for verl's normalisers (fixed $G$ and $L$)."""
    dtype = torch.promote_types(selection.inclusion.dtype, torch.float32)
    pi = torch.ones(selection.num_traj, selection.chunks_total + 1, dtype=dtype)
    pi = pi.to(selection.mask.device)
    target = torch.where(selection.mask, selection.indices, selection.chunks_total)
    pi = pi.scatter(1, target, selection.inclusion.to(dtype))[:, :-1]
    w = (1.0 / pi).repeat_interleave(tokens_per_chunk, dim=1)
    n_after, n_before = after.sum(1).to(dtype), before.sum(1).to(dtype)
    if mode == "seq-mean-token-mean":
        ratio = torch.where(n_before > 0, n_after / n_before.clamp_min(1), 0.0)[:, None]
    elif mode == "token-mean":
        ratio = n_after.sum() / n_before.sum().clamp_min(1)
    else:
        ratio = torch.ones((), dtype=dtype, device=w.device)
    return torch.where(after, w * ratio, 0.0)


def apply_selection(
    data: Any,
    selection: Selection,
    *,
    tokens_per_chunk: int,
    dp_size: int,
    ppo_mini_batch_size: int,
    rollout_n: int = 1,
    loss_agg_mode: str = "token-mean",
    fold_inclusion: bool = True,
) -> tuple[Any, Tensor]:
    r"""Apply a chunk selection to a verl `DataProto` on the driver, before `_update_actor`.

    Layout: row $i$ of `data` is trajectory $i$ of `selection`, and its response holds the
    trajectory's $N$ chunks back to back, `tokens_per_chunk` ($K$) tokens each (the SimpleVLA-RL
    layout verl's VLA line grew from). The function

    1. sets `response_mask` (and `loss_mask`, whose last `N K` positions are the response, when
       the batch has one) to False on every token of an unselected chunk: verl's `batch_num_tokens`
       is counted from `loss_mask` and the loss reads `response_mask`, so both must agree;
    2. drops the rows with no selected valid token, keeping the row count a multiple of
       `lcm(dp_size, ppo_mini_batch_size * rollout_n)` (verl's legal sizes) by keeping the first
       few empty rows as padding (all masks False: they cost compute, not gradient);
    3. with `fold_inclusion` and a selection carrying `inclusion`, multiplies `advantages` by the
       Horvitz-Thompson weights (`chunkmask.batch.horvitz_thompson_weights`, exact for PPO-clip)
       under verl's normalisers: $1/\pi$ in `token-sum` and the seq-token-sum modes (fixed $G$,
       $L$), times $n_i^{sel}/n_i$ in `seq-mean-token-mean`, times
       $\sum n^{sel}/\sum n$ in `token-mean` (exact when one mini-batch covers the batch).

    Saved: the forward and backward of dropped rows only. Masked chunks inside a kept row still
    run through the model (Sec. 4.5 of the PCM paper: masking alone saves nothing).

    Args:
        data: a `verl.DataProto` with `response_mask` (and optionally `loss_mask`,
            `advantages`) in `data.batch`.
        selection: the `Selection`, one trajectory per row of `data`.
        tokens_per_chunk: $K$; the response length must be `selection.chunks_total * K`.
        dp_size: the data-parallel size of the actor.
        ppo_mini_batch_size: `actor_rollout_ref.actor.ppo_mini_batch_size` (in prompts).
        rollout_n: `actor_rollout_ref.rollout.n`.
        loss_agg_mode: the actor's `loss_agg_mode` (for the fold).
        fold_inclusion: fold the Horvitz-Thompson weights when `selection.inclusion` is set.

    Returns:
        `(new_data, kept)`: the selected `DataProto` and the `(rows',)` int64 indices of the kept
        rows of `data`.

    Raises:
        TypeError: if `selection` is not a `Selection` or `data` has no tensor batch.
        ValueError: if the row count or response length disagrees with the selection, or the
            row count is not itself a legal multiple.
    """
    if not isinstance(selection, Selection):
        raise TypeError(f"`selection` must be a chunkmask.Selection, got {type(selection).__name__}.")
    k_tok = check_positive_int(tokens_per_chunk, "tokens_per_chunk")
    multiple = math.lcm(
        check_positive_int(dp_size, "dp_size"),
        check_positive_int(ppo_mini_batch_size, "ppo_mini_batch_size")
        * check_positive_int(rollout_n, "rollout_n"),
    )
    check_option(loss_agg_mode, "loss_agg_mode", _MODES)
    batch = getattr(data, "batch", None)
    if batch is None or "response_mask" not in batch.keys():
        raise TypeError(
            "`data` must be a verl DataProto whose `batch` holds `response_mask`, got "
            f"{type(data).__name__}."
        )
    response_mask = batch["response_mask"]
    rows, length = response_mask.shape
    if rows != selection.num_traj or length != selection.chunks_total * k_tok:
        raise ValueError(
            f"`data` must have {selection.num_traj} rows (one per trajectory) and responses of "
            f"{selection.chunks_total} chunks x {k_tok} tokens = {selection.chunks_total * k_tok}, "
            f"got response_mask of shape {(rows, length)}."
        )
    if rows % multiple:
        raise ValueError(
            f"`data` must have a multiple of lcm(dp_size, ppo_mini_batch_size * rollout_n) = "
            f"{multiple} rows, got {rows}."
        )
    keep_tokens = _chunk_token_mask(selection, k_tok).to(response_mask.device)
    before = response_mask.to(torch.bool)
    after = before & keep_tokens
    batch["response_mask"] = after.to(response_mask.dtype)
    if "loss_mask" in batch.keys():
        loss_mask = batch["loss_mask"]
        tail = loss_mask[:, -length:].to(torch.bool) & keep_tokens
        batch["loss_mask"] = torch.cat([loss_mask[:, :-length], tail.to(loss_mask.dtype)], 1)
    if fold_inclusion and selection.inclusion is not None and "advantages" in batch.keys():
        w = _fold_weights(selection, before, after, k_tok, loss_agg_mode)
        adv = batch["advantages"]
        batch["advantages"] = (adv * w.to(adv.device)).to(adv.dtype)
    nonempty = after.any(1)
    count = int(nonempty.sum())
    target = min(rows, max(multiple, math.ceil(count / multiple) * multiple))
    empty = torch.nonzero(~nonempty).flatten()
    keep = torch.cat([torch.nonzero(nonempty).flatten(), empty[: target - count]])
    kept = torch.sort(keep).values
    return data.select_idxs(kept), kept
