"""Two gloo processes with a shared PhaseScoreBuffer agree with one process on the union batch."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from _reference.scores import PhaseScoreBufferRef
from _spawn import run_workers
from chunkmask.pcm._score_buffer import PhaseScoreBuffer
from chunkmask.pcm._scores import success_failure_variance

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

NUM_PHASES = 4
STEPS = 7  # two refreshes at refresh_every=3, and a partial window
REFRESH = 3
WORLD = 2


def make_step(step):
    """A batch of 6 groups (whole groups) and its split between the two ranks."""
    rng = np.random.default_rng(1000 + step)
    n_groups, per_group, n_chunk = 6, 4, 5
    n_traj = n_groups * per_group
    group = np.repeat(rng.permutation(100)[:n_groups] * 7 - 300, per_group)
    features = rng.normal(size=(n_traj, n_chunk, 3)) * rng.uniform(0.1, 3.0, size=(1, 1, 3))
    phases = rng.integers(0, NUM_PHASES - 1, size=(n_traj, n_chunk))  # the last phase is absent
    success = rng.random(n_traj) < 0.5
    valid = rng.random((n_traj, n_chunk)) < 0.85
    rank = np.repeat(np.arange(n_groups) % WORLD, per_group)  # each group lives on one rank
    rank[: per_group * 2] = 0  # uneven split: rank 0 holds more groups
    batch = dict(
        features=torch.from_numpy(features),
        phases=torch.from_numpy(phases),
        success=torch.from_numpy(success),
        group=torch.from_numpy(group),
        valid=torch.from_numpy(valid),
    )
    return batch, torch.from_numpy(rank)


def variance(batch):
    return success_failure_variance(
        batch["features"],
        batch["phases"],
        batch["success"],
        batch["group"],
        num_phases=NUM_PHASES,
        valid=batch["valid"],
    )


def _worker(rank, world):
    group = dist.new_group(backend="gloo")
    weighted = PhaseScoreBuffer(NUM_PHASES, refresh_every=REFRESH, process_group=group)
    plain = PhaseScoreBuffer(NUM_PHASES, refresh_every=REFRESH, process_group=group)
    out_weighted, out_plain = [], []
    for step in range(STEPS):
        batch, owner = make_step(step)
        mine = owner == rank
        local = variance({k: v[mine] for k, v in batch.items()})
        weight = local.group_defined.sum(0).to(torch.float64)
        out_weighted.append(weighted.update(local.scores, local.defined, weight=weight))
        out_plain.append(plain.update(local.scores, local.defined))
    return {
        "weighted": torch.stack(out_weighted),
        "plain": torch.stack(out_plain),
        "state": weighted.state_dict(),
    }


def test_process_group_buffer_equals_union_batch(tmp_path):
    results = run_workers(_worker, WORLD, tmp_path)

    single = PhaseScoreBuffer(NUM_PHASES, refresh_every=REFRESH)
    ref = PhaseScoreBufferRef(NUM_PHASES, REFRESH)
    expected_weighted, expected_plain = [], []
    for step in range(STEPS):
        batch, owner = make_step(step)
        union = variance(batch)
        expected_weighted.append(single.update(union.scores, union.defined))
        parts = []
        for r in range(WORLD):
            local = variance({k: v[owner == r] for k, v in batch.items()})
            parts.append((local.scores.double().numpy(), local.defined.numpy(), None))
        expected_plain.append(torch.from_numpy(ref.update(parts)).float())
    expected_weighted = torch.stack(expected_weighted)
    expected_plain = torch.stack(expected_plain)

    # The keep probabilities move over the run (initialisation and two refreshes).
    assert not torch.equal(expected_weighted[0], expected_weighted[-1])
    # Group-count weights matter: the plain rank mean is a different (documented) combination.
    assert not torch.allclose(expected_weighted, expected_plain)
    for res in results:
        torch.testing.assert_close(res["weighted"], expected_weighted)
        torch.testing.assert_close(res["plain"], expected_plain)
    # Every rank holds the identical state.
    for key, value in results[0]["state"].items():
        other = results[1]["state"][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    state = single.state_dict()
    torch.testing.assert_close(results[0]["state"]["window_sum"], state["window_sum"])
    assert results[0]["state"]["num_updates"] == STEPS
