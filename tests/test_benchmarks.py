"""Smoke tests: each benchmark runs at a tiny size and writes the documented JSON schema.

No timing is asserted; the FLOP and saved-byte ratios are checked because they are exact
properties of the per-chunk policy stand-in, not measurements of the machine.
"""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from chunkmask import Selection

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name):
        return importlib.import_module(name)

    return load


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


RECORD_FIELDS = {
    "selector": str,
    "budget": int,
    "chunks_total": int,
    "chunks_selected": int,
    "micro_batches": int,
    "update_time_s": float,
    "update_time_iqr_s": float,
    "update_time_min_s": float,
    "speedup_best": float,
    "selection_time_s": float,
    "speedup": float,
    "limit": float,
    "fraction_of_limit": float,
    "update_cpu_time_s": float,
    "speedup_cpu": float,
    "fraction_of_limit_cpu": float,
    "saved_bytes": int,
    "saved_ratio": float,
    "peak_saved_bytes": int,
    "peak_saved_ratio": float,
    "flops": int,
    "flops_ratio": float,
    "flops_limit": float,
}


def test_backward_savings_tiny(bench, tmp_path, capsys):
    backward_savings = bench("backward_savings")
    out = tmp_path / "bs.json"
    result = backward_savings.main(["--preset", "tiny", "--repeats", "1", "--out", str(out)])
    assert "speedup" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["meta"]["torch_version"] == torch.__version__
    for key in ("device", "threads", "preset", "config", "date"):
        assert key in data["meta"]
    records = data["records"]
    assert [(r["selector"], r["budget"]) for r in records] == [
        ("full", 8),
        ("pcm", 2),
        ("pcm", 4),
        ("mask-only", 4),
    ]
    for r in records:
        for field, kind in RECORD_FIELDS.items():
            assert isinstance(r[field], kind), (field, r[field])
        assert r["chunks_total"] == 8
        assert r["update_time_s"] > 0
        assert r["cuda_peak_bytes"] is None  # CPU run
    full = records[0]
    assert full["speedup"] == 1.0 and full["saved_ratio"] == 1.0 and full["flops_ratio"] == 1.0
    assert full["chunks_selected"] == 20 * 8
    for r in records[1:3]:  # PCM: compute and activations shrink to B / N exactly
        assert r["chunks_selected"] == 20 * r["budget"]
        assert r["limit"] == 8 / r["budget"]
        assert r["flops_ratio"] == pytest.approx(r["budget"] / 8, rel=1e-6)
        assert r["saved_ratio"] == pytest.approx(r["budget"] / 8, rel=0.02)
        assert r["micro_batches"] < full["micro_batches"]
    mask_only = records[3]  # nothing shrinks
    assert mask_only["chunks_selected"] == full["chunks_selected"]
    assert mask_only["flops_ratio"] == pytest.approx(1.0)
    assert mask_only["saved_ratio"] == pytest.approx(1.0, rel=0.02)
    assert result["records"] == records


def test_backward_savings_lora_tiny(bench, capsys):
    backward_savings = bench("backward_savings")
    result = backward_savings.main(
        [
            "--preset",
            "tiny",
            "--repeats",
            "1",
            "--lora",
            "--lora-rank",
            "2",
            "--budgets",
            "4",
            "--no-mask-only",
        ]
    )
    meta = result["meta"]
    assert meta["lora"] and meta["trainable_parameters"] < meta["parameters"]
    assert [r["selector"] for r in result["records"]] == ["full", "pcm"]
    assert result["records"][1]["flops_ratio"] == pytest.approx(0.5, rel=1e-6)


def test_plan_micro_batches(bench):
    plan = bench("_harness").plan_micro_batches
    assert plan([4, 4, 4], 8) == [(0, 2, 0, 8), (2, 3, 8, 12)]
    assert plan([3, 3, 3], 8) == [(0, 2, 0, 6), (2, 3, 6, 9)]
    assert plan([10, 2], 8) == [(0, 1, 0, 10), (1, 2, 10, 12)]  # an oversized trajectory alone
    assert plan([2, 2], 100) == [(0, 2, 0, 4)]


def test_micro_batched_gradient_equals_one_batch(bench):
    harness = bench("_harness")
    cfg = harness.get_config("tiny")
    setup = harness.Setup(cfg, device=torch.device("cpu"), dtype="float32", seed=0)
    _, select_and_shrink = setup.pcm_update_fn(3)
    batch, selection, counts = select_and_shrink()
    grads = []
    for micro in (6, 10_000):
        setup.policy.zero_grad(set_to_none=True)
        trainer = harness.ActorTrainer(setup.policy, micro_batch_chunks=micro)
        assert trainer.accumulate(batch, selection, counts) == (10 if micro == 6 else 1)
        grads.append([p.grad.clone() for p in setup.policy.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mask_only_baseline_has_the_same_gradient_as_shrinking(bench):
    # The mask-only baseline optimises the same objective as PCM; only its cost differs.
    harness = bench("_harness")
    cfg = harness.get_config("tiny")
    setup = harness.Setup(cfg, device=torch.device("cpu"), dtype="float32", seed=1)
    _, select_and_shrink = setup.pcm_update_fn(3)
    batch, selection, counts = select_and_shrink()
    token_mask = selection.chunk_mask().reshape(-1, 1).expand(-1, cfg.tokens_per_chunk)
    full = Selection.from_mask(setup.data["valid"])
    trainer = harness.ActorTrainer(setup.policy, micro_batch_chunks=16)
    grads = []
    for args in ((batch, selection, counts), (setup.full_batch, full, full.counts.tolist())):
        setup.policy.zero_grad(set_to_none=True)
        mask = token_mask if args[0] is setup.full_batch else None
        trainer.accumulate(*args, mask=mask)
        grads.append([p.grad.clone() for p in setup.policy.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_selection_overhead_tiny(bench, tmp_path, capsys):
    selection_overhead = bench("selection_overhead")
    out = tmp_path / "so.json"
    selection_overhead.main(
        [
            "--preset",
            "tiny",
            "--no-compile",
            "--repeats",
            "1",
            "--min-run-time",
            "0",
            "--out",
            str(out),
        ]
    )
    assert "sampler" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["full_update_time_s"] > 0
    stages = [r["stage"] for r in data["stages"]]
    assert stages == [
        "phase_labelling",
        "variance",
        "buffer_update",
        "keep_probabilities",
        "chunk_weights",
        "sampling",
        "shrink",
        "sum_of_stages",
        "total_select_and_shrink",
    ]
    for r in data["stages"]:
        assert r["time_s"] > 0
        assert r["fraction_of_update"] == pytest.approx(r["time_s"] / data["full_update_time_s"])
        assert r["budget"] == 4 and r["chunks_total"] == 8
    methods = [r["method"] for r in data["samplers"]]
    assert methods[:5] == [
        "plackett_luce_sample",
        "plackett_luce_sample(validate_args=False)",
        "torch.multinomial",
        "torch.multinomial + sort",
        "numpy Generator.choice loop",
    ]
    for r in data["samplers"]:
        assert r["time_s"] > 0 and r["relative_to_multinomial"] > 0


def test_plot(bench, tmp_path):
    pytest.importorskip("matplotlib")
    plot = bench("plot_benchmarks")
    backward_savings = bench("backward_savings")
    src = tmp_path / "bs.json"
    backward_savings.main(
        [
            "--preset",
            "tiny",
            "--repeats",
            "1",
            "--out",
            str(src),
            "--no-mask-only",
            "--budgets",
            "4",
        ]
    )
    overhead = tmp_path / "so.json"
    bench("selection_overhead").main(
        [
            "--preset",
            "tiny",
            "--no-compile",
            "--min-run-time",
            "0",
            "--update-json",
            str(src),
            "--out",
            str(overhead),
        ]
    )
    data = json.loads(overhead.read_text())
    assert data["full_update_source"] == "from bs.json"
    full = json.loads(src.read_text())["records"][0]
    assert data["full_update_time_s"] == full["update_time_s"]
    png = tmp_path / "plot.png"
    plot.main([str(src), str(overhead), "--markdown", "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reproduce_pcm_quick_writes_report_and_resumes(bench, tmp_path):
    pytest.importorskip("gymnasium")
    pytest.importorskip("matplotlib")
    reproduce = bench("reproduce_pcm")
    out, docs, res = tmp_path / "runs", tmp_path / "docs", tmp_path / "res" / "pilot.json"
    args = ["--quick", "--seeds", "0", "--out", str(out), "--docs", str(docs), "--results", str(res)]
    assert reproduce.main(args) == 0
    result = json.loads(res.read_text())
    assert result["seeds_complete"] == [0]
    names = [r["run"] for r in result["table"]]
    assert names == [name for name, *_ in reproduce.RUNS]
    for key in ("speedup_to_threshold", "final_success_gap_pp"):
        assert set(result[key]) == {"mean", "per_seed"}
    report = (docs / "reproduction_pilot.md").read_text()
    assert "| grpo |" in report and "| pcm_ht |" in report
    for name in ("success_vs_step", "success_vs_wallclock", "phase_allocation"):
        assert (docs / "img" / f"testbed_repro_{name}.png").stat().st_size > 0
    # Every run finished: a second call resumes, trains nothing and keeps the logs.
    logs = {p.name: p.read_text() for p in out.glob("*.jsonl")}
    assert len(logs) == len(reproduce.RUNS)
    assert reproduce.main(args) == 0
    assert {p.name: p.read_text() for p in out.glob("*.jsonl")} == logs


def test_reproduce_pcm_rejects_unknown_run_names(bench, tmp_path, capsys):
    pytest.importorskip("gymnasium")
    reproduce = bench("reproduce_pcm")
    with pytest.raises(SystemExit):
        reproduce.main(["--quick", "--out", str(tmp_path), "--only", "pcm", "pmc"])
    assert "--only: unknown run names ['pmc']" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.jsonl"))


def test_phase_weights_quick_runs(bench, tmp_path):
    pytest.importorskip("gymnasium")
    weights = bench("phase_weights")
    out = tmp_path / "w.json"
    args = ["--quick", "--prompts", "2", "--group-size", "3", "--budget", "2", "--out", str(out)]
    assert weights.main(args) == 0
    result = json.loads(out.read_text())
    assert [r["phase"] for r in result["phases"]] == [
        "approach",
        "pre_grasp",
        "active_grip",
        "release_ramp",
        "tail",
    ]


def test_phase_weights_match_a_loop_reference(bench):
    pytest.importorskip("gymnasium")
    weights = bench("phase_weights")
    gen = torch.Generator().manual_seed(0)
    n, chunks = 8, 6
    lengths = torch.tensor([6, 3, 5, 1, 6, 4, 2, 6])
    valid = torch.arange(chunks) < lengths[:, None]
    phases = torch.where(valid, torch.randint(0, 5, (n, chunks), generator=gen), -1)
    inclusion = torch.where(valid, torch.rand(n, chunks, generator=gen) + 0.05, 0.0)
    success = torch.tensor([1, 0, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    rows = weights.weights_by_phase(phases, valid, inclusion, success, group)
    r = success.double()
    adv = torch.zeros(n, dtype=torch.float64)
    for g in (0, 1):
        m = group == g
        adv[m] = (r[m] - r[m].mean()) / (r[m].std() + 1e-6)
    for c, row in enumerate(rows):
        full = masked = 0.0
        for i in range(n):
            cs = [t for t in range(chunks) if valid[i, t]]
            k = sum(float(inclusion[i, t]) for t in cs)
            full += float(adv[i]) * sum(int(phases[i, t]) == c for t in cs) / len(cs)
            masked += (
                float(adv[i])
                * sum(float(inclusion[i, t]) for t in cs if int(phases[i, t]) == c)
                / k
            )
        assert row["full"]["advantage_weighted"] == pytest.approx(full, abs=1e-5)
        assert row["masked"]["advantage_weighted"] == pytest.approx(masked, abs=1e-5)
    # Weights sum to one per trajectory and advantages to zero per group: the phases sum to 0.
    for name in ("full", "masked"):
        assert sum(row[name]["advantage_weighted"] for row in rows) == pytest.approx(0, abs=1e-5)
        assert any(abs(row[name]["advantage_weighted"]) > 0.05 for row in rows)


def test_phase_weights_needs_a_checkpoint(bench, capsys):
    pytest.importorskip("gymnasium")
    with pytest.raises(SystemExit):
        bench("phase_weights").main([])
    assert "give --sft PATH (or --quick)" in capsys.readouterr().err


def test_selector_diagnostics_quick_writes_the_report_and_resumes(bench, tmp_path):
    pytest.importorskip("gymnasium")
    diag = bench("selector_diagnostics")
    out, report = tmp_path / "diag", tmp_path / "report.json"
    assert diag.main(["--quick", "--out", str(out), "--report", str(report), "--threads", "1"]) == 0
    result = json.loads(report.read_text())
    assert result["batches"] == 3
    assert set(result["selectors"]) == set(diag.SELECTORS)
    for row in result["selectors"].values():
        assert {"second_moment_ratio", "signal_ratio", "signal_ratio_se", "efficiency",
                "chunk_fraction", "efficiency_per_compute"} <= set(row)
    assert set(result["phase_shares"]) == {"pcm"}
    assert abs(sum(result["phase_chunk_fraction"].values()) - 1.0) < 1e-9
    # a second call finds every batch saved and only reports
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("batch*.pt")}
    assert diag.main(["--quick", "--out", str(out), "--report", str(report)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("batch*.pt")} == stamps


def test_evidence_study_quick_writes_seeds_and_report(bench, tmp_path):
    pytest.importorskip("gymnasium")
    study = bench("evidence_study")
    results, report = tmp_path / "res", tmp_path / "docs" / "reproduction.md"
    argv = ["--quick", "--out", str(tmp_path / "runs"), "--results", str(results),
            "--report", str(report), "--threads", "1", "--diagnostics", str(tmp_path / "none")]
    assert study.main(argv) == 0
    seeds = sorted(p.name for p in results.glob("seed*.json"))
    assert seeds == ["seed0.json", "seed1.json"]
    record = json.loads((results / "seed0.json").read_text())
    assert set(record["arms"]) == set(study.CORE)
    assert not report.with_suffix(".json").exists()  # data under --results, not beside the page
    data = json.loads(results.with_suffix(".json").read_text())  # the default --summary
    for arm in ("pcm", "random_aa", "pcm_aa"):
        row = data["rq1"]["arms"][arm]
        assert {"final_success", "diff_vs_grpo_pp", "diff_ci95_pp", "per_seed_diff_pp",
                "tost_equivalent", "seeds", "update_speedup"} <= set(row)
        assert len(row["per_seed_diff_pp"]) == row["seeds"] == 2
        lo, hi = row["diff_ci95_pp"]
        assert lo <= row["diff_vs_grpo_pp"] <= hi
        assert row["diff_vs_grpo_pp"] == pytest.approx(sum(row["per_seed_diff_pp"]) / 2)
    assert set(data["rq2"]["arms"]) == set(study.CORE)
    assert data["gradient"] == {}
    # resumes: a second run trains nothing (cached arms, finished seeds)
    stamps = {p.name: p.stat().st_mtime_ns for p in results.glob("seed*.json")}
    assert study.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("seed*.json")} == stamps
    # more arms are added to finished seeds, the existing ones kept as they are
    before = json.loads((results / "seed0.json").read_text())["arms"]
    assert study.main([*argv, "--arms", "pods", "token_entropy", "pcm_b6"]) == 0
    after = json.loads((results / "seed0.json").read_text())["arms"]
    assert set(after) == set(study.CORE) | {"pods", "token_entropy", "pcm_b6"}
    assert all(after[a] == before[a] for a in study.CORE)
    data = json.loads(results.with_suffix(".json").read_text())
    assert set(data["rq3"]["pcm"]) == {"6", "12"} and data["rq3"]["pcm"]["12"]["seeds"] == 2
    assert data["rq1"]["arms"]["token_entropy"]["seeds"] == 2
    # the off-budget arms of the B sweep are RQ3's only
    assert "pcm_b6" not in data["rq1"]["arms"] and data["rq3"]["pcm"]["6"]["budget"] == 6


def test_evidence_study_threshold_crossing_and_gradient_table(bench, tmp_path):
    study = bench("evidence_study")
    # Trailing 5-step means from index 4: 14, 24, 36, 50, 60; 50 is first reached at index 7.
    curve = [0, 0, 0, 30, 40, 50, 60, 70, 80]
    assert study.first_crossing(curve, 50.0) == 7
    assert study.first_crossing(curve, 50.1) == 8
    assert study.first_crossing([90] * 9, 50.0) == 4  # never before a full window
    assert study.first_crossing(curve, 1e9) is None
    diag = tmp_path / "diag.json"
    diag.write_text(json.dumps({
        "batches": 3, "full_signal_fraction": 0.01, "full_signal_fraction_se": 0.02,
        "selectors": {"random": {"second_moment_ratio": 4.0, "signal_ratio": 1.0,
                                 "signal_ratio_se": 0.5, "unbiased": True}},
    }))
    table = study.gradient_table(diag)
    assert table["selectors"]["random"]["second_moment_ratio"] == 4.0
    assert table["selectors"]["random"]["signal_ratio_se"] == 0.5


def test_evidence_v3_quick_interleaves_resumes_and_reports(bench, tmp_path):
    pytest.importorskip("gymnasium")
    study = bench("evidence_v3")
    out, results = tmp_path / "runs", tmp_path / "res"
    argv = ["--quick", "--out", str(out), "--results", str(results), "--seeds", "0-1"]
    assert study.main(argv) is None
    record = json.loads((results / "seed0.json").read_text())
    assert record["complete"] and set(record["arms"]) == set(study.ARMS)
    for row in record["arms"].values():
        assert [c[0] for c in row["curve"]] == [1, 2] and len(row["steps"]) == 2
    # all arms of a seed share the rollouts: GRPO and pcm_19 executed the same first step
    assert record["arms"]["grpo"]["steps"][0]["chunks_executed"] == \
        record["arms"]["pcm_19"]["steps"][0]["chunks_executed"]
    # a complete seed is not run again
    stamp = (results / "seed0.json").stat().st_mtime_ns
    study.main(argv)
    assert (results / "seed0.json").stat().st_mtime_ns == stamp
    # fixed n: the real report refuses to look before all pre-registered seeds are complete
    with pytest.raises(SystemExit, match="no interim looks"):
        study.main(["--results", str(results), "--report", str(tmp_path / "r.md")])
    summary = study.main(["--quick", "--results", str(results), "--report", str(tmp_path / "r.md")])
    row = summary["arms"]["pcm_19"]
    assert {"gain_vs_sft_pp", "gain_ci95_pp", "chunk_fraction", "diff_vs_grpo_pp", "diff_ci95_pp",
            "per_seed_diff_pp", "tost_p", "tost_p_holm", "seeds", "rq2"} <= set(row)
    assert len(row["per_seed_diff_pp"]) == row["seeds"] == 2
    assert row["tost_p_holm"] >= row["tost_p"]
    assert set(summary["rq2"]) == set(study.MASKED)
    page = (tmp_path / "r.md").read_text()
    assert page.startswith("# Reproduction") and study.DEVIATIONS[0] in page
    assert "lower bound of at least +25" in page
    # exploratory: GRPO at the arm's own (shorter or equal) training time, paired by seed
    m = summary["exploratory"]["matched_time"]["pcm_19"]
    assert 0 < m["time_fraction"] and m["diff_ci95_pp"][0] <= m["diff_pp"] <= m["diff_ci95_pp"][1]
    assert "random_19" not in summary["exploratory"]["vs_random_19"]
    assert "## Exploratory" in page
    if importlib.util.find_spec("matplotlib") is not None:
        assert "(img/r_v3_curves.png)" in page
        assert (tmp_path / "img" / "r_v3_curves.png").stat().st_size > 1000
    assert summary["validity"]["grpo_gain_ci_low_pp"] == pytest.approx(
        summary["arms"]["grpo"]["gain_ci95_pp"][0])
    # the design the plan fixes: 80 steps, four checkpoints, 20 seeds, 8 masked arms in the family
    assert study.STEPS == study.CHECKPOINTS[-1] == 80 and study.SEEDS == tuple(range(20))
    assert len(study.MASKED) == 8 and study.EVAL_EPISODES >= 1000


def test_evidence_v3_crossing_time_interpolates(bench):
    evidence_v3 = bench("evidence_v3")
    # start 10 at t=0, 30 at t=10, 50 at t=20: 40 is reached half-way through the second leg
    assert evidence_v3._crossing_time([10.0, 20.0], [30.0, 50.0], 10.0, 40.0) == pytest.approx(15.0)
    assert evidence_v3._crossing_time([10.0, 20.0], [30.0, 50.0], 10.0, 20.0) == pytest.approx(5.0)
    assert evidence_v3._crossing_time([10.0, 20.0], [30.0, 50.0], 10.0, 60.0) is None


def test_evidence_v3_spearman_matches_the_definition(bench):
    study = bench("evidence_v3")
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)); ranks (1,2,3,4,5) against (2,1,4,3,5): d^2 sum 4
    assert study.spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(1 - 24 / 120)
    assert study.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank, and Spearman is invariant under monotone maps of either side
    x, y = [1.0, 2.0, 2.0, 5.0, 7.0, 7.0], [0.3, 0.1, 0.9, 0.4, 0.8, 0.2]
    assert study.spearman(x, y) == pytest.approx(study.spearman([v**3 for v in x], [2 * v for v in y]))
    # by hand: ranks x (1, 2.5, 2.5, 4, 5.5, 5.5), y (3, 1, 6, 4, 5, 2); Pearson r of the ranks
    rx, ry = [1, 2.5, 2.5, 4, 5.5, 5.5], [3, 1, 6, 4, 5, 2]
    cov = sum((a - 3.5) * (b - 3.5) for a, b in zip(rx, ry, strict=True))
    var_x, var_y = sum((a - 3.5) ** 2 for a in rx), sum((b - 3.5) ** 2 for b in ry)
    assert study.spearman(x, y) == pytest.approx(cov / (var_x * var_y) ** 0.5)
    assert study.spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="one length >= 2"):
        study.spearman([1, 2], [1, 2, 3])


def test_evidence_v3_compares_the_diagnostics_with_the_measured_arms(bench):
    study = bench("evidence_v3")
    names = list(study.MASKED)
    # measured: arm k gains (k + 1) / 10 of GRPO's 20 points; the first half fall short of GRPO
    arms = {"grpo": {"gain_vs_sft_pp": 20.0}}
    for k, name in enumerate(names):
        short = k < len(names) // 2
        arms[name] = {"gain_vs_sft_pp": 2.0 * (k + 1), "chunk_fraction": 0.2,
                      "diff_ci95_pp": [-9.0, -1.0] if short else [-3.0, 3.0]}
    # predicted: the same order (Spearman 1), below 1 for the same half
    prediction = {"seeds": [0, 1, 2], "mean_over_seeds": {
        name: {"efficiency": 0.5 + 0.1 * k if k < len(names) // 2 else 1.0 + 0.1 * k,
               "efficiency_per_compute": 5.0 * (0.5 + 0.1 * k)}
        for k, name in enumerate(names)}}
    out = study.compare_diagnostics({"arms": arms}, prediction)
    assert out["spearman_efficiency"] == pytest.approx(1.0)
    assert out["spearman_per_compute"] == pytest.approx(1.0)
    assert out["short_of_grpo_agreement"] == 1.0
    first = out["arms"][names[0]]
    assert first["measured_relative_gain"] == pytest.approx(0.1)
    assert first["measured_relative_gain_per_compute"] == pytest.approx(0.5)
    # reversing the prediction's order reverses the correlation; flipping one verdict costs 1/n
    prediction["mean_over_seeds"] = {
        name: {"efficiency": 2.0 - 0.1 * k, "efficiency_per_compute": None}
        for k, name in enumerate(names)}
    out = study.compare_diagnostics({"arms": arms}, prediction)
    assert out["spearman_efficiency"] == pytest.approx(-1.0)
    assert out["spearman_per_compute"] is None
    assert out["short_of_grpo_agreement"] == pytest.approx(0.5)


def test_evidence_v3_main_job_variant_rule(bench):
    study = bench("evidence_v3")
    arms = {n: {"final_success_pp": 50.0, "chunk_fraction": 0.19} for n in study.MASKED}
    arms["pcm_19"]["final_success_pp"] = 90.0  # the paper's rule is shown anyway: never chosen
    arms["random_37"]["final_success_pp"] = 80.0  # another fraction: never chosen
    arms["pods_19"]["final_success_pp"] = 60.0
    assert study.main_job_variant({"arms": arms}) == "pods_19"
    arms["neyman_ht_19"].update(final_success_pp=60.0, chunk_fraction=0.18)  # tie: cheaper wins
    assert study.main_job_variant({"arms": arms}) == "neyman_ht_19"


def test_evidence_v3_pilot_tiny(bench, tmp_path):
    pytest.importorskip("gymnasium")
    pilot = bench("evidence_v3_pilot")
    pilot.main(["--name", "tiny", "--seed", "100", "--demos", "2", "--sft-steps", "3",
                "--d-model", "16", "--depth", "1", "--max-steps", "32", "--steps", "2",
                "--eval-every", "1", "--eval-episodes", "2", "--prompts", "2", "--group", "2",
                "--mini-batch", "4", "--pool", "2", "--keep-failed-demos", "--out", str(tmp_path / "runs"),
                "--results", str(tmp_path / "res")])
    data = json.loads((tmp_path / "res" / "tiny_seed100.json").read_text())
    assert [c[0] for c in data["curve"]] == [0, 1, 2]
    assert len(data["train_success"]) == len(data["entropy"]) == 2
    assert 0.0 <= data["update_share"] <= 1.0


def test_loss_overhead_tiny(bench, tmp_path):
    """The overhead benchmark checks that every call computes the bare value, then times them."""
    loss_overhead = bench("loss_overhead")
    out = tmp_path / "lo.json"
    result = loss_overhead.main(["--rows", "8", "--tokens", "4", "--repeats", "3", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["shape"] == [8, 4] and saved["repeats"] == 3
    assert set(saved["median_us"]) == {
        "bare_surrogate", "clipped_surrogate_mean", "masked_grpo_loss", "masked_grpo_loss_validate"
    }
    assert saved["ratio_to_bare"]["bare_surrogate"] == 1.0
    assert all(v > 0 for v in result["median_us"].values())


def test_diagnostics_v3_catches_gradients_without_updating(bench):
    diag = bench("diagnostics_v3")
    layer = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    catcher = diag.GradientCatcher(layer.parameters())
    layer(torch.ones(4, 3)).sum().backward()
    catcher.step()
    assert [g is p.grad for g, p in zip(catcher.caught, layer.parameters(), strict=True)] == [True] * 2
    assert all(torch.equal(b, p) for b, p in zip(before, layer.parameters(), strict=True))
    assert torch.allclose(catcher.caught[1], torch.full((2,), 4.0))


def test_diagnostics_v3_quick_sketches_every_arm_and_resumes(bench, tmp_path):
    pytest.importorskip("gymnasium")
    diag = bench("diagnostics_v3")
    argv = ["--quick", "--out", str(tmp_path / "o"), "--study-out", str(tmp_path / "s"),
            "--seeds", "0"]
    diag.main(argv)
    batches = sorted((tmp_path / "o" / "seed0").glob("batch*.pt"))
    assert len(batches) == 3
    record = torch.load(batches[0], weights_only=False)
    assert set(record["sketch"]) == set(record["chunks"]) == set(diag.evidence_v3.ARMS)
    assert record["sketch"]["grpo"].shape == (8192,)
    # the masked arms back-propagate no more chunks than GRPO on the same batch
    assert all(record["chunks"][a] <= record["chunks"]["grpo"] for a in diag.evidence_v3.MASKED)
    stamp = batches[0].stat().st_mtime_ns
    diag.main(argv)  # resumes: nothing is recomputed
    assert batches[0].stat().st_mtime_ns == stamp
    out = diag.main(argv + ["--report", str(tmp_path / "r.json")])
    assert set(out["mean_over_seeds"]) == set(diag.evidence_v3.MASKED)
    assert json.loads((tmp_path / "r.json").read_text())["seeds"] == [0]
