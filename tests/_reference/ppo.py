"""Slow, obvious float64 loop references for chunk rewards, chunk GAE and the chunked PPO, value and BC losses."""

import math


def chunk_rewards_ref(rewards, mask, gamma):
    """rewards, mask: nested lists [traj][chunk][step]."""
    out = []
    for r_traj, m_traj in zip(rewards, mask, strict=True):
        row = []
        for r_chunk, m_chunk in zip(r_traj, m_traj, strict=True):
            total = 0.0
            for j, (r, m) in enumerate(zip(r_chunk, m_chunk, strict=True)):
                if m:
                    total += gamma**j * float(r)
            row.append(total)
        out.append(row)
    return out


def chunk_gae_ref(rewards, values, valid, terminated, truncated, next_values, bootstrap, steps,
                  gamma, lam):
    """One trajectory at a time, backwards over its valid prefix, in Python floats."""
    adv_out, ret_out = [], []
    for i in range(len(rewards)):
        n = len(rewards[i])
        length = sum(1 for t in range(n) if valid[i][t])
        adv = [0.0] * n
        ret = [0.0] * n
        running = 0.0
        for t in range(length - 1, -1, -1):
            disc = gamma ** steps[i][t]
            if terminated[i][t]:
                nv, cont = 0.0, False
            elif truncated[i][t]:
                nv, cont = float(next_values[i][t]), False
            elif t + 1 < length:
                nv, cont = float(values[i][t + 1]), True
            else:
                nv, cont = float(bootstrap[i]), False
            delta = float(rewards[i][t]) + disc * nv - float(values[i][t])
            running = delta + (disc * lam * running if cont else 0.0)
            adv[t] = running
            ret[t] = running + float(values[i][t])
        adv_out.append(adv)
        ret_out.append(ret)
    return adv_out, ret_out


def monte_carlo_returns_ref(step_rewards, step_mask, terminated, truncated, next_values, bootstrap,
                            gamma):
    """Step-level discounted returns from each chunk start (lambda = 1 target), per trajectory.

    step_rewards, step_mask: [traj][chunk][step]; the episode is the valid prefix of chunks.
    """
    out = []
    for i in range(len(step_rewards)):
        n = len(step_rewards[i])
        row = [0.0] * n
        for t in range(n):
            if not any(step_mask[i][t]):
                continue
            total, k = 0.0, 0
            u = t
            while True:
                for r, m in zip(step_rewards[i][u], step_mask[i][u], strict=True):
                    if m:
                        total += gamma**k * float(r)
                        k += 1
                if terminated[i][u]:
                    break
                if truncated[i][u]:
                    total += gamma**k * float(next_values[i][u])
                    break
                if u + 1 >= n or not any(step_mask[i][u + 1]):
                    total += gamma**k * float(bootstrap[i])
                    break
                u += 1
            row[t] = total
        out.append(row)
    return out


def whiten_ref(values, mask, eps):
    xs = [float(v) for v, m in zip(values, mask, strict=True) if m]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1)
    return [((float(v) - mean) / math.sqrt(var + eps)) if m else 0.0 for v, m in zip(values, mask, strict=True)]


def value_loss_ref(values, returns, old_values, mask, clip, delta, loss_type):
    """Token-mean of the clipped Huber / squared value loss over flat lists."""

    def err(e):
        if loss_type == "mse":
            return 0.5 * e * e
        return 0.5 * e * e if abs(e) <= delta else delta * (abs(e) - 0.5 * delta)

    total, count = 0.0, 0
    for v, g, o, m in zip(values, returns, old_values, mask, strict=True):
        if not m:
            continue
        loss = err(v - g)
        if clip is not None:
            vc = o + min(max(v - o, -clip), clip)
            loss = max(loss, err(vc - g))
        total += loss
        count += 1
    return total / max(count, 1)
