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


# ----------------------------------------------------------------------------- rows and cat


def _three_rows():
    return Selection.from_mask(
        torch.tensor([[True, False, True], [False, True, False], [True, True, True]]), k=3
    )


def test_rows_by_int_slice_mask_and_index_tensor():
    sel = _three_rows()
    for index, rows in (
        (1, [1]),
        (slice(0, 2), [0, 1]),
        (slice(None, None, 2), [0, 2]),
        (torch.tensor([True, False, True]), [0, 2]),
        (torch.tensor([2, 0, 2]), [2, 0, 2]),
        (torch.tensor([], dtype=torch.int64), []),
    ):
        sub = sel.rows(index)
        assert isinstance(sub, Selection)
        assert sub.indices.tolist() == [sel.indices[i].tolist() for i in rows]
        assert sub.mask.tolist() == [sel.mask[i].tolist() for i in rows]
        assert sub.num_chunks.tolist() == [sel.num_chunks[i].item() for i in rows]
        assert sub.k == sel.k and sub.chunks_total == sel.chunks_total
    # The tuple meaning of indexing is untouched: unpacking and sel[0] are the fields.
    indices, mask, num_chunks, chunks_total, inclusion = sel
    assert inclusion is None
    assert sel[0] is indices and chunks_total == 3


def test_rows_errors_name_the_argument():
    sel = _three_rows()
    with pytest.raises(ValueError, match=r"`index` must lie in \[0, 3\), got -1"):
        sel.rows(-1)
    with pytest.raises(ValueError, match=r"`index` must lie in \[0, 3\), got 3"):
        sel.rows(3)
    with pytest.raises(ValueError, match=r"`index` must hold rows in \[0, 3\), got values in \[-1, 1\]"):
        sel.rows(torch.tensor([-1, 1]), validate_args=True)
    with pytest.raises(ValueError, match=r"`index` must hold rows in \[0, 3\), got values in \[0, 5\]"):
        sel.rows(torch.tensor([0, 5]), validate_args=True)
    with pytest.raises(ValueError, match=r"`index` bool mask must have shape \(3,\).*\(2,\)"):
        sel.rows(torch.tensor([True, False]))
    with pytest.raises(TypeError, match=r"`index` must be an int.*got bool"):
        sel.rows(True)
    with pytest.raises(TypeError, match=r"`index` must be an int.*got float"):
        sel.rows(1.0)
    with pytest.raises(TypeError, match=r"`index` must have an int dtype"):
        sel.rows(torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"`index` slice step must be >= 1, got -1"):
        sel.rows(slice(None, None, -1))


def test_cat_is_the_union_batch():
    a = Selection.from_mask(torch.tensor([[True, False, True]]), k=2)
    b = Selection.from_mask(torch.tensor([[False, True, False], [True, True, False]]), k=2)
    both = Selection.cat([a, b])
    assert both.num_traj == 3 and both.k == 2 and both.chunks_total == 3
    assert torch.equal(both.chunk_mask(), torch.cat([a.chunk_mask(), b.chunk_mask()]))
    assert both.flat_index().tolist() == [0, 2, 4, 6, 7]
    # rows() inverts cat().
    assert torch.equal(both.rows(slice(1, 3)).indices, b.indices)
    assert Selection.cat((a,)).indices.tolist() == a.indices.tolist()


def test_cat_errors():
    a = Selection.from_mask(torch.tensor([[True, False, True]]), k=2)
    with pytest.raises(ValueError, match=r"`selections` must hold at least one"):
        Selection.cat([])
    with pytest.raises(TypeError, match=r"`selections` must be a list or tuple"):
        Selection.cat(a)
    with pytest.raises(TypeError, match=r"`selections\[1\]` must be a Selection, got Tensor"):
        Selection.cat([a, a.indices])
    with pytest.raises(ValueError, match=r"`selections\[1\]`.*\(k=2, chunks_total=3\), got k=3"):
        Selection.cat([a, Selection.from_mask(torch.ones(1, 3, dtype=torch.bool))])
    with pytest.raises(ValueError, match=r"`selections\[1\]`.*got k=2, chunks_total=4"):
        Selection.cat([a, Selection.from_mask(torch.zeros(1, 4, dtype=torch.bool), k=2)])


def test_helpers_reject_negative_sizes():
    sel = _three_rows()
    for method in (sel.packed_traj_index, sel.packed_slot_index, sel.flat_index):
        with pytest.raises(ValueError, match=r"`size` must be >= 0, got -1"):
            method(-1)
        with pytest.raises(TypeError, match=r"`size` must be an int, got float"):
            method(2.0)


def test_check_rejects_hand_built_selections():
    good = _three_rows()
    assert good.check() is good
    out_of_range = good._replace(indices=good.indices.masked_fill(good.mask, 7))
    with pytest.raises(ValueError, match=r"`selection.indices` must lie in \[0, 3\)"):
        out_of_range.check()
    negative = good._replace(indices=torch.where(good.mask, -1, 0))
    with pytest.raises(ValueError, match=r"`selection.indices` must lie in \[0, 3\)"):
        negative.check()
    holes = good._replace(mask=torch.tensor([[False, True, False]] * 3))
    with pytest.raises(ValueError, match=r"`selection.mask` must be a prefix"):
        holes.check()
    unsorted = good._replace(indices=good.indices.flip(1))
    with pytest.raises(ValueError, match=r"`selection.indices` must be strictly ascending"):
        unsorted.check()
    with pytest.raises(TypeError, match=r"`selection.indices` must have a torch.int64 dtype"):
        good._replace(indices=good.indices.int()).check()
    with pytest.raises(ValueError, match=r"`selection.mask` must have the shape"):
        good._replace(mask=good.mask[:, :2]).check()
    with pytest.raises(ValueError, match=r"`selection.num_chunks` must lie in \[0, 3\]"):
        good._replace(num_chunks=torch.tensor([4, 1, 3])).check()


def test_inclusion_field_is_kept_consistent_and_packed_in_shrink_order():
    from chunkmask import shrink

    valid = torch.tensor([[True, True, True, False], [True, True, False, False], [True] * 4])
    chosen = torch.tensor([[True, False, True, False], [False, True, False, False],
                           [True, True, False, True]])
    dense = torch.tensor([[0.5, 0.1, 0.25, 0.0], [0.3, 0.75, 0.0, 0.0], [0.2, 0.4, 0.6, 0.8]],
                         dtype=torch.float64)
    plain = Selection.from_mask(chosen, valid, k=3)
    assert plain.inclusion is None and plain.packed_inclusion() is None
    sel = plain.with_inclusion(dense)
    assert sel.inclusion.tolist() == [[0.5, 0.25, 1.0], [0.75, 1.0, 1.0], [0.2, 0.4, 0.8]]
    assert sel.check(values=True) is sel
    packed = sel.packed_inclusion()
    torch.testing.assert_close(packed, dense[chosen])
    torch.testing.assert_close(packed, shrink(dense, sel))  # the order shrink packs in
    torch.testing.assert_close(sel.packed_inclusion(size=6), packed)
    rows = sel.rows(torch.tensor([2, 0]))
    torch.testing.assert_close(rows.packed_inclusion(), torch.cat([dense[2][chosen[2]], dense[0][chosen[0]]]))
    assert sel.rows(1).inclusion.tolist() == [[0.75, 1.0, 1.0]]
    both = Selection.cat([sel, sel.rows(0)])
    torch.testing.assert_close(both.packed_inclusion(), torch.cat([packed, packed[:2]]))
    assert sel.with_inclusion(None).inclusion is None


def test_inclusion_field_errors_name_the_argument():
    sel = Selection.from_mask(torch.tensor([[True, False, True]]), k=2)
    with pytest.raises(TypeError, match=r"`inclusion` must have a float dtype"):
        sel.with_inclusion(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`inclusion` must have shape \(1, 3\)"):
        sel.with_inclusion(torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"`selection.inclusion` must have shape \(1, 2\)"):
        sel._replace(inclusion=torch.ones(1, 3)).check()
    bad = sel._replace(inclusion=torch.tensor([[0.0, 1.0]]))
    bad.check(values=False)  # metadata only: no value check without asking
    with pytest.raises(ValueError, match=r"`selection.inclusion` must lie in \(0, 1\] at selected"):
        bad.check(values=True)
    with pytest.raises(ValueError, match=r"`selection.inclusion` must lie in \(0, 1\].*got \[0.5\]"):
        flagged = Selection.from_mask(torch.tensor([[True, False, False]]), k=2)
        flagged._replace(inclusion=torch.tensor([[1.0, 0.5]])).check(values=True)
    with pytest.raises(ValueError, match=r"`selections\[1\]` must carry `inclusion` exactly when"):
        Selection.cat([sel.with_inclusion(torch.ones(1, 3)), sel])
