"""SimpleVLA-RL: the gathered `(bs, B, ...)` batch against the masked full batch, under a restatement
of SimpleVLA-RL's own masking rule (`dp_rob.update_policy`: tokens before `finish_step *
action_token_len` count; per trajectory, `compute_policy_loss`'s masked token mean of the clipped
surrogate; mean over trajectories). SimpleVLA-RL is not a pip package, so its rule is restated."""

import pytest
import torch

from chunkmask import Selection, masked_grpo_loss, pps_sample
from chunkmask.integrations.simplevla import select_chunks, valid_chunks

A_TOK, STEPS = 7, 8  # LIBERO: 8 actions of 7 tokens per chunk
K = A_TOK * STEPS


def _simplevla_loss(batch, logp, clip_low=0.2, clip_high=0.28):
    """SimpleVLA-RL's per-trajectory masked token mean (micro-batch size 1), averaged."""
    responses = batch["responses"]
    length = responses.shape[1] * responses.shape[2]
    mask = torch.arange(length)[None] < (batch["finish_step"] * A_TOK)[:, None]
    old, adv = batch["old_log_probs"], batch["advantages"]
    ratio = torch.exp(logp - old)
    losses = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    per_traj = (losses * mask).sum(1) / mask.sum(1)
    return per_traj.mean()


def _batch(bs=4, chunks=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    finish = torch.tensor([chunks * STEPS, 19, 8, 33])[:bs]  # full, partial, one chunk, partial
    return {
        "input_ids": torch.randint(0, 100, (bs, chunks, 5), generator=g),
        "attention_mask": torch.ones(bs, chunks, 5, dtype=torch.long),
        "pixel_values": torch.randn(bs, chunks, 3, 2, 2, generator=g),
        "responses": torch.randint(0, 256, (bs, chunks, K), generator=g),
        "old_log_probs": torch.randn(bs, chunks * K, generator=g) * 0.3,
        "advantages": torch.randn(bs, 1, generator=g).expand(bs, chunks * K).clone(),
        "finish_step": finish,
    }, g


def test_valid_chunks_follow_finish_step():
    batch, _ = _batch()
    valid = valid_chunks(batch)
    assert valid.sum(1).tolist() == [6, 3, 1, 5]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gathered_loss_equals_masked_full_batch(seed):
    batch, g = _batch(seed=seed)
    valid = valid_chunks(batch)
    sel = pps_sample(torch.rand(valid.shape, generator=g) + 0.1, 2, valid=valid,
                     scope="trajectory", generator=g)
    logp_full = (batch["old_log_probs"] + 0.2 * torch.randn(batch["old_log_probs"].shape, generator=g)).requires_grad_()
    out = select_chunks(batch, sel, traj_mini_batch_size=sel.k, fold_inclusion=False)
    assert out["responses"].shape == (4, sel.k, K) and out["pixel_values"].shape[:2] == (4, sel.k)
    bs, n = valid.shape
    gathered_logp = logp_full.reshape(bs, n, K)[torch.arange(bs)[:, None], sel.indices].reshape(bs, -1)
    loss = _simplevla_loss(out, gathered_logp)
    # The masked full batch: SimpleVLA's rule with the unselected chunks' tokens masked too.
    keep = sel.chunk_mask().repeat_interleave(K, 1)
    step_mask = torch.arange(n * K)[None] < (batch["finish_step"] * A_TOK)[:, None]
    mask = keep & step_mask
    ratio = torch.exp(logp_full - batch["old_log_probs"])
    adv = batch["advantages"]
    losses = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.28))
    ref = ((losses * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(loss, ref)
    (g1,) = torch.autograd.grad(loss, logp_full)
    (g2,) = torch.autograd.grad(ref, logp_full)
    torch.testing.assert_close(g1, g2)


def test_fold_gives_the_horvitz_thompson_estimate():
    batch, g = _batch(seed=4)
    valid = valid_chunks(batch)
    sel = pps_sample(torch.rand(valid.shape, generator=g) + 0.1, 2, valid=valid,
                     scope="trajectory", generator=g)
    # Whole chunks only, so SimpleVLA's full token count is K * T_i, chunkmask's HT divisor.
    batch["finish_step"] = valid.sum(1) * STEPS
    logp_full = batch["old_log_probs"] + 0.1
    out = select_chunks(batch, sel)
    bs, n = valid.shape
    gathered = logp_full.reshape(bs, n, K)[torch.arange(bs)[:, None], sel.indices].reshape(bs, -1)
    loss = _simplevla_loss(out, gathered)
    traj, slot = sel.packed_slot_index()
    chunk = sel.indices[traj, slot]
    rows = logp_full.reshape(bs, n, K)[traj, chunk]
    old = batch["old_log_probs"].reshape(bs, n, K)[traj, chunk]
    ref = masked_grpo_loss(rows, old_logp=old, advantages=batch["advantages"][traj, 0],
                           selection=sel, estimator="horvitz_thompson")
    torch.testing.assert_close(loss, ref.policy_loss)


def test_finish_step_of_a_partly_valid_last_chunk():
    batch, _ = _batch()
    sel = Selection.from_mask(torch.tensor([[True, False, False, False, False, True],
                                            [False, True, True, False, False, False],
                                            [True, False, False, False, False, False],
                                            [False, False, False, True, True, False]]), valid_chunks(batch), k=2)
    out = select_chunks(batch, sel)
    # 8 + 8; chunk 1 (8 steps) + chunk 2 (19 - 16 = 3 steps); chunk 0 (8); 8 + (33 - 32 = 1).
    assert out["finish_step"].tolist() == [16, 11, 8, 9]


def test_select_chunks_bad_input():
    batch, _ = _batch()
    sel = Selection.from_mask(valid_chunks(batch), k=6)
    with pytest.raises(ValueError, match="`traj_mini_batch_size` must divide the number of selected slots B=6"):
        select_chunks(batch, sel, traj_mini_batch_size=4)
    with pytest.raises(TypeError, match="`selection` must be a chunkmask.Selection"):
        select_chunks(batch, None)
    with pytest.raises(ValueError, match="`selection` must have 4 trajectories of 6 chunks"):
        select_chunks(batch, Selection.from_mask(torch.ones(3, 6, dtype=torch.bool)))
    with pytest.raises(ValueError, match="must hold whole actions of `action_token_len`=5"):
        select_chunks(batch, sel, action_token_len=5)
    bad = dict(batch, old_log_probs=torch.zeros(4, 7))
    with pytest.raises(ValueError, match=r"`batch\['old_log_probs'\]` must be shaped \(bs, T \* K\)"):
        select_chunks(bad, sel)
    with pytest.raises(ValueError, match="`batch` must hold `finish_step`"):
        select_chunks({"responses": batch["responses"]}, sel)
    with pytest.raises(TypeError, match="`batch` must be a mapping"):
        valid_chunks([1, 2])
