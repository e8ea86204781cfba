"""chunkmask.pipeline on a local Ray instance: runs, recovers from a killed worker, bounds staleness,
never serves torn weights, and shuts down cleanly. One Ray start for the module (a few seconds)."""

import copy
import os
import pathlib
import tempfile
import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("gymnasium")  # the testbed extra

from chunkmask.pipeline import (  # noqa: E402
    AsyncPipeline,
    InferenceServer,
    PipelineConfig,
    PipelineTimeoutError,
    TrajectoryGroup,
    collate_groups,
    decoupled_grpo_update,
    make_masker,
    ray_session,
    stage_busy_time,
)
from chunkmask.testbed import (  # noqa: E402
    PickPlaceConfig,
    PickPlaceVectorEnv,
    obs_layout,
    pickplace_env_fn,
    pickplace_max_chunks,
    pickplace_policy_fn,
    pickplace_reset_options,
    rollout,
    sample_initial_states,
)

ENV = PickPlaceConfig(max_steps=32)  # 4 chunks of 8 steps
POLICY = {"d_model": 16, "depth": 1, "heads": 2}
SHARD = 4


def _cfg(**kw):
    base = dict(
        mode="full-async",
        envs_per_worker=SHARD,
        group_size=2,
        trajectories_per_update=2 * SHARD,
        max_chunks=pickplace_max_chunks(ENV),
        lr=1e-3,
        rpc_timeout_s=60.0,
        stall_timeout_s=60.0,
    )
    base.update(kw)
    return PipelineConfig(**base)


def _pipeline(cfg):
    return AsyncPipeline(
        pickplace_env_fn(ENV),
        pickplace_policy_fn(ENV, **POLICY),
        cfg,
        reset_options=pickplace_reset_options(cfg.group_size, ENV),
    )


@pytest.fixture(scope="module")
def ray_dir():
    tmp = tempfile.mkdtemp(prefix="cmt")
    with ray_session(temp_dir=tmp, num_cpus=2):
        yield tmp


@pytest.fixture(scope="module")
def pipe(ray_dir):
    p = _pipeline(_cfg(snapshot_every=1))
    yield p
    p.close()


def _busy(traces, prefix):
    return [iv for lane, ivs in traces.items() if lane.startswith(prefix) for iv in ivs]


def test_full_async_pipeline_runs(pipe):
    res = pipe.run(3)
    assert [r["version"] for r in res.records] == [1, 2, 3]
    for r in res.records:
        assert r["served_version"] == r["version"]  # published before the learner reports it
        assert r["trajectories"] == 2 * SHARD
        assert r["kept"] + r["stale_dropped"] == r["trajectories"]
        assert r["staleness_max"] <= pipe.config.max_staleness == 1
        assert r["stepped"]
    assert res.counters["tasks_completed"] >= 6
    assert res.counters["dropped_in_flight"] == 0
    assert res.throughput["env_steps_per_s"] > 0 and res.throughput["updates_per_s"] > 0
    assert pipe.server_stats()["version"] == 3
    lanes = pipe.traces()
    assert {"env0", "env1", "rollout", "update", "publish"} <= set(lanes)
    snaps = pipe.snapshots()
    assert [v for v, _, _ in snaps] == [0, 1, 2, 3]
    assert set(snaps[-1][2]) == set(snaps[0][2])


def test_killed_env_worker_is_restarted_and_only_in_flight_work_is_lost(pipe):
    before = dict(pipe.counters)
    killed = []

    def on_update(record):
        if not killed:
            tasks = [t for w, t in pipe.running_tasks() if w == 0]
            if tasks:
                ray.kill(pipe.env_workers[0], no_restart=False)
                killed.append((tasks[0], time.time()))

    res = pipe.run(4, on_update=on_update)
    assert killed, "worker 0 never had a task in flight to kill"
    assert len(res.records) == 4 and res.version == pipe.version
    assert res.counters["worker_failures"] == before["worker_failures"] + 1
    assert res.counters["dropped_in_flight"] == before["dropped_in_flight"] + SHARD
    killed_task, t_kill = killed[0]
    log = {task: outcome for task, _, outcome in pipe.task_log}
    assert log[killed_task] == "dropped"
    consumed = [t for r in res.records for t in r["task_ids"]]
    assert killed_task not in consumed
    # Every task queued before the kill reaches the learner: nothing collected is lost.
    queued_before = [t for t, _, o in pipe.task_log if o == "queued" and t < killed_task]
    all_consumed = set(consumed) | set(range(min(consumed)))
    assert set(queued_before) <= all_consumed
    # The restarted worker comes back and takes new work.
    deadline = time.time() + 120
    while True:
        try:
            assert ray.get(pipe.env_workers[0].ping.remote(), timeout=60) == "env0"
            break
        except ray.exceptions.ActorUnavailableError:  # still restarting
            assert time.time() < deadline, "the killed worker did not come back"
            time.sleep(0.2)
    pipe.run(3)
    assert any(w == 0 and o == "queued" and t > killed_task for t, w, o in pipe.task_log)
    assert any(a > t_kill for a, _ in pipe.traces().get("env0", []))


def test_sync_mode_has_zero_staleness_and_never_overlaps_update_and_rollout(pipe):
    state = pipe.snapshots()[0][2]
    pipe.reset(_cfg(mode="sync"), policy_state=state)  # same actors, fresh run at version 0
    assert pipe.version == 0 and pipe.server_stats()["version"] == 0
    assert pipe.config.max_staleness == 0
    res = pipe.run(3)
    traces = pipe.traces()
    assert ray.is_initialized()  # the pipeline attached to the running instance
    assert [r["version"] for r in res.records] == [1, 2, 3]
    for r in res.records:
        assert r["staleness_max"] == 0 and r["stale_dropped"] == 0
        assert r["capped_frac"] == 0.0
        assert abs(r["behaviour_weight_mean"] - 1.0) < 1e-3  # pi_behav == pi_prox
    updates = traces["update"]
    rollouts = _busy(traces, "env") + traces["rollout"]
    for a, b in updates:
        assert stage_busy_time(rollouts, a, b) == 0.0
    with pytest.raises(ValueError, match=r"`config.envs_per_worker` must stay 4"):
        pipe.reset(_cfg(envs_per_worker=8, trajectories_per_update=16))


def test_no_rollout_sees_torn_weights(ray_dir):
    cfg = _cfg(fingerprint_weights=True, max_batch=64, batch_timeout_s=0.001).resolved()
    policy_fn = pickplace_policy_fn(ENV, **POLICY)
    template = policy_fn().state_dict()

    def weights(v):  # every weight of version v equals v: a mixed model shows min != max
        return {k: torch.full_like(t, float(v)) for k, t in template.items()}

    server = (
        ray.remote(InferenceServer)
        .options(num_cpus=0, max_concurrency=1000)
        .remote(policy_fn, weights(0), 0, cfg)
    )
    try:
        ray.get([server.open_stream.remote(s) for s in (1, 2)], timeout=60)
        obs = torch.zeros(SHARD, obs_layout(ENV.num_objects).dim)
        refs = []
        for v in range(1, 9):
            refs += [server.infer.remote(s, obs) for s in (1, 2) for _ in range(4)]
            refs.append(server.set_weights.remote(v, weights(v)))
        replies = [r for r in ray.get(refs, timeout=60) if isinstance(r, dict)]
    finally:
        ray.kill(server)
    assert len(replies) == 64
    for r in replies:
        low, high = r["fingerprint"]
        assert low == high == r["version"]
    assert len({r["version"] for r in replies}) > 1


def _group(seed=0, n=4, versions=0):
    torch.manual_seed(seed)
    policy = pickplace_policy_fn(ENV, **POLICY)()
    states = sample_initial_states(n // 2, config=ENV, generator=torch.Generator().manual_seed(seed))
    batch = rollout(
        policy,
        PickPlaceVectorEnv(n, ENV),
        states.repeat_interleave(2),
        generator=torch.Generator().manual_seed(seed),
    )
    success = torch.arange(n) % 2 == 0  # mixed outcomes in every group: non-zero advantages
    return policy, TrajectoryGroup(
        obs=batch.obs,
        tokens=batch.tokens,
        logp=batch.logp,
        actions=batch.actions,
        valid=batch.valid,
        versions=torch.where(batch.valid, torch.as_tensor(versions).expand(n)[:, None], 0),
        returns=success.float(),
        success=success,
        steps=batch.steps,
        group=torch.arange(n) // 2,
        task_id=torch.tensor(seed),
    )


@pytest.mark.parametrize("selector", ["full", "pcm"])
def test_learner_update_is_deterministic(selector):
    cfg = _cfg(selector=selector, budget=2).resolved()
    policy, group = _group()
    batch = collate_groups([group, group._replace(task_id=torch.tensor(1))])
    outs = []
    for _ in range(2):
        p = copy.deepcopy(policy)
        opt = torch.optim.AdamW(p.parameters(), lr=cfg.lr)
        stats = decoupled_grpo_update(
            p, opt, batch, version=0, config=cfg, masker=make_masker(cfg)
        )
        outs.append((stats, p.state_dict()))
    (s1, w1), (s2, w2) = outs
    assert s1 == s2 and s1["stepped"] and s1["grad_norm"] > 0
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w1[k], policy.state_dict()[k]) for k in w1)
    if selector == "pcm":
        assert s1["chunks_updated"] <= 2 * batch.valid.shape[0]


def test_learner_drops_and_counts_stale_trajectories():
    cfg = _cfg(max_staleness=1).resolved()
    policy, fresh = _group(versions=3)
    _, old = _group(seed=1, versions=1)
    batch = collate_groups([fresh, old])
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    stats = decoupled_grpo_update(policy, opt, batch, version=4, config=cfg)
    assert stats["stale_dropped"] == 4 and stats["kept"] == 4
    assert stats["staleness_max"] == 1 and stats["staleness_mean"] == 1.0
    stats = decoupled_grpo_update(policy, opt, collate_groups([old]), version=4, config=cfg)
    assert stats["stale_dropped"] == 4 and not stats["stepped"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "async"}, r"`mode` must be one of"),
        ({"selector": "random"}, r"`selector` must be one of"),
        ({"envs_per_worker": 3}, r"`envs_per_worker` must be a multiple of `group_size` \(2\), got 3"),
        ({"trajectories_per_update": 6}, r"`trajectories_per_update` must be a multiple"),
        ({"mode": "sync", "max_staleness": 1}, r"`max_staleness` must be 0"),
        ({"queue_capacity": 1}, r"`queue_capacity` must hold at least one update's tasks \(2\)"),
        ({"rpc_timeout_s": 0}, r"`rpc_timeout_s` must lie in \(0.0, inf\)"),
        ({"num_env_workers": 0}, r"`num_env_workers` must be > 0, got 0"),
    ],
)
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kwargs)


def test_config_type_errors():
    with pytest.raises(TypeError, match=r"`num_env_workers` must be an int"):
        _cfg(num_env_workers=2.0)
    with pytest.raises(TypeError, match=r"`config` must be a PipelineConfig"):
        AsyncPipeline(pickplace_env_fn(ENV), pickplace_policy_fn(ENV), {"mode": "sync"})


def test_ray_session_rejects_relative_temp_dir():
    with pytest.raises(ValueError, match=r"`temp_dir` must be an absolute path"):
        with ray_session(temp_dir="relative/dir"):
            pass


def test_learner_timeout_is_a_clear_error(pipe):
    pipe.reset(_cfg(rpc_timeout_s=2.0))
    # Nothing is dispatched: the learner waits on an empty queue and says so.
    ref = pipe.learner.train_step.remote()
    with pytest.raises(ray.exceptions.RayTaskError, match="waited 2 s for a finished task"):
        ray.get(ref, timeout=60)
    assert issubclass(PipelineTimeoutError, TimeoutError)


def _processes_mentioning(text):
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((proc.name, cmdline.replace("\0", " ")[:120]))
    return found


def test_zz_shutdown_leaves_no_processes(pipe, ray_dir):
    assert _processes_mentioning(ray_dir), "expected Ray's processes to use the temp dir"
    pipe.close()
    ray.shutdown()
    deadline = time.time() + 20
    while _processes_mentioning(ray_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(ray_dir) == []
