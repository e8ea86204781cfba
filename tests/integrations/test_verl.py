"""chunkmask against the installed verl (0.9.1): its `agg_loss`, its `vanilla` loss inside its own
`ppo_loss`, its `DataProto`, and its `verl.plugins` discovery. Skipped when verl is absent."""

import subprocess
import sys
import warnings

import pytest
import torch

verl = pytest.importorskip("verl")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from tensordict import TensorDict  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from chunkmask import aggregate_loss, masked_grpo_loss, pps_sample  # noqa: E402
from chunkmask.aggregation import AGGREGATION_MODES  # noqa: E402
from chunkmask.integrations.verl import (  # noqa: E402
    LOSS_NAME,
    apply_selection,
    check_registered,
    pcm_policy_loss,
    register,
)

MODES = AGGREGATION_MODES


def _inputs(rows=6, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    adv = torch.randn(rows, length, generator=g, dtype=torch.float64)
    mask = torch.rand(rows, length, generator=g) < 0.7
    mask[:, 0] = True  # no empty row: verl and chunkmask differ there by design
    return logp, old, adv, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dp", [None, (2, 40, 12, 5)])
def test_aggregate_loss_equals_verl_agg_loss(mode, dp):
    loss, _, _, mask = _inputs()
    kw = {} if dp is None else dict(zip(("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"), dp, strict=True))
    ours = aggregate_loss(loss, mask, mode, **kw)
    theirs = core_algos.agg_loss(loss, mask.to(loss.dtype), mode, **kw)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-7, atol=1e-9)


def _config(mode, loss_mode, info=None):
    from verl.workers.config import PolicyLossConfig

    config = ActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=1,
                         rollout_n=1, loss_agg_mode=mode, clip_ratio_high=0.28,
                         policy_loss=PolicyLossConfig(loss_mode=loss_mode))
    config.global_batch_info.update(info or {})
    return config


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weights", [False, True])
def test_registered_loss_equals_vanilla(mode, weights):
    register()
    logp, old, adv, mask = _inputs(seed=1)
    w = torch.rand(logp.shape, dtype=logp.dtype) * 2 if weights else None
    info = {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 12, "loss_scale_factor": 8}
    results = []
    for name in ("vanilla", LOSS_NAME):
        fn = core_algos.get_policy_loss_fn(name)
        loss, metrics = fn(old, logp, adv, mask, mode, _config(mode, name, info), w)
        (grad,) = torch.autograd.grad(loss, logp)
        results.append((loss, grad, metrics))
    (l0, g0, m0), (l1, g1, m1) = results
    torch.testing.assert_close(l1.to(l0.dtype), l0, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-9)
    for key in m0:
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_registered_loss_inside_verls_ppo_loss(mode):
    register()
    rows, prompt, length = 4, 3, 6
    logp, old, adv, mask = _inputs(rows, length, seed=2)
    logp = logp.detach().float()
    # verl's no-padding layout: one flat run of prompt + response tokens per sequence, the
    # response's log-probs read one position to the left.
    flat = torch.zeros(rows * (prompt + length))
    for b in range(rows):
        start = b * (prompt + length) + prompt - 1
        flat[start : start + length] = logp[b]
    losses = []
    for name in ("vanilla", LOSS_NAME):
        values = flat.clone().requires_grad_()
        data = TensorDict({
            "prompts": torch.ones(rows, prompt, dtype=torch.long),
            "responses": torch.ones(rows, length, dtype=torch.long),
            "attention_mask": torch.ones(rows, prompt + length, dtype=torch.long),
            "response_mask": mask.long(), "old_log_probs": old.float(), "advantages": adv.float(),
        }, batch_size=[rows])
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=rows)
        loss, metrics = ppo_loss(_config(mode, name), {"log_probs": values}, data)
        (grad,) = torch.autograd.grad(loss, values)
        losses.append((loss, grad))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-5, atol=1e-8)


_PROBE = (
    "import verl\n"
    "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
    "print('chunkmask_pcm' in POLICY_LOSS_REGISTRY)\n"
)


def test_entry_point_registers_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.slow
def test_entry_point_registers_in_a_ray_worker():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        def probe():
            import verl  # noqa: F401
            from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

            return "chunkmask_pcm" in POLICY_LOSS_REGISTRY

        assert ray.get(probe.remote(), timeout=240) is True
    finally:
        ray.shutdown()


def test_plugin_failure_is_loud(monkeypatch, caplog):
    import runpy

    import chunkmask.integrations.verl._loss as loss_module

    def broken():
        raise RuntimeError("simulated")

    monkeypatch.setattr(loss_module, "register", broken)
    with warnings.catch_warnings(record=True) as seen, pytest.raises(RuntimeError, match="simulated"):
        warnings.simplefilter("always")
        runpy.run_module("chunkmask.integrations.verl._plugin")
    assert any("chunkmask_pcm" in str(w.message) for w in seen)
    assert any(r.levelname == "ERROR" and "simulated" in r.getMessage() for r in caplog.records)


def test_check_registered_raises_when_missing(monkeypatch):
    monkeypatch.delitem(core_algos.POLICY_LOSS_REGISTRY, LOSS_NAME, raising=False)
    with pytest.raises(RuntimeError, match="has no `chunkmask_pcm`"):
        check_registered()
    register()
    check_registered()


def _proto(rows, n, k_tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (rows,), generator=g)
    valid = torch.arange(n)[None] < lengths[:, None]
    token_valid = valid.repeat_interleave(k_tok, 1)
    batch = {
        "response_mask": token_valid.long(),
        "loss_mask": torch.cat([torch.zeros(rows, 2, dtype=torch.long), token_valid.long()], 1),
        "advantages": torch.randn(rows, 1, generator=g).expand(rows, n * k_tok).clone(),
        "old_log_probs": torch.randn(rows, n * k_tok, generator=g) * 0.3,
    }
    sizes = torch.rand(rows, n, generator=g)
    sizes[: rows // 2, :] = 0.0  # half the rows end up empty
    sizes[: rows // 2, 0] = 1e-9
    return DataProto.from_dict(batch), valid, sizes


def test_apply_selection_edits_both_masks_and_drops_to_a_legal_multiple():
    rows, n, k_tok = 16, 5, 3
    data, valid, sizes = _proto(rows, n, k_tok)
    from chunkmask import Selection

    chosen = valid & (torch.rand(valid.shape, generator=torch.Generator().manual_seed(5)) < 0.5)
    chosen[: rows // 2 + 1] = False  # these rows have no selected chunk
    chosen[-1, 0] = True
    sel = Selection.from_mask(chosen, valid)
    before = data.batch["response_mask"].clone()
    new, kept = apply_selection(data, sel, tokens_per_chunk=k_tok, dp_size=2, ppo_mini_batch_size=2,
                                rollout_n=2, fold_inclusion=False)
    assert len(new) % 4 == 0 and len(new) < rows
    keep_tokens = sel.chunk_mask().repeat_interleave(k_tok, 1)
    torch.testing.assert_close(new.batch["response_mask"], (before.bool() & keep_tokens)[kept].long())
    torch.testing.assert_close(new.batch["loss_mask"][:, 2:], new.batch["response_mask"])
    nonempty = (before.bool() & keep_tokens).any(1)
    assert set(torch.nonzero(nonempty).flatten().tolist()) <= set(kept.tolist())


@pytest.mark.parametrize("mode", ["token-sum", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_apply_selection_fold_gives_the_horvitz_thompson_loss(mode):
    rows, n, k_tok = 8, 4, 2
    data, valid, sizes = _proto(rows, n, k_tok, seed=3)
    sel = pps_sample(sizes + 0.1, 2, valid=valid, scope="trajectory",
                     generator=torch.Generator().manual_seed(1))
    adv_full = data.batch["advantages"].clone()
    old_full = data.batch["old_log_probs"].clone()
    logp_full = old_full + 0.1
    new, kept = apply_selection(data, sel, tokens_per_chunk=k_tok, dp_size=1, ppo_mini_batch_size=1,
                                loss_agg_mode=mode)
    b = new.batch
    info = {"global_batch_size": rows} if mode != "token-sum" else {}
    loss, _ = pcm_policy_loss(b["old_log_probs"], logp_full[kept], b["advantages"],
                              b["response_mask"], mode, _config(mode, LOSS_NAME, info))
    # Reference: chunkmask's own Horvitz-Thompson estimator on the packed selected chunks.
    traj, slot = sel.packed_slot_index()
    chunk = sel.indices[traj, slot]
    cols = chunk[:, None] * k_tok + torch.arange(k_tok)
    from chunkmask import Clip

    ref = masked_grpo_loss(logp_full[traj[:, None], cols], old_logp=old_full[traj[:, None], cols],
                           advantages=adv_full[traj, 0], selection=sel, loss_agg_mode=mode,
                           estimator="horvitz_thompson", clip=Clip(low=0.2, high=0.28, dual=3.0))
    if mode == "seq-mean-token-sum":
        # verl divides by its fixed batch size; chunkmask by the non-empty trajectories.
        ref_value = ref.policy_loss * int((sel.num_chunks > 0).sum()) / rows
    elif mode == "seq-mean-token-mean":
        ref_value = ref.policy_loss * int((sel.num_chunks > 0).sum()) / rows
    else:
        ref_value = ref.policy_loss
    torch.testing.assert_close(loss, ref_value, rtol=1e-5, atol=1e-6)


def test_apply_selection_bad_input():
    data, valid, sizes = _proto(8, 4, 2)
    sel = pps_sample(sizes + 0.1, 2, valid=valid, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="`selection` must be a chunkmask.Selection"):
        apply_selection(data, None, tokens_per_chunk=2, dp_size=1, ppo_mini_batch_size=1)
    with pytest.raises(ValueError, match="responses of 4 chunks x 3 tokens"):
        apply_selection(data, sel, tokens_per_chunk=3, dp_size=1, ppo_mini_batch_size=1)
    with pytest.raises(ValueError, match=r"multiple of lcm\(dp_size, ppo_mini_batch_size \* rollout_n\) = 3"):
        apply_selection(data, sel, tokens_per_chunk=2, dp_size=3, ppo_mini_batch_size=1)
    with pytest.raises(TypeError, match="`data` must be a verl DataProto"):
        apply_selection(object(), sel, tokens_per_chunk=2, dp_size=1, ppo_mini_batch_size=1)
    with pytest.raises(ValueError, match="`dp_size` must be"):
        apply_selection(data, sel, tokens_per_chunk=2, dp_size=0, ppo_mini_batch_size=1)
