"""chunkmask against the installed RLinf (0.3.0): `RLINF_EXT_MODULE` loading, its `actor` loss
through its `policy_loss` entry, its `compute_loss_mask`, and the mixin's shrunk rollout batch
against the masked full batch. RLinf's actor worker needs a GPU stack to import, so its
`process_nested_dict_for_train` step (drop the extra step, flatten, shuffle) is restated in
`_rlinf_train_rows`. Skipped when RLinf is absent."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("rlinf")
registry = pytest.importorskip("rlinf.algorithms.registry")
metric_utils = pytest.importorskip("rlinf.utils.metric_utils")

from _spawn import run_workers  # noqa: E402
from chunkmask import Selection, pps_sample  # noqa: E402
from chunkmask.integrations.rlinf import (  # noqa: E402
    LOSS_NAME,
    PLUS_ONE_KEYS,
    PCMActorMixin,
    register,
    rollout_valid,
    shrink_rollout_batch,
)

C, D, STEPS, TRAJ = 2, 3, 6, 4  # action chunks per step, action dim, chunk steps, trajectories


def test_register_through_rlinf_ext_module():
    probe = (
        "from rlinf.scheduler.cluster.utils import load_user_extension_module\n"
        "load_user_extension_module()\n"
        "from rlinf.algorithms.registry import get_policy_loss\n"
        f"print(get_policy_loss('{LOSS_NAME}').__name__)\n"
    )
    env = dict(os.environ, RLINF_EXT_MODULE="chunkmask.integrations.rlinf")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "pcm_actor_loss"
    assert LOSS_NAME == LOSS_NAME.lower()


def _loss_kwargs(loss_type, logprob_type, episode, dual, seed=0, rows=8):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(rows, C * D, generator=g) * 0.3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(rows, C * D, generator=g)
    mask = torch.rand(rows, C, generator=g) < 0.7
    mask[0] = True
    kw = dict(
        loss_type=loss_type, logprob_type=logprob_type, reward_type="action_level",
        single_action_dim=D, logprobs=logp, old_logprobs=old,
        advantages=torch.randn(rows, C, generator=g), loss_mask=mask,
        loss_mask_sum=torch.randint(3, 9, (rows, C), generator=g), clip_ratio_low=0.2,
        clip_ratio_high=0.28, task_type="embodied", critic_warmup=False,
        max_episode_steps=12 if episode else None,
    )
    if dual:
        kw["clip_ratio_c"] = 3.0
    return kw, logp


@pytest.mark.parametrize("logprob_type", ["token_level", "action_level"])
@pytest.mark.parametrize("episode", [False, True])
@pytest.mark.parametrize("dual", [False, True])
def test_loss_equals_rlinf_actor_loss(logprob_type, episode, dual):
    register()
    results = []
    for name in ("actor", LOSS_NAME):
        kw, logp = _loss_kwargs(name, logprob_type, episode, dual)
        loss, metrics = registry.policy_loss(**kw)
        (grad,) = torch.autograd.grad(loss, logp)
        results.append((loss, grad, metrics))
    (l0, g0, m0), (l1, g1, m1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-8)
    for key in ("actor/ratio", "actor/clip_fraction", "actor/approx_kl", "actor/policy_loss"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-6), key


def _rollout(seed=0):
    g = torch.Generator().manual_seed(seed)
    dones = torch.zeros(STEPS + 1, TRAJ, C, dtype=torch.bool)
    dones[4, 1, 1] = True  # trajectory 1 ends inside step 4
    dones[2, 3, 0] = True
    loss_mask, loss_mask_sum = metric_utils.compute_loss_mask(dones)
    return {
        "prev_logprobs": torch.randn(STEPS, TRAJ, C * D, generator=g) * 0.3,
        "advantages": torch.randn(STEPS, TRAJ, C, generator=g),
        "rewards": torch.randn(STEPS, TRAJ, C, generator=g),
        "loss_mask": loss_mask, "loss_mask_sum": loss_mask_sum, "dones": dones,
        "prev_values": torch.randn(STEPS + 1, TRAJ, 1, generator=g),
        "forward_inputs": {"features": torch.randn(STEPS, TRAJ, C * D, generator=g)},
        "versions": None,
    }


def _rlinf_train_rows(batch):
    """RLinf's `process_nested_dict_for_train`, without the shuffle (sums do not depend on it)."""
    out = {}
    for key, value in batch.items():
        if key in PLUS_ONE_KEYS:
            value = value[:-1]
        if isinstance(value, dict):
            out[key] = _rlinf_train_rows(value)
        elif isinstance(value, torch.Tensor):
            out[key] = value.reshape(-1, *value.shape[2:])
        else:
            out[key] = value
    return out


def _epoch_loss(batch, theta, micro=4):
    """RLinf's update loop on rows: micro-batches of `micro`, each loss / gradient accumulation,
    summed (what the accumulated gradient of one epoch over the global batches adds up)."""
    rows = _rlinf_train_rows(batch)
    n = rows["prev_logprobs"].shape[0]
    total = 0.0
    for start in range(0, n, micro):
        part = {k: (v[start : start + micro] if isinstance(v, torch.Tensor) else v)
                for k, v in rows.items() if k != "forward_inputs"}
        logp = part["prev_logprobs"] + theta * rows["forward_inputs"]["features"][start : start + micro]
        loss, _ = registry.policy_loss(
            loss_type=LOSS_NAME, logprob_type="token_level", reward_type="action_level",
            single_action_dim=D, logprobs=logp, old_logprobs=part["prev_logprobs"],
            advantages=part["advantages"], loss_mask=part["loss_mask"],
            loss_mask_sum=part["loss_mask_sum"], clip_ratio_low=0.2, clip_ratio_high=0.28,
            max_episode_steps=STEPS * C, task_type="embodied", critic_warmup=False,
        )
        total = total + loss
    return total


@pytest.mark.parametrize("seed", [0, 1])
def test_shrunk_rollout_equals_masked_full_rollout(seed):
    register()
    batch = _rollout(seed)
    valid = rollout_valid(batch)
    sel = pps_sample(torch.rand(valid.shape, generator=torch.Generator().manual_seed(seed)) + 0.1,
                     2, valid=valid, generator=torch.Generator().manual_seed(seed))
    shrunk = shrink_rollout_batch(batch, sel, rows_multiple=4, fold_inclusion=False)
    rows = shrunk["prev_logprobs"].shape[0]
    assert rows % 4 == 0 and rows < STEPS * TRAJ
    assert shrunk["dones"].shape[0] == rows + 1 and shrunk["prev_values"].shape[:2] == (rows + 1, 1)
    full = dict(batch)
    full["loss_mask"] = batch["loss_mask"] & sel.chunk_mask().T[:, :, None]
    theta = torch.tensor(0.3, requires_grad=True)
    a = _epoch_loss(shrunk, theta)
    (ga,) = torch.autograd.grad(a, theta)
    b = _epoch_loss(full, theta)
    (gb,) = torch.autograd.grad(b, theta)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
    assert a.abs() > 0


def test_fold_divides_advantages_by_inclusion():
    batch = _rollout()
    valid = rollout_valid(batch)
    sel = pps_sample(torch.rand(valid.shape) + 0.1, 2, valid=valid,
                     generator=torch.Generator().manual_seed(3))
    shrunk = shrink_rollout_batch(batch, sel, rows_multiple=1)
    traj, slot = sel.packed_slot_index()
    chunk = sel.indices[traj, slot]
    expected = batch["advantages"][chunk, traj] / sel.inclusion[traj, slot][:, None]
    got = shrunk["advantages"][:, 0]
    order = torch.argsort(chunk * TRAJ + traj)  # shrunk rows are step-major
    torch.testing.assert_close(got, expected[order].to(got.dtype))


def _rank_rows(rank, world):
    batch = _rollout(rank)
    valid = rollout_valid(batch)
    keep = valid.clone()
    keep[:, rank + 1 :] = False  # rank 0 keeps fewer chunk steps than rank 1
    sel = Selection.from_mask(keep & valid, valid)
    out = shrink_rollout_batch(batch, sel, rows_multiple=2)
    return {"rows": out["prev_logprobs"].shape[0], "selected": int(sel.num_selected()),
            "live": int(out["loss_mask"].any(-1).sum())}


@pytest.mark.slow
def test_row_counts_are_equal_across_ranks(tmp_path):
    results = run_workers(_rank_rows, 2, tmp_path)
    assert results[0]["rows"] == results[1]["rows"]
    assert results[0]["selected"] < results[1]["selected"]
    for r in results:
        assert r["rows"] % 2 == 0 and r["live"] <= r["selected"]


class _FakeActor:
    """Just what `PCMActorMixin` reads of `EmbodiedFSDPActor`."""

    def __init__(self, batch):
        from omegaconf import OmegaConf

        self.rollout_batch = batch
        self.cfg = OmegaConf.create({"algorithm": {"pcm": {"budget": 2}},
                                     "actor": {"global_batch_size": 8}})
        self._world_size = 2

    def run_training(self):
        return self.rollout_batch["prev_logprobs"].shape


class _PCMActor(PCMActorMixin, _FakeActor):
    pcm_generator = torch.Generator().manual_seed(0)


def test_mixin_shrinks_before_rlinfs_training_loop():
    actor = _PCMActor(_rollout())
    shape = actor.run_training()
    assert shape[1] == 1 and shape[0] % 4 == 0 and shape[0] < STEPS * TRAJ


def test_bad_input():
    batch = _rollout()
    valid = rollout_valid(batch)
    with pytest.raises(TypeError, match="`selection` must be a chunkmask.Selection"):
        shrink_rollout_batch(batch, None, rows_multiple=1)
    with pytest.raises(ValueError, match="`selection` must have 4 trajectories of 6 chunk steps"):
        shrink_rollout_batch(batch, Selection.from_mask(valid.T.contiguous()), rows_multiple=1)
    with pytest.raises(ValueError, match="`rows_multiple` must be"):
        shrink_rollout_batch(batch, Selection.from_mask(valid), rows_multiple=0)
    with pytest.raises(ValueError, match=r"`rows_multiple` \(7\) must divide the rollout's 24 rows"):
        shrink_rollout_batch(batch, Selection.from_mask(valid), rows_multiple=7)
    with pytest.raises(ValueError, match="`rollout_batch` must hold `prev_logprobs`"):
        rollout_valid({})
