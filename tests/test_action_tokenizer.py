"""ActionTokenizer against a literal re-statement of OpenVLA's numpy action tokenizer."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from chunkmask import ActionTokenizer

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class OpenVLAReference:
    """OpenVLA's `prismatic/vla/action_tokenizer.py` mapping, as numpy code, on ids not strings."""

    def __init__(self, bins=256, min_action=-1, max_action=1, vocab_size=32000):
        self.n_bins, self.min_action, self.max_action = bins, min_action, max_action
        self.bins = np.linspace(min_action, max_action, self.n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self.vocab_size = vocab_size

    def encode(self, action):
        action = np.clip(action, a_min=float(self.min_action), a_max=float(self.max_action))
        discretized_action = np.digitize(action, self.bins)
        return self.vocab_size - discretized_action

    def decode(self, action_token_ids):
        discretized_actions = self.vocab_size - action_token_ids
        discretized_actions = np.clip(
            discretized_actions - 1, a_min=0, a_max=self.bin_centers.shape[0] - 1
        )
        return self.bin_centers[discretized_actions]


REF = OpenVLAReference()
TOK = ActionTokenizer()

finite = st.floats(-3.0, 3.0, allow_nan=False, width=32)


def test_edges_and_centres_are_numpys_bit_for_bit():
    for n, low, high in [(256, -1.0, 1.0), (7, -0.3, 2.5), (2, 0.0, 1.0), (101, -1.0, 1.0)]:
        tok = ActionTokenizer(num_bins=n, vocab_size=1000, low=low, high=high)
        edges = np.linspace(low, high, n)
        assert np.array_equal(tok.bin_edges.numpy(), edges)
        assert np.array_equal(tok.bin_centres.numpy(), (edges[:-1] + edges[1:]) / 2.0)
    assert TOK.token_begin == 31744 and repr(TOK).startswith("ActionTokenizer(num_bins=256")


def test_every_edge_centre_and_midpoint_matches_openvla():
    edges = REF.bins
    probes = np.concatenate(
        [
            edges,
            np.nextafter(edges, -np.inf),
            np.nextafter(edges, np.inf),
            REF.bin_centers,
            [-5.0, -1.0000001, 1.0000001, 7.0, 0.0, -0.0],
        ]
    )
    for dtype in (np.float32, np.float64):
        x = probes.astype(dtype)
        ids = TOK.encode(torch.from_numpy(x))
        np.testing.assert_array_equal(ids.numpy(), REF.encode(x))
    all_ids = np.arange(31700, 32064)  # below the action range, the range, and the pad tokens
    np.testing.assert_array_equal(
        TOK.decode(torch.from_numpy(all_ids), dtype=torch.float64).numpy(), REF.decode(all_ids)
    )


@settings(deadline=None, max_examples=60)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 16)), elements=finite),
    st.sampled_from([(256, 32000, -1.0, 1.0), (16, 100, -2.0, 0.5), (3, 3, 0.0, 1.0)]),
)
def test_encode_decode_match_reference(actions, config):
    n, vocab, low, high = config
    ref = OpenVLAReference(n, low, high, vocab)
    tok = ActionTokenizer(n, vocab, low, high)
    ids = tok.encode(torch.from_numpy(actions))
    assert ids.dtype == torch.int64 and ids.shape == actions.shape
    np.testing.assert_array_equal(ids.numpy(), ref.encode(actions))
    np.testing.assert_array_equal(
        tok.decode(ids, dtype=torch.float64).numpy(), ref.decode(ids.numpy())
    )


@settings(deadline=None, max_examples=60)
@given(arrays(np.float32, st.integers(1, 64), elements=finite))
def test_round_trip_is_the_centre_of_the_bin_holding_the_action(actions):
    a = torch.from_numpy(actions)
    ids = TOK.encode(a)
    assert bool(((ids >= TOK.token_begin) & (ids < TOK.vocab_size)).all())
    back = TOK.decode(ids, dtype=torch.float64)
    clipped = a.double().clamp(-1.0, 1.0)
    edges = TOK.bin_edges
    # The bin [b_j, b_{j+1}) holding the clipped action (the last bin for a = high).
    j = torch.searchsorted(edges, clipped, right=True).clamp(1, 255) - 1
    torch.testing.assert_close(back, (edges[j] + edges[j + 1]) / 2, rtol=0, atol=0)
    assert bool(((back - clipped).abs() <= (edges[1] - edges[0]) / 2 + 1e-12).all())
    # Encoding the decoded action gives the same id back (except the merged top two ids).
    again = TOK.encode(back)
    same = (again == ids) | (ids == TOK.token_begin)
    assert bool(same.all())


@settings(deadline=None, max_examples=60)
@given(arrays(np.float32, st.integers(2, 64), elements=finite))
def test_monotone_and_clipping(actions):
    a, _ = torch.from_numpy(actions).sort()
    ids = TOK.encode(a)
    assert bool((ids[1:] <= ids[:-1]).all())  # larger action -> smaller (or equal) id
    back = TOK.decode(ids)
    assert bool((back[1:] >= back[:-1]).all())
    assert torch.equal(TOK.encode(a), TOK.encode(a.clamp(-1.0, 1.0)))
    assert bool((ids[a >= 1] == TOK.token_begin).all())
    assert bool((ids[a <= -1] == TOK.vocab_size - 1).all())


def test_extremes():
    ids = TOK.encode(torch.tensor([-1.0, 1.0, -9.0, 9.0]))
    assert ids.tolist() == [31999, 31744, 31999, 31744]
    back = TOK.decode(ids, dtype=torch.float64).tolist()
    assert back == [
        REF.bin_centers[0],
        REF.bin_centers[-1],
        REF.bin_centers[0],
        REF.bin_centers[-1],
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_dtypes_and_devices(dtype, device):
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(3, 8, 7, generator=g) * 2.4 - 1.2).to(dtype)
    ids = TOK.encode(a.to(device))
    assert ids.device.type == device
    np.testing.assert_array_equal(ids.cpu().numpy(), REF.encode(a.double().numpy()))
    out = TOK.decode(ids, dtype=dtype)
    assert out.dtype == dtype and out.device.type == device


@pytest.mark.parametrize("dtype", DTYPES)
def test_bin_logits_log_prob_entropy(dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 32064, generator=g, dtype=torch.float64)
    logits[..., 32000:] = 50.0  # pad tokens must never count
    logits[..., :31744] = 40.0  # nor text tokens
    x = logits.to(dtype)
    sliced = TOK.bin_logits(x)
    assert sliced.shape == (2, 5, 256) and sliced.dtype == dtype
    assert torch.equal(sliced, x[..., -256 - 64 : -64])
    ids = torch.randint(31744, 32000, (2, 5), generator=g)
    temperature = 1.6
    logp = TOK.log_prob(x, ids, temperature=temperature)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Reference: mask everything but the action tokens to -inf, softmax over the full vocabulary.
    masked = x.double().clone()
    masked[..., :31744] = -torch.inf
    masked[..., 32000:] = -torch.inf
    ref = torch.log_softmax(masked / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-5)
    ent = TOK.entropy(x, temperature=temperature)
    p = torch.softmax(masked / temperature, -1)
    ref_ent = -(p * torch.log_softmax(masked / temperature, -1).nan_to_num(0.0, 0.0, 0.0)).sum(-1)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)


def test_log_prob_gradient_reaches_only_action_logits():
    logits = torch.randn(4, 32064, requires_grad=True)
    ids = torch.tensor([31744, 31999, 31800, 31900])
    TOK.log_prob(logits, ids, temperature=1.6).sum().backward()
    assert logits.grad[:, :31744].abs().sum() == 0 and logits.grad[:, 32000:].abs().sum() == 0
    assert logits.grad[:, 31744:32000].abs().sum() > 0


def test_sample_matches_the_tempered_softmax():
    logits = torch.full((32064,), 30.0)  # text and pad tokens look likely but must never come out
    logits[31744:32000] = 0.0
    logits[31744 + 3] = 2.0
    logits[31744 + 200] = 1.0
    g = torch.Generator().manual_seed(0)
    draws = TOK.sample(logits.expand(40000, -1), temperature=1.6, generator=g)
    assert draws.dtype == torch.int64 and bool(((draws >= 31744) & (draws < 32000)).all())
    freq = torch.bincount(draws - 31744, minlength=256).double() / draws.numel()
    expected = torch.softmax(logits[31744:32000].double() / 1.6, -1)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    again = TOK.sample(logits.expand(10, -1), temperature=1.6, generator=g.manual_seed(5))
    assert torch.equal(
        again, TOK.sample(logits.expand(10, -1), temperature=1.6, generator=g.manual_seed(5))
    )


def test_bfloat16_logits_sample_and_score():
    logits = torch.randn(3, 56, 32064).to(torch.bfloat16)
    ids = TOK.sample(logits, temperature=1.6, generator=torch.Generator().manual_seed(0))
    logp = TOK.log_prob(logits, ids, temperature=1.6)
    assert logp.dtype == torch.float32 and bool((logp <= 0).all()) and bool(logp.isfinite().all())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_bins": 1}, ValueError, r"`num_bins` must be >= 2"),
        ({"num_bins": 2.0}, TypeError, r"`num_bins` must be an int"),
        ({"vocab_size": 100}, ValueError, r"`vocab_size` must be >= `num_bins` \(256\), got 100"),
        ({"vocab_size": True}, TypeError, r"`vocab_size` must be an int"),
        ({"low": 1.0, "high": 1.0}, ValueError, r"`high` must be > `low`"),
        ({"low": float("nan")}, ValueError, r"`low` must be finite"),
        ({"high": "1"}, TypeError, r"`high` must be a real number"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ActionTokenizer(**kwargs)


def test_bad_call_arguments():
    with pytest.raises(TypeError, match=r"`actions` must have a float dtype, got torch.int64"):
        TOK.encode(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"`actions` must be a torch.Tensor"):
        TOK.encode(np.zeros(3))
    with pytest.raises(ValueError, match=r"`actions` must be finite, got 1 NaN/Inf"):
        TOK.encode(torch.tensor([0.0, float("nan")]), validate_args=True)
    with pytest.raises(TypeError, match=r"`ids` must have an int dtype"):
        TOK.decode(torch.tensor([1.0]))
    with pytest.raises(TypeError, match=r"`dtype` must be a floating torch.dtype"):
        TOK.decode(torch.tensor([31999]), dtype=torch.int32)
    with pytest.raises(
        ValueError,
        match=r"`logits` must have a last size >= `vocab_size` \(32000\), got shape \(2, 256\)",
    ):
        TOK.bin_logits(torch.zeros(2, 256))
    with pytest.raises(TypeError, match=r"`logits` must have a float dtype"):
        TOK.bin_logits(torch.zeros(2, 32064, dtype=torch.int64))
    logits = torch.zeros(2, 32064)
    with pytest.raises(
        ValueError, match=r"`ids` must hold action-token ids in \[31744, 31999\], got \[32000\]"
    ):
        TOK.log_prob(logits, torch.tensor([31999, 32000]), validate_args=True)
    with pytest.raises(
        ValueError, match=r"`ids` must have the leading shape of `logits` \(2,\), got \(3,\)"
    ):
        TOK.log_prob(logits, torch.tensor([31999, 31999, 31999]))
    with pytest.raises(TypeError, match=r"`ids` must have an int dtype"):
        TOK.log_prob(logits, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"`temperature` must be > 0, got 0.0"):
        TOK.entropy(logits, temperature=0.0)
    with pytest.raises(TypeError, match=r"`temperature` must be a real number"):
        TOK.sample(logits, temperature=None)
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator"):
        TOK.sample(logits, generator=0)
