import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkmask import Selection


@st.composite
def masks(draw):
    traj = draw(st.integers(1, 5))
    n = draw(st.integers(1, 9))
    bits = draw(st.lists(st.booleans(), min_size=traj * n, max_size=traj * n))
    return torch.tensor(bits, dtype=torch.bool).reshape(traj, n)


@settings(deadline=None, max_examples=60)
@given(masks())
def test_from_mask_round_trips_and_orders_packed_items(mask):
    sel = Selection.from_mask(mask)
    assert sel.indices.shape == mask.shape
    assert torch.equal(sel.chunk_mask(), mask)
    assert torch.equal(sel.counts, mask.sum(1))
    # Each row of the slot mask is a prefix of Trues; valid slots ascend; flagged slots hold 0.
    for i in range(mask.shape[0]):
        c = int(mask[i].sum())
        assert sel.mask[i, :c].all() and not sel.mask[i, c:].any()
        assert torch.equal(sel.indices[i, :c], torch.nonzero(mask[i]).flatten())
        assert (sel.indices[i, c:] == 0).all()
    expected = [
        i * mask.shape[1] + t
        for i in range(mask.shape[0])
        for t in range(mask.shape[1])
        if mask[i, t]
    ]
    assert sel.flat_index().tolist() == expected
    assert sel.packed_traj_index().tolist() == [e // mask.shape[1] for e in expected]
    assert sel.num_selected() == len(expected)


def test_from_mask_with_valid_counts_available_chunks_and_extra_slots():
    chosen = torch.tensor([[True, False, False, False], [False, False, True, False]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    sel = Selection.from_mask(chosen, valid, k=6)
    assert sel.num_chunks.tolist() == [3, 4]
    assert sel.k == 6 and sel.chunks_total == 4
    assert sel.indices.tolist() == [[0, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0]]
    assert sel.mask.sum().item() == 2


def test_packed_index_with_explicit_size_needs_no_mask_read():
    sel = Selection.from_mask(torch.tensor([[True, True], [False, True]]))
    assert sel.packed_traj_index(size=3).tolist() == [0, 0, 1]
    assert sel.flat_index(size=3).tolist() == [0, 1, 3]


def test_empty_selection():
    sel = Selection.from_mask(torch.zeros(2, 3, dtype=torch.bool))
    assert sel.num_selected() == 0
    assert sel.flat_index().shape == (0,)
    assert not sel.chunk_mask().any()


def test_from_mask_errors():
    with pytest.raises(TypeError, match="`mask`.*bool"):
        Selection.from_mask(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`mask`.*2 dimensions.*\\(3,\\)"):
        Selection.from_mask(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`valid`.*\\(2, 3\\).*\\(2, 4\\)"):
        Selection.from_mask(torch.zeros(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="`mask` must select only valid chunks, got 1 outside `valid`"):
        Selection.from_mask(torch.tensor([[True, True, False]]), torch.tensor([[True, False, False]]))
    with pytest.raises(ValueError, match="`k`.*largest row count 3.*got 2"):
        Selection.from_mask(torch.ones(2, 3, dtype=torch.bool), k=2)
    with pytest.raises(ValueError, match="`k` must be > 0"):
        Selection.from_mask(torch.ones(2, 3, dtype=torch.bool), k=0)
