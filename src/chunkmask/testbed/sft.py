"""Supervised fine-tuning ("SFT"): behaviour cloning of the chunked policy on expert chunks."""

import torch
import torch.nn.functional as F

from chunkmask._checks import check_positive_int, check_range
from chunkmask.testbed.expert import Demonstrations
from chunkmask.testbed.policy import TokenChunkPolicy, actions_to_tokens


def behaviour_cloning(
    policy: TokenChunkPolicy,
    demos: Demonstrations,
    *,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    smoothing: float = 2.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> list[float]:
    """Train `policy` to predict the expert's action tokens of each chunk (cross-entropy).

    The target of each token is a discretised Gaussian centred on the expert's bin.

    Args:
        policy: the policy to train in place.
        demos: chunked expert demonstrations.
        steps: optimiser steps.
        batch_size: chunks per step.
        lr: AdamW learning rate (cosine-decayed to 0).
        weight_decay: AdamW weight decay.
        smoothing: width (in bins) of the Gaussian label smoothing over neighbouring bins; 0
            gives one-hot targets.
        generator: torch generator for minibatch draws.
        progress: show a tqdm bar.

    Returns:
        The loss of every step.
    """
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_range(lr, "lr", low=0.0, low_open=True)
    check_range(weight_decay, "weight_decay", low=0.0)
    check_range(smoothing, "smoothing", low=0.0)
    if demos.obs.shape[0] == 0:
        raise ValueError("`demos` must hold at least one chunk, got 0.")
    targets = actions_to_tokens(demos.actions, policy.bins).reshape(demos.actions.shape[0], -1)
    # Ordinal label smoothing: a Gaussian over neighbouring bins (width `smoothing` bins) lets
    # nearby bins share statistical strength when demonstrations are few.
    centres = torch.arange(policy.bins, dtype=torch.float32)
    soft = torch.softmax(-0.5 * ((centres[:, None] - centres) / max(smoothing, 1e-3)) ** 2, dim=1)
    optim = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, steps)
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="SFT", leave=False)
    losses = []
    policy.train()
    for _ in iterator:
        idx = torch.randint(demos.obs.shape[0], (batch_size,), generator=generator)
        logp = F.log_softmax(policy(demos.obs[idx]), dim=-1)
        loss = -(soft[targets[idx]] * logp).sum(-1).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses
