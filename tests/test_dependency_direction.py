"""The general never depends on the specific: the pipeline knows only `ChunkPolicy`, the
selectors live in the core, and the testbed only registers its own arms."""

import ast
import pathlib

import pytest

import chunkmask
from chunkmask.pipeline.policy import ChunkPolicy

SRC = pathlib.Path(chunkmask.__file__).resolve().parent


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_pipeline_never_imports_the_testbed():
    for path in (SRC / "pipeline").glob("*.py"):
        bad = [m for m in _imports(path) if m.startswith("chunkmask.testbed")]
        assert not bad, f"{path.name} imports {bad}"


def test_core_never_imports_pipeline_or_testbed():
    for path in SRC.glob("*.py"):
        bad = [m for m in _imports(path) if m.startswith(("chunkmask.testbed", "chunkmask.pipeline"))]
        assert not bad, f"{path.name} imports {bad}"


def test_testbed_policy_satisfies_chunk_policy():
    pytest.importorskip("gymnasium")
    from chunkmask.testbed import PickPlaceConfig, TokenChunkPolicy, obs_layout, pickplace_policy_fn

    cfg = PickPlaceConfig()
    policy = TokenChunkPolicy(obs_layout(cfg.num_objects), num_tasks=cfg.num_objects, d_model=16,
                              depth=1, heads=2)
    assert isinstance(policy, ChunkPolicy)
    assert isinstance(pickplace_policy_fn(d_model=16, depth=1, heads=2)(), ChunkPolicy)
    assert not isinstance(object(), ChunkPolicy)


def test_testbed_arms_are_registered_selectors():
    pytest.importorskip("gymnasium")
    from chunkmask.testbed import SELECTORS

    assert set(SELECTORS) <= set(chunkmask.available_selectors())
    assert {"pods", "token_entropy"} <= set(SELECTORS) - set(chunkmask.selectors.GENERIC_SELECTORS)


def test_configs_share_the_optimisation_defaults():
    pytest.importorskip("gymnasium")
    from chunkmask.pipeline.config import PipelineConfig
    from chunkmask.testbed import TrainConfig

    train, pipe = TrainConfig(), PipelineConfig()
    for name in ("lr", "weight_decay", "grad_clip", "temperature", "clip_low", "clip_high"):
        assert getattr(train, name) == getattr(pipe, name), name
    assert train.clip == pipe.clip == chunkmask.Clip(low=0.2, high=0.4)
