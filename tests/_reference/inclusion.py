"""Test helper: attach packed `(M,)` inclusion probabilities to a `Selection`."""

import torch


def with_packed_inclusion(selection, packed):
    """`selection` carrying `packed` (in packed order) as its per-slot `inclusion`.

    None passes through, so `with_packed_inclusion(sel, pi if ht else None)` reads naturally.
    """
    if packed is None or selection is None:
        return selection
    packed = torch.as_tensor(packed, device=selection.mask.device)
    if not packed.is_floating_point():
        packed = packed.to(torch.float32)
    slot = torch.ones(selection.mask.shape, dtype=packed.dtype, device=selection.mask.device)
    slot[selection.mask] = packed
    return selection._replace(inclusion=slot)


_CLIP = {"clip_low": "low", "clip_high": "high", "dual_clip": "dual",
         "log_ratio_clamp": "log_ratio_clamp"}
_REG = ("entropy", "entropy_coef", "ref_logp", "kl_coef", "kl_type")
_BEH = {"behaviour_weight_cap": "cap", "behaviour_weight_floor": "floor", "cap_mode": "mode"}
_NORM = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def loss_kwargs(**kw):
    """Keywords in the flat per-option spelling, grouped into the losses' option groups.

    Lets table-driven tests list flat cases (`clip_high=0.4`, `dp_size=2`, `inclusion=pi`) and
    call the grouped API (`clip=Clip(...)`, `norms=LossNormalizers(...)`, a selection carrying
    its inclusion probabilities).
    """
    from chunkmask import Behaviour, Clip, LossNormalizers, Regularizers

    bounds = {_BEH[k]: kw.pop(k) for k in list(kw) if k in _BEH}
    if "behaviour_logp" in kw:
        kw["behaviour"] = Behaviour(kw.pop("behaviour_logp"), **bounds)
    elif bounds and "behaviour" in kw:
        kw["behaviour"] = kw["behaviour"]._replace(**bounds)
    clip = {_CLIP[k]: kw.pop(k) for k in list(kw) if k in _CLIP}
    reg = {k: kw.pop(k) for k in list(kw) if k in _REG}
    norm = {k: kw.pop(k) for k in list(kw) if k in _NORM}
    if "inclusion" in kw:
        kw["selection"] = with_packed_inclusion(kw.get("selection"), kw.pop("inclusion"))
    if clip:
        kw["clip"] = Clip(**clip)
    if reg and any(v is not None for v in reg.values()):
        base = kw.pop("regularizers", None)
        kw["regularizers"] = (base or Regularizers())._replace(**reg)
    if norm:
        kw["norms"] = (kw.get("norms") or LossNormalizers())._replace(**norm)
    return kw
