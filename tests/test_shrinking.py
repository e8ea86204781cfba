import dataclasses
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _reference.shrinking import shrink_reference, unshrink_reference
from chunkmask import Selection, shrink, unshrink

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@st.composite
def selections(draw):
    traj = draw(st.integers(1, 4))
    n = draw(st.integers(1, 7))
    bits = draw(st.lists(st.booleans(), min_size=traj * n, max_size=traj * n))
    chosen = torch.tensor(bits, dtype=torch.bool).reshape(traj, n)
    return Selection.from_mask(chosen), chosen


@settings(deadline=None, max_examples=60)
@given(
    selections(),
    st.integers(0, 2),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64]),
)
def test_shrink_and_unshrink_match_reference(sel_and_mask, extra_dims, dtype):
    sel, chosen = sel_and_mask
    traj, n = chosen.shape
    shape = (traj, n, *([2] * extra_dims))
    x = torch.arange(torch.Size(shape).numel()).reshape(shape).to(dtype)
    per_traj = torch.arange(traj).to(dtype)
    packed = shrink({"x": x, "a": per_traj}, sel)
    torch.testing.assert_close(packed["x"], shrink_reference(x, chosen))
    torch.testing.assert_close(packed["a"], shrink_reference(per_traj, chosen))
    back = unshrink(packed["x"], sel, fill=-7)
    torch.testing.assert_close(back, unshrink_reference(packed["x"], chosen, -7))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_flow_through_shrink_and_unshrink_and_skip_unselected(device):
    chosen = torch.tensor([[True, False, True], [False, True, False]], device=device)
    sel = Selection.from_mask(chosen)
    x = torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    packed = shrink(x, sel)
    weights = torch.randn_like(packed)
    (packed * weights).sum().backward()
    expected = unshrink(weights, sel)
    torch.testing.assert_close(x.grad, expected)
    assert (x.grad[~chosen] == 0).all()

    p = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    out = unshrink(p, sel, fill=5.0)
    out.sum().backward()
    torch.testing.assert_close(p.grad, torch.ones_like(p))
    assert torch.autograd.gradcheck(lambda t: shrink(t, sel), (x.detach().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda t: unshrink(t, sel), (p.detach().requires_grad_(),))


def test_nan_in_unselected_chunks_never_reaches_output_or_gradients():
    chosen = torch.tensor([[True, False], [False, True]])
    sel = Selection.from_mask(chosen)
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], requires_grad=True)
    packed = shrink(x, sel)
    assert packed.tolist() == [1.0, 2.0]
    packed.sum().backward()
    assert torch.isfinite(x.grad).all()


class Batch(NamedTuple):
    obs: torch.Tensor
    note: str


@dataclasses.dataclass
class Rollout:
    tokens: torch.Tensor
    meta: dict


def test_containers_keep_their_type_and_non_tensors_pass_through():
    chosen = torch.tensor([[True, True, False]])
    sel = Selection.from_mask(chosen)
    tree = {
        "nt": Batch(torch.arange(3.0).view(1, 3), "keep"),
        "dc": Rollout(torch.arange(6).view(1, 3, 2), {"n": 3, "t": torch.ones(1, 3)}),
        "lst": [torch.zeros(1, 3), None],
        "tup": (torch.ones(1),),
    }
    out = shrink(tree, sel)
    assert isinstance(out["nt"], Batch) and out["nt"].note == "keep"
    assert out["nt"].obs.tolist() == [0.0, 1.0]
    assert isinstance(out["dc"], Rollout) and out["dc"].tokens.tolist() == [[0, 1], [2, 3]]
    assert out["dc"].meta["n"] == 3 and out["dc"].meta["t"].tolist() == [1.0, 1.0]
    assert out["lst"][1] is None and out["lst"][0].shape == (2,)
    assert isinstance(out["tup"], tuple) and out["tup"][0].tolist() == [1.0, 1.0]


def test_expanded_advantages_and_explicit_size():
    valid = torch.ones(3, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, 2.0, 3.0])
    sel = Selection.from_mask(
        torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]]).bool(), valid
    )
    a = shrink(adv[:, None].expand_as(valid), sel, size=3)
    b = shrink(adv, sel, size=3, validate_args=False)
    assert a.tolist() == b.tolist() == [1.0, 1.0, 2.0]


def test_shrink_errors():
    sel = Selection.from_mask(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="`selection`.*Selection.*Tensor"):
        shrink(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"`tree\['obs'\]`.*\(2, 3, \.\.\.\).*\(2, 4\)"):
        shrink({"obs": torch.zeros(2, 4)}, sel)
    with pytest.raises(ValueError, match=r"`tree`.*\(3,\)"):
        shrink(torch.zeros(3), sel)
    with pytest.raises(ValueError, match="`size` must equal.*6, got 5"):
        shrink(torch.zeros(2, 3), sel, size=5, validate_args=True)
    with pytest.raises(ValueError, match="`size` must be >= 0"):
        shrink(torch.zeros(2, 3), sel, size=-1)
    with pytest.raises(ValueError, match=r"`tree\[0\]`.*6 packed items.*\(5,\)"):
        unshrink([torch.zeros(5)], sel, validate_args=True)
    with pytest.raises(ValueError, match="`tree`.*0-d"):
        unshrink(torch.tensor(1.0), sel)
    with pytest.raises(TypeError, match="`selection`"):
        unshrink(torch.zeros(6), None)


def test_shrink_compiles_fullgraph_with_static_size():
    sel = Selection.from_mask(torch.tensor([[True, False, True], [True, True, False]]))
    x = torch.randn(2, 3, 5)

    def fn(t, s):
        return shrink(t, s, size=4, validate_args=False)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, sel), fn(x, sel))
    xg = x.clone().requires_grad_()
    compiled(xg, sel).square().sum().backward()
    torch.testing.assert_close(xg.grad, unshrink(2 * fn(x, sel), sel))
