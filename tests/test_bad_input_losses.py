"""Every public function of the loss, aggregation, advantage and self-BC modules, driven through the
classes of bad input: wrong type, wrong dtype, wrong rank or size, NaN/Inf, negative values,
out-of-range scalars. Each must raise a ValueError or TypeError that names the argument, never
another exception, never a NaN, never silent acceptance. Degenerate but legal inputs (everything
masked, constant or single-member groups, bf16) must give finite values and finite gradients."""

import inspect
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkmask as cm
from _fuzz import bad_values, check_rejects
from _reference.inclusion import loss_kwargs, with_packed_inclusion

pytestmark = pytest.mark.filterwarnings("ignore")

NAN = float("nan")


def unchecked(fn):
    """The function without the run-time jaxtyping wrapper the test hook may add."""
    return getattr(fn, "__wrapped__", fn)


# ----------------------------------------------------------------------------- valid calls


def sel_2x3():
    return cm.Selection.from_mask(torch.tensor([[True, False, True], [False, True, False]]))


def packed_policy_kwargs():
    return dict(
        logp=-torch.rand(3, 2),
        old_logp=-torch.rand(3, 2),
        advantages=torch.tensor([1.0, -1.0, 0.5]),
        selection=sel_2x3(),
        mask=torch.tensor([[True, True], [True, False], [True, True]]),
    )


def padded_kwargs(*names):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(2, 4, generator=g) for n in names}


CALLS = {
    "aggregate_loss": (
        cm.aggregate_loss,
        lambda: dict(
            loss=torch.randn(3, 4),
            mask=torch.ones(3, 4, dtype=torch.bool),
            segment=torch.tensor([0, 0, 1]),
            num_segments=2,
            weights=torch.ones(3),
            batch_num_tokens=12,
            global_batch_size=2,
            loss_scale_factor=8,
            dp_size=1,
        ),
    ),
    "masked_grpo_loss": (
        cm.masked_grpo_loss,
        lambda: dict(
            **packed_policy_kwargs(),
            entropy=torch.rand(3, 2),
            ref_logp=-torch.rand(3, 2),
            entropy_coef=0.01,
            kl_coef=0.1,
            clip_low=0.2,
            clip_high=0.28,
            dual_clip=3.0,
            dp_size=1,
            batch_num_tokens=5,
        ),
    ),
    "masked_grpo_loss_ht": (
        cm.masked_grpo_loss,
        lambda: dict(
            **{
                **packed_policy_kwargs(),
                "selection": with_packed_inclusion(
                    packed_policy_kwargs()["selection"], torch.tensor([0.5, 0.9, 0.25])
                ),
            },
            estimator="horvitz_thompson",
        ),
    ),
    "chunked_ppo_loss": (
        cm.chunked_ppo_loss,
        lambda: dict(
            **padded_kwargs("logp", "old_logp", "advantages"),
            mask=torch.ones(2, 4, dtype=torch.bool),
            log_ratio_clamp=20.0,
            global_batch_size=2,
        ),
    ),
    "value_loss": (
        cm.value_loss,
        lambda: dict(
            **padded_kwargs("values", "returns", "old_values"),
            mask=torch.ones(2, 4, dtype=torch.bool),
            clip=0.2,
            huber_delta=10.0,
        ),
    ),
    "bc_loss": (
        cm.bc_loss,
        lambda: dict(logp=-torch.rand(3), selection=sel_2x3(), event_size=2),
    ),
    "clipped_surrogate": (
        cm.clipped_surrogate,
        lambda: dict(**padded_kwargs("logp", "old_logp", "advantages"), dual_clip=2.0),
    ),
    "group_relative_advantages": (
        cm.group_relative_advantages,
        lambda: dict(
            rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]),
            group=torch.tensor([0, 0, 1, 1]),
            valid=torch.ones(4, dtype=torch.bool),
            eps=1e-6,
        ),
    ),
    "chunk_rewards": (
        cm.advantages.chunk_rewards,
        lambda: dict(
            rewards=torch.rand(2, 3, 4), mask=torch.ones(2, 3, 4, dtype=torch.bool), gamma=0.9
        ),
    ),
    "chunk_gae": (
        cm.chunk_gae,
        lambda: dict(
            **padded_kwargs("rewards", "values", "next_values"),
            valid=torch.ones(2, 4, dtype=torch.bool),
            terminated=torch.zeros(2, 4, dtype=torch.bool),
            truncated=torch.zeros(2, 4, dtype=torch.bool),
            bootstrap_value=torch.zeros(2),
            chunk_steps=torch.full((2, 4), 3),
            gamma=0.99,
            lam=0.95,
            chunk_size=3,
        ),
    ),
    "whiten_advantages": (
        cm.advantages.whiten_advantages,
        lambda: dict(advantages=torch.randn(2, 4), mask=torch.ones(2, 4, dtype=torch.bool), eps=1e-8),
    ),
    "chunk_log_prob": (
        cm.chunk_log_prob,
        lambda: dict(logp=-torch.rand(2, 3, 4), mask=torch.ones(2, 3, 4, dtype=torch.bool)),
    ),
    "loss_normalizers": (
        cm.loss_normalizers,
        lambda: dict(selection=sel_2x3(), mask=torch.ones(3, 2, dtype=torch.bool)),
    ),
}

# Arguments whose NaN/Inf entries are legal data (they are masked out, or are losses themselves).
NAN_OK = {"mask", "valid", "terminated", "truncated", "selection", "segment"}
# Arguments that must be non-negative.
NORMALISERS = {"batch_num_tokens", "global_batch_size", "loss_scale_factor"}
NONNEGATIVE = {"weights", "inclusion", "batch_num_tokens", "global_batch_size", "loss_scale_factor",
               "chunk_steps", "eps", "huber_delta", "clip", "event_size", "dp_size", "chunk_size"}


def classes(name, value):
    """The classes of `tests/_fuzz.py` (plus scalar NaN/Inf and Selection/option cases) that must
    be rejected for an argument whose valid value is `value`."""
    if isinstance(value, torch.Tensor):
        kinds = ["type", "dtype", "rank", "size"]
        if value.dtype.is_floating_point and name not in NAN_OK:
            kinds += ["nan", "inf"]
        if name in NONNEGATIVE:
            kinds.append("negative")
        return kinds
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ["type", "range", "scalar-nan"] if name in NONNEGATIVE else ["type", "scalar-nan"]
    if isinstance(value, cm.Selection):
        return ["selection-tuple"]
    if isinstance(value, str):
        return ["option"]
    return ["type"]


def bad_values_of(name, value):
    out = []
    for kind in classes(name, value):
        if kind == "scalar-nan":
            out += [(kind, math.nan), (kind, math.inf)]
        elif kind == "selection-tuple":
            out.append((kind, tuple(value)))
        elif kind == "option":
            out.append((kind, "no-such-option"))
        else:
            bads = bad_values(kind, value)
            if name in NORMALISERS and kind == "type":  # a float count is fine
                bads = [b for b in bads if not isinstance(b, float)]
            out += [(kind, bad) for bad in bads]
    return out


CASES = [
    (call, name, i)
    for call, (_, build) in CALLS.items()
    for name, value in build().items()
    for i, _ in enumerate(bad_values_of(name, value))
]


# Flat case names as the grouped options spell them in messages.
ALIASES = {
    "clip_low": "clip.low", "clip_high": "clip.high", "dual_clip": "clip.dual",
    "log_ratio_clamp": "clip.log_ratio_clamp", "entropy": "regularizers.entropy",
    "ref_logp": "regularizers.ref_logp", "entropy_coef": "regularizers.entropy_coef",
    "kl_coef": "regularizers.kl_coef", "kl_type": "regularizers.kl_type",
    "inclusion": "selection.inclusion", "clip": "value_clip",
}
LOSSES = {"masked_grpo_loss", "masked_grpo_loss_ht", "chunked_ppo_loss", "value_loss", "bc_loss",
          "clipped_surrogate"}


def checked(call, fn):
    """`fn` with its value checks on (`validate_args=True`) and, for a loss, the flat options."""
    fn = unchecked(fn)
    takes = "validate_args" in inspect.signature(fn).parameters

    def run(**kw):
        if takes:
            kw = {"validate_args": True, **kw}
        if call in LOSSES:
            if call == "value_loss" and "clip" in kw:
                kw["value_clip"] = kw.pop("clip")
            kw = loss_kwargs(**kw)
        return fn(**kw)

    run.__name__ = run.__qualname__ = call
    return run


def run_bad(call, name, i):
    fn, build = CALLS[call]
    kwargs = build()
    kind, bad = bad_values_of(name, kwargs[name])[i]
    if (call, name, kind) in LEGAL:
        return
    # a `selection` mismatch may name the packed tensor it disagrees with
    names = ("logp",) if name == "selection" else ()
    if name in ALIASES:
        names = (*names, ALIASES[name])
    check_rejects(checked(call, fn), kwargs, name, bad, names=names)


def test_the_valid_calls_pass():
    for call, (fn, build) in CALLS.items():
        out = checked(call, fn)(**build())
        leaves = out if isinstance(out, tuple) else (out,)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                assert torch.isfinite(leaf).all(), call


# Some classes are legal for some arguments.
LEGAL = {
    ("group_relative_advantages", "rewards", "dtype"),  # int and bool rewards are legal
    ("chunk_rewards", "rewards", "dtype"),
    ("chunk_gae", "next_values", "nan"),  # read only where `truncated`: none here
    ("chunk_gae", "next_values", "inf"),
    ("loss_normalizers", "mask", "size"),  # a wider token axis is just more tokens per chunk
}


@settings(deadline=None, max_examples=400)
@given(case=st.sampled_from(CASES))
def test_bad_input_is_named(case):
    run_bad(*case)


def test_every_case_runs_once():
    """The property test samples; this pass runs every case, so none can hide."""
    failures = []
    for case in CASES:
        try:
            run_bad(*case)
        except (AssertionError, pytest.fail.Exception) as err:
            failures.append(str(err).splitlines()[0])
    assert not failures, "\n".join(failures)
    assert len(CASES) > 250


def test_legal_variants_are_accepted():
    fn, build = CALLS["group_relative_advantages"]
    kwargs = build()
    kwargs["rewards"] = kwargs["rewards"].to(torch.int64)
    assert torch.isfinite(unchecked(fn)(**kwargs)).all()


# ----------------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("mode", cm.aggregation.AGGREGATION_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_and_bf16_losses_are_finite(mode, dtype):
    kwargs = packed_policy_kwargs()
    for key in ("logp", "old_logp"):
        kwargs[key] = kwargs[key].to(dtype).requires_grad_(key == "logp")
    kwargs["advantages"] = kwargs["advantages"].to(dtype)
    for mask in (kwargs["mask"], torch.zeros(3, 2, dtype=torch.bool)):
        out = cm.masked_grpo_loss(**{**kwargs, "mask": mask}, loss_agg_mode=mode)
        assert all(torch.isfinite(v).all() for v in out)
        (grad,) = torch.autograd.grad(out.loss, kwargs["logp"])
        assert torch.isfinite(grad).all()
    values = torch.randn(2, 4, dtype=dtype, requires_grad=True)
    none = torch.zeros(2, 4, dtype=torch.bool)
    for loss in (
        cm.value_loss(values, returns=values.detach(), mask=none, loss_agg_mode=mode),
        cm.bc_loss(values, mask=none, loss_agg_mode=mode),
        cm.chunked_ppo_loss(values, old_logp=values.detach(), advantages=values.detach(), mask=none, loss_agg_mode=mode).loss,
    ):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, values)
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_advantages_of_degenerate_groups_have_zero_value_and_gradient(eps, scale_by_std):
    # all successes, all failures, a single member, a mixed group
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0], requires_grad=True)
    group = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    adv = cm.group_relative_advantages(rewards, group, eps=eps, scale_by_std=scale_by_std)
    assert adv[:5].tolist() == [0.0] * 5
    assert adv[5] < 0 < adv[6]
    (grad,) = torch.autograd.grad((adv * torch.arange(7.0)).sum(), rewards)
    assert torch.isfinite(grad).all()
    assert grad[:5].tolist() == [0.0] * 5


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_whitening_constant_or_single_input_is_finite(eps):
    for x in (torch.ones(3), torch.tensor([2.0]), torch.zeros(0)):
        out = cm.advantages.whiten_advantages(x, eps=eps)
        assert torch.isfinite(out).all()
        if x.numel():
            assert out.abs().max() == 0.0
    out = cm.advantages.whiten_advantages(torch.tensor([1.0, 3.0]), eps=0.0)
    assert out.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


# ----------------------------------------------------------------------------- self-BC objects


def entry():
    return {"obs": torch.zeros(3, 2)}


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda b: b.add(entry(), steps="5"), "steps"),
        (lambda b: b.add(entry(), steps=5.0), "steps"),
        (lambda b: b.add(entry(), steps=True), "steps"),
        (lambda b: b.add(entry(), steps=-1), "steps"),
        (lambda b: b.add(entry(), steps=5, success="yes"), "success"),
        (lambda b: b.add(entry(), steps=5, success=1), "success"),
        (lambda b: b.add(entry(), steps=5, task=None), "task"),
        (lambda b: b.add(entry(), steps=5, task=0.5), "task"),
        (lambda b: b.add(entry(), steps=5, task=torch.zeros(2)), "task"),
        (lambda b: b.add(None, steps=5), "trajectory"),
        (lambda b: b.add_batch({"obs": torch.zeros(2, 3)}, success=[1, 0], steps=[3, 4]),
         "success[0]"),
        (lambda b: b.add_batch({"obs": torch.zeros(2, 3)}, success=[True, False], steps=[3.5, 4]),
         "steps[0]"),
        (lambda b: b.add_batch({"obs": torch.zeros(2, 3)}, success=torch.ones(2),
                               steps=[3, 4]), "success"),
        (lambda b: b.add_batch({"obs": torch.zeros(2, 3)}, success=[True, True],
                               steps=torch.ones(2)), "steps"),
        (lambda b: b.gather([0.5]), "indices"),
        (lambda b: b.gather([-1]), "indices"),
        (lambda b: b.gather([7]), "indices"),
        (lambda b: b.gather(torch.tensor([0.0])), "indices"),
        (lambda b: b.sample(0), "batch_size"),
        (lambda b: b.load_state_dict({**b.state_dict(), "counter": NAN}), "state['counter']"),
        (lambda b: b.load_state_dict({**b.state_dict(), "counter": 0}), "state['counter']"),
        (lambda b: b.load_state_dict({**b.state_dict(), "info": [(True, NAN, 0, 0)]}),
         "state['info'][0].steps"),
        (lambda b: b.load_state_dict({**b.state_dict(), "info": [(True, -3, 0, 0)]}),
         "state['info'][0].steps"),
        (lambda b: b.load_state_dict({**b.state_dict(), "info": [None]}), "state['info'][0]"),
        (lambda b: b.load_state_dict([]), "state"),
    ],
)
def test_success_buffer_bad_input_is_named(call, arg):
    buf = cm.selfbc.SuccessBuffer(capacity=4)
    buf.add(entry(), steps=5)
    with pytest.raises((ValueError, TypeError), match=f"`{re.escape(arg)}`"):
        call(buf)
    assert len(buf) == 1 and buf.info[0].steps == 5  # a refused call leaves the buffer as it was


@pytest.mark.parametrize("policy", [cm.selfbc.AdmitSuccessful(), cm.selfbc.EvictSlowest(), cm.selfbc.EvictOldest()])
@pytest.mark.parametrize(
    ("args", "arg"),
    [
        ((None, []), "candidate"),
        ((cm.selfbc.EntryInfo(True, 1, 0, 0), None), "entries"),
        ((cm.selfbc.EntryInfo(True, 1, 0, 0), [None]), "entries[0]"),
        ((cm.selfbc.EntryInfo("yes", 1, 0, 0), []), "candidate.success"),
        ((cm.selfbc.EntryInfo(True, 1.5, 0, 0), []), "candidate.steps"),
    ],
)
def test_buffer_policies_name_bad_arguments(policy, args, arg):
    extra = (4,) if isinstance(policy, cm.selfbc.AdmitSuccessful) else ()
    with pytest.raises(TypeError, match=f"`{re.escape(arg)}`"):
        policy(*args, *extra)


@pytest.mark.parametrize(
    ("rule", "state", "arg"),
    [
        (cm.selfbc.SuccessRateBCWeight(), {"average": NAN, "steps": 0}, "state['average']"),
        (cm.selfbc.SuccessRateBCWeight(), {"average": 1.5, "steps": 0}, "state['average']"),
        (cm.selfbc.SuccessRateBCWeight(), {"average": 0.5, "steps": -1}, "state['steps']"),
        (cm.selfbc.SuccessRateBCWeight(), {"average": 0.5, "steps": 1.5}, "state['steps']"),
        (cm.selfbc.LossBalanceBCWeight(), {"ppo_average": NAN, "bc_average": 1.0, "steps": 1},
         "state['ppo_average']"),
        (cm.selfbc.LossBalanceBCWeight(), {"ppo_average": 1.0, "bc_average": -1.0, "steps": 1},
         "state['bc_average']"),
        (cm.selfbc.SuccessRateBCWeight(), [], "state"),
        (cm.selfbc.ProductBCWeight(cm.selfbc.ConstantBCWeight()), [], "state"),
    ],
)
def test_bc_weight_state_loaders_reject_bad_values(rule, state, arg):
    before = rule.state_dict()
    with pytest.raises((ValueError, TypeError), match=f"`{re.escape(arg)}`"):
        rule.load_state_dict(state)
    assert rule.state_dict() == before
