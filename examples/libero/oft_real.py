"""The real OpenVLA-OFT modeling code behind the example's token interface.

`--tiny-real` and the real checkpoint both go through `OFTActionModel`, an `nn.Module` that
wraps `OpenVLAForActionPrediction` (openvla-oft's `prismatic/extern/hf/modeling_prismatic.py`)
and gives it the forward the policy calls, ``(input_ids, attention_mask, pixel_values)``:

- **labels.** OFT finds the action positions from ``labels`` (ids above
  ``ACTION_TOKEN_BEGIN_IDX = 31743``) and zeroes their input embeddings; without ``labels`` its
  forward fails. The wrapper passes -100 over the prompt, 31744 over the 56 action slots and the
  stop token (2) last, as OFT's own ``predict_action`` does.
- **attention.** Stock transformers is causal; OFT's parallel decoding was trained with a
  transformers fork with bidirectional attention. A forward pre-hook on the Llama decoder
  (``language_model.model``) replaces the 2D mask by a 4D one (`action_attention_mask`):
  ``"causal"`` (stock), ``"bidirectional"`` (causal, plus the last 57 positions, the 56 slots
  and the stop token, see each other) or ``"full"`` (every position sees every unpadded one).
- **padding.** Prismatic inserts the image patches after token 0, assuming a BOS there. Prompts
  are therefore laid out ``[BOS, PAD..., prompt, slots, stop]`` (`to_oft_layout`), the pads get
  attention 0, and the same hook passes ``position_ids = cumsum(mask) - 1`` (Prismatic's forward
  passes ``position_ids=None`` down, which would number the pads).

openvla-oft is not on PyPI; ``vla-arena==1.0.0`` bundles its ``prismatic`` package. Its
``prismatic/__init__`` imports a TensorFlow data stack, so `import_prismatic` registers empty
parent packages (with the real ``__path__``) and imports only the model files, unedited.
"""

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

PRISMATIC = "vla_arena.models.openvla_oft.prismatic"
IGNORE_INDEX = -100
ACTION_TOKEN_BEGIN_IDX = 31743  # OFT: ids above it are action tokens
SLOT_LABEL = ACTION_TOKEN_BEGIN_IDX + 1  # OFT's "arbitrary action token" label of a slot
STOP_ID = 2
BOS_ID = 1
EMPTY_ID = 29871  # the "" token OFT's predict_action puts after "Out:"
ATTENTIONS = ("causal", "bidirectional", "full")
ACTION_HEADS = ("tokens", "l1")
# Image normalisation of the two fused backbones (dinosiglip: DINOv2 = ImageNet, SigLIP = 0.5).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TESTED_TRANSFORMERS = "4.40."


def oft_available() -> tuple[bool, str]:
    """Whether the real OFT modeling code imports here (vla-arena, timm, transformers), and why not."""
    for name in ("vla_arena", "timm", "transformers", "diffusers"):
        if importlib.util.find_spec(name) is None:
            return False, f"`{name}` is not installed (see docs/libero.md, 'The real architecture')"
    try:
        import_prismatic()
    except Exception as exc:  # an ImportError, or a version clash raised at import
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


def import_prismatic() -> types.SimpleNamespace:
    """Import OFT's modeling, configuration, action-head and constants modules (not edited).

    Returns:
        A namespace with ``modeling``, ``configuration``, ``action_heads`` and ``constants``.

    Raises:
        ImportError: if vla-arena (or a dependency of the model files) is missing.
        RuntimeError: if OFT's platform constants are not LIBERO's (chunk 8, action dim 7); they
            are chosen from ``sys.argv``, and a command line naming "aloha" or "bridge" changes them.
    """
    base = importlib.import_module("vla_arena.models.openvla_oft")
    root = base.__path__[0] + "/prismatic"
    for sub in ("", ".models", ".vla", ".training"):
        name = PRISMATIC + sub
        if name not in sys.modules:  # an empty parent package: skips prismatic/__init__'s imports
            module = types.ModuleType(name)
            module.__path__ = [root + sub.replace(".", "/")]
            sys.modules[name] = module
    out = types.SimpleNamespace(
        constants=importlib.import_module(PRISMATIC + ".vla.constants"),
        configuration=importlib.import_module(PRISMATIC + ".extern.hf.configuration_prismatic"),
        modeling=importlib.import_module(PRISMATIC + ".extern.hf.modeling_prismatic"),
        action_heads=importlib.import_module(PRISMATIC + ".models.action_heads"),
    )
    got = (out.constants.NUM_ACTIONS_CHUNK, out.constants.ACTION_DIM)
    if got != (8, 7) or out.constants.ACTION_TOKEN_BEGIN_IDX != ACTION_TOKEN_BEGIN_IDX:
        raise RuntimeError(
            f"OFT's constants must be LIBERO's (chunk 8, action dim 7), got {got}; they are read "
            "from sys.argv, which must not name 'aloha' or 'bridge'."
        )
    return out


# ----------------------------------------------------------------------------- tiny config
@dataclass(frozen=True)
class TinyOFTSize:
    """The knobs of a randomly initialised OFT: the Llama decoder and the two timm ViTs.

    The default (hidden 64, 2 layers, two ``vit_tiny_patch16_224`` backbones, 2 images) has
    15.9 M parameters, 392 image patches per sample.
    """

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 2
    timm_id: str = "vit_tiny_patch16_224"
    num_images: int = 2
    image_size: int = 224  # the ViTs' input (OFT: 224); smaller only to make CPU benchmarks fit

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _check_size(size: Any) -> TinyOFTSize:
    if not isinstance(size, TinyOFTSize):
        raise TypeError(f"`size` must be a TinyOFTSize, got {type(size).__name__}.")
    for name in ("hidden", "intermediate", "layers", "heads", "num_images", "image_size"):
        value = getattr(size, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`size.{name}` must be a positive int, got {value!r}.")
    if size.hidden % size.heads:
        raise ValueError(
            f"`size.hidden` must be divisible by `size.heads` ({size.heads}), got {size.hidden}."
        )
    return size


def build_tiny_oft(size: TinyOFTSize, norm_stats: dict[str, Any], *, seed: int = 0) -> nn.Module:
    """`OpenVLAForActionPrediction` at a tiny config, random weights (no download).

    The real class and config: fused DINOv2 + SigLIP backbone (`dinosiglip-vit-so-224px`, here two
    timm `size.timm_id` ViTs), the fused GELU MLP projector, a Llama-2 decoder with the padded
    vocabulary (32064), 256 action bins, `size.num_images` images per sample.

    Args:
        size: the `TinyOFTSize`.
        norm_stats: OFT's ``{unnorm_key: {"action": {"q01", "q99", "mask"}}}``.
        seed: the torch seed of the initialisation.
    """
    size = _check_size(size)
    oft = import_prismatic()
    config = oft.configuration.OpenVLAConfig(
        vision_backbone_id="dinosiglip-vit-so-224px",
        llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp",
        text_config={
            "hidden_size": size.hidden,
            "intermediate_size": size.intermediate,
            "num_hidden_layers": size.layers,
            "num_attention_heads": size.heads,
            "num_key_value_heads": size.heads,
            "vocab_size": 32064,
        },
        norm_stats=norm_stats,
        n_action_bins=256,
    )
    config.timm_model_ids = [size.timm_id, size.timm_id]
    config.image_sizes = [size.image_size, size.image_size]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = oft.modeling.OpenVLAForActionPrediction(config)
    model.vision_backbone.set_num_images_in_input(size.num_images)
    return model


def build_l1_head(hidden: int, *, seed: int = 0) -> nn.Module:
    """OFT's `L1RegressionActionHead` (MLP-ResNet on the 7 hidden states of each action step)."""
    oft = import_prismatic()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return oft.action_heads.L1RegressionActionHead(
            input_dim=hidden, hidden_dim=hidden, action_dim=7
        )


# ----------------------------------------------------------------------------- layout
def to_oft_layout(input_ids: Tensor, attention_mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Move each left-padded row's first token (its BOS) to position 0: ``[BOS, PAD..., prompt]``.

    Prismatic inserts the image patches after position 0, so the BOS must be there; a plain left
    padded batch ``[PAD..., BOS, prompt]`` would put the patches after a pad.

    Raises:
        ValueError: if the shapes differ, a row is empty, or its first kept token is not BOS.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            "`input_ids` and `attention_mask` must be 2D of one shape, got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}."
        )
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("`attention_mask` must keep at least one token per row, got an empty row.")
    first = keep.long().argmax(1)
    bos = input_ids.gather(1, first[:, None])[:, 0]
    if bool((bos != BOS_ID).any()):
        raise ValueError(f"each row's first kept token must be BOS ({BOS_ID}), got {bos.tolist()}.")
    ids = torch.full_like(input_ids, pad_id)
    mask = torch.zeros_like(attention_mask)
    ids[:, 0], mask[:, 0] = BOS_ID, 1
    for row in range(ids.shape[0]):
        rest = input_ids[row, int(first[row]) + 1 :]
        if rest.numel():
            ids[row, -rest.numel() :] = rest
            mask[row, -rest.numel() :] = 1
    return ids, mask


def end_with_empty_token(
    input_ids: Tensor, attention_mask: Tensor, pad_id: int
) -> tuple[Tensor, Tensor]:
    """Append OFT's "" token (29871) to rows that do not end with it, dropping one left pad.

    OFT's ``predict_action`` forces it after ``Out:``; its training prompts end with it.

    Raises:
        ValueError: if a row that needs the token has no pad to spare.
    """
    need = input_ids[:, -1] != EMPTY_ID
    if not bool(need.any()):
        return input_ids, attention_mask
    if bool((need & attention_mask.bool().all(1)).any()):
        raise ValueError("`prompt_len` is too short to append OFT's '' token (29871); raise it.")
    ids = torch.where(need[:, None], torch.roll(input_ids, -1, 1), input_ids)
    mask = torch.where(need[:, None], torch.roll(attention_mask, -1, 1), attention_mask)
    ids[need, -1], mask[need, -1] = EMPTY_ID, 1
    # roll moved the row's first (left-most) pad to the end; it was overwritten above.
    return ids, mask


# ----------------------------------------------------------------------------- attention
def action_attention_mask(mask: Tensor, tail: int, kind: str) -> Tensor:
    """`(B, 1, L, L)` bool: which keys each query may attend to.

    Args:
        mask: `(B, L)` 0/1 padding mask of the multimodal sequence (after Prismatic's patches).
        tail: the number of trailing positions that see each other under ``"bidirectional"``
            (56 action slots + the stop token = 57).
        kind: ``"causal"``, ``"bidirectional"`` or ``"full"``.

    Padded keys are never attended to; a padded query keeps its causal row (its output is
    never read), so that no row is all masked.
    """
    if kind not in ATTENTIONS:
        raise ValueError(f"`kind` must be one of {ATTENTIONS}, got {kind!r}.")
    length = mask.shape[1]
    if not 0 < tail <= length:
        raise ValueError(f"`tail` must be in [1, {length}], got {tail}.")
    pos = torch.arange(length, device=mask.device)
    allowed = pos[None, :] <= pos[:, None]  # (q, k) causal
    if kind == "bidirectional":
        in_tail = pos >= length - tail
        allowed = allowed | (in_tail[:, None] & in_tail[None, :])
    elif kind == "full":
        allowed = torch.ones_like(allowed)
    keys = mask.bool()[:, None, None, :]
    return allowed[None, None] & keys


def _four_d_for_transformers(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """The 4D mask in the convention of the installed transformers (only 4.40.x is tested).

    transformers 4.40 reads a 4D mask as 1 = attend, 0 = masked; later versions take it as the
    additive mask itself (0 = attend, the dtype's minimum = masked).
    """
    import transformers

    if transformers.__version__.startswith(TESTED_TRANSFORMERS):
        return allowed.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class OFTActionModel(nn.Module):
    """OFT with the example's forward: labels, action attention and padding handled here.

    Args:
        oft: an `OpenVLAForActionPrediction` (tiny random or a real checkpoint).
        attention: ``"causal"``, ``"bidirectional"`` (default) or ``"full"``, see the module doc.
        action_head: an optional `L1RegressionActionHead`, held here so that `.to`, the optimiser
            and DDP see it.
        tokens_per_chunk: 56 (8 steps x 7 dims).
    """

    def __init__(
        self,
        oft: nn.Module,
        *,
        attention: str = "bidirectional",
        action_head: nn.Module | None = None,
        tokens_per_chunk: int = 56,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"`attention` must be one of {ATTENTIONS}, got {attention!r}.")
        import transformers

        if not transformers.__version__.startswith(TESTED_TRANSFORMERS):
            raise RuntimeError(
                f"the OFT path is tested with transformers {TESTED_TRANSFORMERS}x (the version "
                f"openvla-oft pins), got {transformers.__version__}."
            )
        self.oft, self.action_head = oft, action_head
        self.attention, self.tokens_per_chunk = attention, tokens_per_chunk
        self.config = oft.config
        decoder = oft.language_model.model  # the LlamaModel under LlamaForCausalLM
        decoder.register_forward_pre_hook(self._decoder_hook, with_kwargs=True)

    def _decoder_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        mask = kwargs.get("attention_mask")
        embeds = kwargs.get("inputs_embeds")
        if mask is None or mask.dim() != 2 or embeds is None:
            return None  # not the multimodal forward (e.g. cached generation): leave it alone
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        allowed = action_attention_mask(mask, self.tokens_per_chunk + 1, self.attention)
        kwargs["attention_mask"] = _four_d_for_transformers(allowed, embeds.dtype)
        return args, kwargs

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.oft.gradient_checkpointing_enable(**kwargs)

    def labels(self, input_ids: Tensor) -> Tensor:
        """-100 over the prompt, 31744 over the slots, 2 at the stop token (OFT's layout)."""
        k = self.tokens_per_chunk
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, -k - 1 : -1] = SLOT_LABEL
        labels[:, -1] = STOP_ID
        return labels

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        output_hidden_states: bool = False,
        **_unused: Any,
    ) -> Any:
        """`input_ids` end with the 56 slots and the stop token.

        Returns:
            A namespace with ``logits`` `(B, L', 32064)` over the multimodal sequence (read the
            action logits at ``[:, -58:-2]``), ``hidden_states`` (when asked for, or with an
            action head) and ``actions``: the L1 head's `(B, 8, 7)` normalised actions, read from
            the last hidden states at the same positions as OFT does, or None without a head.
        """
        if input_ids.shape[1] <= self.tokens_per_chunk + 1:
            raise ValueError(
                f"`input_ids` must hold a prompt, {self.tokens_per_chunk} slots and the stop "
                f"token, got length {input_ids.shape[1]}."
            )
        want_hidden = output_hidden_states or self.action_head is not None
        out = self.oft(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            labels=self.labels(input_ids),
            output_hidden_states=want_hidden,
            return_dict=True,
        )
        actions = None
        if self.action_head is not None:
            k = self.tokens_per_chunk
            hidden = out.hidden_states[-1][:, -k - 2 : -2]
            actions = self.action_head.predict_action(hidden.to(_dtype_of(self.action_head)))
        hidden_states = out.hidden_states if want_hidden else None
        return types.SimpleNamespace(
            logits=out.logits, hidden_states=hidden_states, actions=actions
        )


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# ----------------------------------------------------------------------------- images
def dinosiglip_image_processor(size: int = 224) -> Any:
    """``uint8 (E, H, W, 3)`` arrays (one per camera) -> ``(E, 6 x cameras, size, size)``.

    Each image is resized (bilinear, antialiased) and stacked twice, ImageNet-normalised for the
    DINOv2 backbone (the first featurizer) then 0.5-normalised for SigLIP (the fused one), as
    Prismatic's fused image transform does;
    cameras are concatenated along the channels (OFT's multi-image input). The real checkpoint
    path uses the checkpoint's own processor instead.
    """

    def norm(x: Tensor, mean: tuple, std: tuple) -> Tensor:
        m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - m) / s

    def process(*cameras: np.ndarray) -> Tensor:
        out = []
        for images in cameras:
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
            if x.shape[-1] != size or x.shape[-2] != size:
                x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            out += [norm(x, IMAGENET_MEAN, IMAGENET_STD), norm(x, SIGLIP_MEAN, SIGLIP_STD)]
        return torch.cat(out, 1)

    return process
