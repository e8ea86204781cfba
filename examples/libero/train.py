"""GRPO + Probabilistic Chunk Masking for OpenVLA-OFT (LoRA) on LIBERO, launched with torchrun.

The paper's setting (App. E of arXiv 2605.16154): OpenVLA-OFT with LoRA r = alpha = 32, 8 prompts x
10 rollouts per step, B = 12 of 64 chunks, temperature 1.6, clip (0.2, 0.4), lr 1e-5, 2 x H100.

One training step:

1. rollouts: each rank runs its share of the prompts (task + initial state), `rollouts_per_prompt`
   environments per prompt, sampling 56 action tokens (8 steps x 7 dims) per chunk at the
   temperature; the sampled tokens' log-probabilities are the behaviour log-probs;
2. GRPO advantages per group (`group_relative_advantages`) and the dynamic-sampling filter
   (`dynamic_sampling_mask`, groups with success rate in [0.1, 0.9]);
3. PCM: `ProbabilisticChunkMasker.update` then `.draw` (phase labels from the gripper, in LIBERO's convention:
   +1 closes), with its `PhaseScoreBuffer` all-reduced over the process group;
4. `shrink` the stored chunk inputs to the selected chunks, then the actor forward and backward
   on micro-batches of trajectories (gradient accumulation), `masked_grpo_loss` with the
   data-parallel normalisers of `loss_normalizers`, so DDP's gradient average is the gradient
   of the union batch; one AdamW step.

Usage::

    # CPU, no weights, seconds: a tiny random VLA with the same token interface
    python examples/libero/train.py --smoke --out /tmp/libero_smoke
    # CPU, no weights, ~2 min: the real OpenVLA-OFT architecture (tiny random config) on real
    # LIBERO (needs the extra install of docs/libero.md, 'The real architecture')
    MUJOCO_GL=egl python examples/libero/train.py --tiny-real --out /tmp/libero_tiny_real
    # 1 x H100
    MUJOCO_GL=egl python examples/libero/train.py --checkpoint /ckpt/openvla-7b-oft-libero-spatial \\
        --unnorm-key libero_spatial_no_noops --suite spatial --out runs/spatial
    # 2 x H100
    MUJOCO_GL=egl torchrun --nproc-per-node 2 examples/libero/train.py --checkpoint ... --out ...

See docs/libero.md.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from libero_envs import MAX_STEPS, NUM_INIT_STATES, NUM_TASKS, make_env  # noqa: E402
from oft_real import ACTION_HEADS, ATTENTIONS  # noqa: E402
from vla_policy import (  # noqa: E402
    build_openvla_oft_policy,
    build_smoke_policy,
    build_tiny_real_policy,
    lora_state_dict,
)

from chunkmask import (
    NUM_PHASES,
    ActionTokenizer,
    Clip,
    PhaseLabelling,
    PhaseScoring,
    ProbabilisticChunkMasker,
    Regularizers,
    Selection,
    SelectorInputs,
    get_selector,
    group_relative_advantages,
    loss_normalizers,
    masked_grpo_loss,
    shrink,
)
from chunkmask.baselines import dynamic_sampling_mask


@dataclasses.dataclass
class Config:
    # model
    checkpoint: str | None = None
    unnorm_key: str | None = None
    decode: str = "parallel"
    action_attention: str = "bidirectional"  # OFT paths only; the --smoke stand-in is causal
    action_head: str = "tokens"  # "l1": OFT's L1 regression head under a fixed-std Gaussian
    l1_std: float = 0.1
    lora_r: int = 32
    lora_alpha: int = 32
    prompt_len: int = 64
    image_size: int = 224
    # environment
    suite: str = "spatial"
    env: str = "auto"
    max_chunks: int | None = None  # default: ceil(max_steps / chunk_steps)
    max_steps: int | None = None  # default: the suite's (openvla-oft)
    chunk_steps: int = 8
    action_dim: int = 7
    train_init_states: int = 40  # init states [0, 40) train, [40, 50) held out for evaluation
    # GRPO
    prompts_per_step: int = 8
    rollouts_per_prompt: int = 10
    temperature: float = 1.6
    clip_low: float = 0.2
    clip_high: float = 0.4
    entropy_coef: float = 1e-3
    loss_agg_mode: str = "seq-mean-token-mean"
    ds_low: float = 0.1
    ds_high: float = 0.9
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    micro_batch: int = 1  # trajectories per micro-batch (gradient accumulation)
    # PCM
    pcm: bool = True
    budget: int = 12
    p_min: float = 0.1
    refresh_every: int = 5
    # run
    steps: int = 200
    eval_every: int = 10
    eval_episodes: int = 50
    save_every: int = 10
    bf16: bool = True
    grad_ckpt: bool = False
    dp: str = "ddp"
    seed: int = 0
    out: str = "runs/libero"
    resume: bool = False
    smoke: bool = False
    tiny_real: bool = False
    progress: bool = True
    log_all_ranks: bool = False
    init_method: str = "env://"


def smoke_config(cfg: Config) -> Config:
    """Two full training steps on CPU with the tiny VLA, in seconds.

    Only fields still at their defaults are changed, so that explicit flags win.
    """
    defaults = Config()
    smoke = dict(
        decode="parallel",
        prompt_len=24,
        image_size=32,
        max_chunks=8,
        max_steps=8 * cfg.chunk_steps,
        prompts_per_step=2,
        rollouts_per_prompt=4,
        budget=2,
        refresh_every=1,
        micro_batch=2,
        lr=1e-3,
        steps=2,
        eval_every=2,
        eval_episodes=2,
        save_every=1,
    )
    changes = {k: v for k, v in smoke.items() if getattr(cfg, k) == getattr(defaults, k)}
    return dataclasses.replace(cfg, **changes)


def tiny_real_config(cfg: Config) -> Config:
    """Two GRPO + PCM steps of the real OFT architecture (tiny, random) on real LIBERO, on a CPU.

    One prompt x 2 rollouts, episodes of 4 chunks (32 steps), PCM B = 2 of 4, renders at 64 x 64
    (resized to the backbones' 224); dynamic sampling keeps every group (a random policy never
    succeeds, and the update must still run). Only fields at their defaults change.
    """
    defaults = Config()
    tiny = dict(
        env="libero",
        prompt_len=32,
        image_size=64,
        max_chunks=4,
        max_steps=4 * cfg.chunk_steps,
        prompts_per_step=1,
        rollouts_per_prompt=2,
        budget=2,
        refresh_every=1,
        micro_batch=2,
        lora_r=8,
        lora_alpha=8,
        lr=1e-3,
        ds_low=0.0,
        ds_high=1.0,
        steps=2,
        eval_every=2,
        eval_episodes=1,
        save_every=1,
    )
    changes = {k: v for k, v in tiny.items() if getattr(cfg, k) == getattr(defaults, k)}
    return dataclasses.replace(cfg, **changes)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    for field in dataclasses.fields(Config):
        name = "--" + field.name.replace("_", "-")
        value = getattr(defaults, field.name)
        if isinstance(value, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=value)
        else:
            kinds = [t for t in typing.get_args(field.type) if t is not type(None)]
            kind = kinds[0] if kinds else field.type  # `int | None` -> int
            parser.add_argument(name, type=kind, default=value)
    cfg = Config(**vars(parser.parse_args(argv)))
    check_model_options(cfg)
    if cfg.tiny_real:
        return tiny_real_config(cfg)
    return smoke_config(cfg) if cfg.smoke else cfg


def check_model_options(cfg: Config) -> None:
    """Raise ValueError on contradictory or unknown model options."""
    if cfg.smoke and cfg.tiny_real:
        raise ValueError("`--smoke` and `--tiny-real` are exclusive, got both.")
    if cfg.action_attention not in ATTENTIONS:
        raise ValueError(
            f"`action_attention` must be one of {ATTENTIONS}, got {cfg.action_attention!r}."
        )
    if cfg.action_head not in ACTION_HEADS:
        raise ValueError(f"`action_head` must be one of {ACTION_HEADS}, got {cfg.action_head!r}.")
    if cfg.action_head == "l1" and not cfg.tiny_real:
        raise ValueError(
            "`action_head` 'l1' is only wired for `--tiny-real` (a checkpoint's head is not "
            f"loaded here), got it with smoke={cfg.smoke}, checkpoint={cfg.checkpoint!r}."
        )


# ----------------------------------------------------------------------------- distributed
class Dist:
    def __init__(self, cfg: Config) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and not cfg.smoke
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        self.group = None
        if self.world > 1:
            import torch.distributed as dist

            if use_cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group(
                "nccl" if use_cuda else "gloo",
                init_method=cfg.init_method,
                rank=self.rank,
                world_size=self.world,
            )
            self.group = dist.group.WORLD

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.group is None:
            return x
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        x = x.clone()
        dist.all_reduce(x, op=ops[op], group=self.group)
        return x

    def barrier(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------- rollouts
def prompts_for_step(
    cfg: Config, step: int, num_tasks: int, held_out: bool
) -> list[tuple[int, int]]:
    """The step's (task, initial state) prompts, identical on every rank (seeded by the step)."""
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step * 2 + int(held_out))
    n = cfg.prompts_per_step if not held_out else cfg.eval_episodes
    tasks = torch.randint(0, num_tasks, (n,), generator=gen).tolist()
    if held_out:
        inits = torch.randint(cfg.train_init_states, NUM_INIT_STATES, (n,), generator=gen)
    else:
        inits = torch.randint(0, cfg.train_init_states, (n,), generator=gen)
    return list(zip(tasks, inits.tolist(), strict=True))


def rollout(
    policy: Any,
    env: Any,
    prompts: list[tuple[int, int]],
    repeats: int,
    cfg: Config,
    dist: Dist,
    generator: torch.Generator | None,
    *,
    greedy: bool = False,
    keep_inputs: bool = True,
) -> dict[str, Any]:
    """Run one episode per (prompt, repeat); return per-chunk tensors `(traj, N, ...)`."""
    task_ids = [t for t, _ in prompts for _ in range(repeats)]
    init_ids = [i for _, i in prompts for _ in range(repeats)]
    num_envs, num_chunks, device = len(task_ids), cfg.max_chunks, dist.device
    obs = env.reset(task_ids, init_ids)
    active = np.ones(num_envs, dtype=bool)
    success = np.zeros(num_envs, dtype=bool)
    steps = np.zeros(num_envs, dtype=np.int64)
    valid = torch.zeros(num_envs, num_chunks, dtype=torch.bool)
    chunks: list[dict[str, Any]] = []
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)
    for t in range(num_chunks):
        any_active = torch.tensor(float(active.any()))
        if cfg.dp == "fsdp2":  # every rank must run the same number of forwards
            any_active = dist.all_reduce(any_active, "max")
        if not bool(any_active):
            break
        inputs = policy.prepare(obs, device)
        with autocast:
            tokens, logp = policy.sample(
                inputs, temperature=cfg.temperature, generator=generator, greedy=greedy
            )
        norm, env_actions = policy.actions(tokens)
        valid[:, t] = torch.from_numpy(active)
        chunks.append(
            {
                "inputs": inputs if keep_inputs else None,
                "tokens": tokens,
                "old_logp": logp.float(),
                "actions": norm.float(),
                "gripper": env_actions[..., -1].float(),  # LIBERO convention: +1 closes
            }
        )
        env_np = env_actions.float().cpu().numpy()
        for h in range(cfg.chunk_steps):
            if not active.any():
                break
            obs, done = env.step(env_np[:, h], active)
            steps += active
            success |= done
            active &= ~done & (steps < env.max_steps)
    executed = len(chunks)
    out: dict[str, Any] = {"valid": valid.to(device), "success": torch.from_numpy(success)}

    def stack(values: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(values, 1)
        pad = torch.zeros(
            (x.shape[0], num_chunks - executed, *x.shape[2:]), dtype=x.dtype, device=x.device
        )
        return torch.cat([x, pad], 1)

    for key in ("tokens", "old_logp", "actions", "gripper"):
        out[key] = stack([c[key] for c in chunks])
    if keep_inputs:
        out["inputs"] = {k: stack([c["inputs"][k] for c in chunks]) for k in chunks[0]["inputs"]}
    out["success"] = out["success"].to(device)
    return out


# ----------------------------------------------------------------------------- update
def update(
    policy: Any,
    batch: dict[str, Any],
    selection: Selection,
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    cfg: Config,
    dist: Dist,
) -> dict[str, float]:
    """Micro-batched actor update on the selected chunks; one optimiser step."""
    k = policy.tokens_per_chunk
    norms = loss_normalizers(selection, tokens_per_chunk=k, process_group=dist.group)
    rows = torch.nonzero(selection.counts > 0).flatten()
    micro = [rows[i : i + cfg.micro_batch] for i in range(0, len(rows), cfg.micro_batch)]
    count = dist.all_reduce(torch.tensor(float(len(micro))), "max")
    num_micro = int(count)  # every rank runs the same number of backward passes
    tree = {"inputs": batch["inputs"], "tokens": batch["tokens"], "old_logp": batch["old_logp"]}
    autocast = torch.autocast(
        "cuda", torch.bfloat16, enabled=dist.device.type == "cuda" and cfg.bf16
    )
    optimizer.zero_grad(set_to_none=True)
    stats: dict[str, float] = {"loss": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0, "entropy": 0.0}
    seen = 0
    for i in range(num_micro):
        dummy = i >= len(micro)
        if dummy:  # a rank with fewer micro-batches runs a zero-weighted one (one chunk)
            idx = torch.zeros(1, dtype=torch.long, device=rows.device)
            first = torch.zeros(1, selection.chunks_total, dtype=torch.bool, device=rows.device)
            first[0, 0] = True
            sub = Selection.from_mask(first)
        else:
            idx = micro[i]
            sub = selection.rows(idx)
        packed = shrink(
            {
                "inputs": {key: v[idx] for key, v in tree["inputs"].items()},
                "tokens": tree["tokens"][idx],
                "old_logp": tree["old_logp"][idx],
                "adv": advantages[idx],
            },
            sub,
        )
        sync = i == num_micro - 1
        no_sync = getattr(policy.train_model, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        if cfg.dp == "fsdp2":
            policy.train_model.set_requires_gradient_sync(sync)
        with ctx:
            with autocast:
                logp, entropy = policy.log_prob(
                    packed["inputs"], packed["tokens"], temperature=cfg.temperature
                )
            out = masked_grpo_loss(
                logp.float(),
                old_logp=packed["old_logp"],
                advantages=packed["adv"],
                selection=sub,
                clip=Clip(low=cfg.clip_low, high=cfg.clip_high),
                loss_agg_mode=cfg.loss_agg_mode,
                regularizers=Regularizers(entropy=entropy.float(), entropy_coef=cfg.entropy_coef),
                norms=norms,
            )
            loss = out.loss * 0.0 if dummy else out.loss
            loss.backward()
        if not dummy:
            seen += 1
            stats["loss"] += float(out.loss.detach())
            stats["clip_frac"] += float(out.clip_frac_low + out.clip_frac_high)
            stats["ratio_mean"] += float(out.ratio_mean)
            stats["entropy"] += float(entropy.detach().float().mean())
    for key in ("clip_frac", "ratio_mean", "entropy"):
        stats[key] /= max(seen, 1)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    stats["grad_norm"] = float(grad_norm)
    stats["micro_batches"] = len(micro)
    stats["global_batch_size"] = int(norms.global_batch_size)
    stats["batch_num_tokens"] = int(norms.batch_num_tokens)
    return stats


# ----------------------------------------------------------------------------- checkpoints
def _full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    masker: Any,
    cfg: Config,
    dist: Dist,
) -> None:
    """Rank 0 writes `checkpoint.pt` (LoRA, optimiser, masker, step); under FSDP2 every rank
    also writes its optimiser shard to `optimizer.rank{r}.pt`."""
    lora = {k: _full(v) for k, v in lora_state_dict(model).items()}  # a collective under FSDP2
    sharded = cfg.dp == "fsdp2" and dist.world > 1
    if sharded:
        _atomic_save(optimizer.state_dict(), out_dir / f"optimizer.rank{dist.rank}.pt")
    if dist.main:
        state = {
            "step": step,
            "lora": lora,
            "optimizer": None if sharded else optimizer.state_dict(),
            "masker": masker.state_dict() if masker is not None else None,
            "config": dataclasses.asdict(cfg),
        }
        _atomic_save(state, out_dir / "checkpoint.pt")
    dist.barrier()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    out_dir: Path, model: torch.nn.Module, optimizer: Any, masker: Any, dist: Dist
) -> int:
    # weights_only=True: plain tensors, numbers and strings (torch >= 2.6's default).
    state = torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["lora"].items():
            target = params[name]
            if hasattr(target, "device_mesh"):  # an FSDP2 DTensor shard
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(
                    value.to(target.dtype), target.device_mesh, target.placements
                )
                target.copy_(value)
            else:
                target.copy_(value.to(target.device, target.dtype))
    opt_state = state["optimizer"]
    if opt_state is None:
        shard = out_dir / f"optimizer.rank{dist.rank}.pt"
        opt_state = torch.load(shard, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(opt_state)
    if masker is not None and state["masker"] is not None:
        masker.load_state_dict(state["masker"])
    return int(state["step"])


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    cfg = parse_args(argv)
    dist = Dist(cfg)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if dist.main:
            print(msg, flush=True)

    if dist.world > 1 and dist.device.type == "cpu":
        torch.set_num_threads(1)
    if cfg.prompts_per_step % dist.world:
        raise ValueError(
            f"`prompts_per_step` must be divisible by the world size {dist.world}, got "
            f"{cfg.prompts_per_step}."
        )
    if cfg.dp not in ("ddp", "fsdp2"):
        raise ValueError(f"`dp` must be one of ('ddp', 'fsdp2'), got {cfg.dp!r}.")
    max_steps = cfg.max_steps or MAX_STEPS[cfg.suite]
    if cfg.max_chunks is None:
        cfg = dataclasses.replace(cfg, max_chunks=math.ceil(max_steps / cfg.chunk_steps))
    torch.manual_seed(cfg.seed)

    codec = ActionTokenizer(num_bins=256, vocab_size=32000)
    if cfg.smoke:
        log("[model] smoke: tiny randomly initialised VLA (vocab 32000 + 64 pad, 56 tokens/chunk)")
        policy = build_smoke_policy(
            codec,
            image_size=cfg.image_size,
            prompt_len=cfg.prompt_len,
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            decode=cfg.decode,
        )
    elif cfg.tiny_real:
        log(
            "[model] tiny-real: OpenVLAForActionPrediction (openvla-oft's code), tiny random "
            f"config, action head {cfg.action_head}, {cfg.action_attention} action attention"
        )
        policy = build_tiny_real_policy(
            codec,
            prompt_len=cfg.prompt_len,
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            attention=cfg.action_attention,
            action_head=cfg.action_head,
            l1_std=cfg.l1_std,
            seed=cfg.seed,
        )
    else:
        if not cfg.checkpoint or not cfg.unnorm_key:
            raise ValueError(
                "`--checkpoint` and `--unnorm-key` are required unless `--smoke` or `--tiny-real`."
            )
        log(
            f"[model] OpenVLA-OFT from {cfg.checkpoint}, LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}"
        )
        policy = build_openvla_oft_policy(
            cfg.checkpoint,
            codec,
            unnorm_key=cfg.unnorm_key,
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            prompt_len=cfg.prompt_len,
            decode=cfg.decode,
            attention=cfg.action_attention,
        )
    model = policy.model.to(dist.device)
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if dist.world > 1:  # identical start on every rank
        for param in model.parameters():
            if param.requires_grad:
                torch.distributed.broadcast(param.data, src=0)
        if cfg.dp == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            policy.train_model = DistributedDataParallel(model, device_ids=ids)
        else:
            from torch.distributed.fsdp import fully_shard

            policy.train_model = fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"[model] trainable (LoRA) parameters: {sum(p.numel() for p in params):,}")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    local_prompts = cfg.prompts_per_step // dist.world
    num_envs = local_prompts * cfg.rollouts_per_prompt
    env_log = log if dist.main else (lambda _msg: None)
    env = make_env(
        cfg.suite,
        num_envs,
        env=cfg.env,
        image_size=cfg.image_size,
        max_steps=max_steps,
        seed=cfg.seed,
        log=env_log,
    )
    masker = None
    if cfg.pcm:
        masker = ProbabilisticChunkMasker(
            cfg.budget,
            NUM_PHASES,
            # the stored gripper is in LIBERO's convention: +1 closes
            labelling=PhaseLabelling(close="positive"),
            scoring=PhaseScoring(
                refresh_every=cfg.refresh_every, p_min=cfg.p_min, process_group=dist.group
            ),
            seed=torch.Generator(),
        )
    ckpt = out_dir / "checkpoint.pt"
    start = 0
    if cfg.resume and ckpt.exists():
        start = load_checkpoint(out_dir, model, optimizer, masker, dist)
        log(f"[resume] from {ckpt} at step {start}")
    metrics_name = "metrics.jsonl" if dist.main else f"metrics.rank{dist.rank}.jsonl"
    write_metrics = dist.main or cfg.log_all_ranks
    metrics_path = out_dir / metrics_name
    if write_metrics and not cfg.resume and metrics_path.exists():
        metrics_path.unlink()
    log(
        f"[run] suite={cfg.suite} env={env.name} world={dist.world} device={dist.device} "
        f"prompts={cfg.prompts_per_step}x{cfg.rollouts_per_prompt} chunks={cfg.max_chunks} "
        f"budget={cfg.budget if cfg.pcm else 'all'} steps={start}->{cfg.steps}"
    )
    try:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.steps, initial=start, disable=not (dist.main and cfg.progress), unit="step"
        )
    except ImportError:  # pragma: no cover
        bar = None

    records = []
    eval_envs: dict[int, Any] = {}
    for step in range(start, cfg.steps):
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        t0 = time.perf_counter()
        prompts = prompts_for_step(cfg, step, NUM_TASKS, held_out=False)
        mine = prompts[dist.rank * local_prompts : (dist.rank + 1) * local_prompts]
        gen_device = dist.device if dist.device.type == "cuda" else "cpu"
        gen = torch.Generator(gen_device).manual_seed(
            cfg.seed * 1_000_003 + step * 1009 + dist.rank
        )
        model.eval()
        batch = rollout(policy, env, mine, cfg.rollouts_per_prompt, cfg, dist, gen)
        rollout_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        model.train()
        success, valid = batch["success"], batch["valid"]
        group = torch.arange(local_prompts, device=dist.device).repeat_interleave(
            cfg.rollouts_per_prompt
        )
        advantages = group_relative_advantages(success.float(), group)
        keep = dynamic_sampling_mask(success, group, low=cfg.ds_low, high=cfg.ds_high)
        kept_valid = valid & keep[:, None]
        info = None
        if masker is not None:
            masker.generator.manual_seed(cfg.seed * 7919 + step * 31 + dist.rank)
            info = masker.update(  # once per step: advances the phase scores
                actions=batch["actions"],
                gripper=batch["gripper"],
                success=success,
                group=group,
                valid=kept_valid,
                num_groups=local_prompts,
            )
        selection = get_selector("pcm" if cfg.pcm else "full")(  # chunkmask's selector registry
            SelectorInputs(
                valid=kept_valid,
                budget=cfg.budget,
                phases=None if info is None else info.phases,
                advantages=advantages,
                masker=masker,
            )
        )
        stats = update(policy, batch, selection, advantages, optimizer, params, cfg, dist)
        update_s = time.perf_counter() - t1

        executed = dist.all_reduce(kept_valid.sum().cpu())
        selected = dist.all_reduce(selection.counts.sum().cpu())
        rolled = dist.all_reduce(valid.sum().cpu())
        succ = dist.all_reduce(torch.stack([success.sum(), keep.sum()]).float().cpu())
        peak, peak_kind = peak_memory(dist.device)
        record: dict[str, Any] = {
            "step": step + 1,
            "rank": dist.rank,
            "env": env.name,
            "rollout_s": round(rollout_s, 4),
            "update_s": round(update_s, 4),
            "chunks_rolled_out": int(rolled),
            "chunks_executed": int(executed),
            "chunks_backpropagated": int(selected),
            "local_chunks_backpropagated": int(selection.counts.sum()),
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "success": float(succ[0]) / (cfg.prompts_per_step * cfg.rollouts_per_prompt),
            "kept_trajectories": int(succ[1]),
            "budget": cfg.budget if cfg.pcm else None,
            "max_chunks": cfg.max_chunks,
            **stats,
            "param_checksum": float(sum(p.detach().double().sum() for p in params)),
        }
        if info is not None:
            sel_phase = dist.all_reduce(info.selected_per_phase(selection).cpu())
            avail_phase = dist.all_reduce(info.available_per_phase.cpu())
            record["selected_per_phase"] = sel_phase.tolist()
            record["available_per_phase"] = avail_phase.tolist()
            record["keep_probabilities"] = info.keep_probabilities.cpu().tolist()
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            t2 = time.perf_counter()
            record["eval_success"] = evaluate(policy, cfg, dist, step, eval_envs, max_steps)
            record["eval_s"] = round(time.perf_counter() - t2, 4)
        record["step_s"] = round(time.perf_counter() - t0, 4)
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(out_dir, step + 1, model, optimizer, masker, cfg, dist)
        if write_metrics:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        records.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                success=f"{record['success']:.2f}",
                bwd=f"{record['chunks_backpropagated']}/{record['chunks_executed']}",
            )
    if bar is not None:
        bar.close()
    env.close()
    for eval_env in eval_envs.values():
        eval_env.close()
    dist.close()
    return records


def evaluate(
    policy: Any, cfg: Config, dist: Dist, step: int, envs: dict[int, Any], max_steps: int
) -> float:
    """Greedy success rate on held-out initial states (`[train_init_states, 50)`).

    The evaluation environments are built once and cached in `envs`.
    """
    prompts = prompts_for_step(cfg, step, NUM_TASKS, held_out=True)
    mine = prompts[dist.rank :: dist.world]
    if not mine:
        total = dist.all_reduce(torch.zeros(2))
        return float(total[0] / total[1].clamp_min(1))
    if len(mine) not in envs:
        envs[len(mine)] = make_env(
            cfg.suite,
            len(mine),
            env=cfg.env,
            image_size=cfg.image_size,
            max_steps=max_steps,
            seed=cfg.seed + 1,
            log=lambda _msg: None,
        )
    env = envs[len(mine)]
    policy.model.eval()
    out = rollout(policy, env, mine, 1, cfg, dist, None, greedy=True, keep_inputs=False)
    total = dist.all_reduce(torch.tensor([float(out["success"].sum()), float(len(mine))]))
    return float(total[0] / total[1])


if __name__ == "__main__":
    main()
