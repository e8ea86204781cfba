"""The policy side: an OpenVLA(-OFT) token policy with LoRA, and a tiny stand-in for `--smoke`.

`ChunkTokenPolicy` wraps any transformers-style VLA whose forward takes ``input_ids``,
``attention_mask`` and ``pixel_values`` and returns logits over a padded vocabulary (OpenVLA:
32000 Llama-2 tokens + 64 pad). One action chunk is `H x D = 8 x 7 = 56` action tokens, coded by
`chunkmask.ActionTokenizer` (OpenVLA's 256 bins). Two decoding modes:

- ``"parallel"`` (openvla-oft): the prompt is followed by 56 placeholder tokens and a stop token,
  and one forward gives the logits of every action position (OFT zeroes the embeddings of the
  action positions, so the placeholder values do not matter). `log_prob` runs the same forward.
- ``"autoregressive"`` (OpenVLA): the 56 tokens are sampled one at a time with a KV cache;
  `log_prob` teacher-forces the sampled tokens in one forward.

Either way the logits that predict action token `j` are read from the end of the sequence, so a
vision prefix of any length (the patch embeddings Prismatic inserts) does not change the indexing.
"""

import inspect
import zlib
from typing import Any

import numpy as np
import torch
from libero_envs import model_to_env_gripper
from oft_real import (
    ACTION_HEADS,
    BOS_ID,
    EMPTY_ID,
    OFTActionModel,
    TinyOFTSize,
    build_l1_head,
    build_tiny_oft,
    dinosiglip_image_processor,
    end_with_empty_token,
    to_oft_layout,
)
from torch import Tensor, nn

from chunkmask import ActionTokenizer

PROMPT = "In: What action should the robot take to {}?\nOut:"
PAD_ID = 32000  # OpenVLA's pad token, the first of the 64 after the Llama-2 vocabulary
STOP_ID = 2  # </s>
LORA_TARGETS_SMOKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TinyVLA(nn.Module):
    """A randomly initialised VLA with OpenVLA's token interface, for tests and `--smoke`.

    A Llama decoder from transformers (vocabulary 32000 + 64 pad) and an image-encoder stand-in
    (a strided convolution whose patches are prepended to the text, as Prismatic does). Same
    forward arguments as OpenVLA: ``input_ids``, ``attention_mask``, ``pixel_values`` and a
    KV cache.
    """

    def __init__(self, *, hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=32064,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=PAD_ID,
            tie_word_embeddings=False,
        )
        self.config = config
        self.lm = LlamaForCausalLM(config)
        self.vision = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)
        self.num_patches = (image_size // patch) ** 2
        self._cache_kw = _cache_keyword(self.lm.forward)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.lm.gradient_checkpointing_enable(**kwargs)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
    ) -> Any:
        embeds = self.lm.get_input_embeddings()(input_ids)
        batch = input_ids.shape[0]
        prefix = torch.ones(
            batch, self.num_patches, dtype=attention_mask.dtype, device=embeds.device
        )
        mask = torch.cat([prefix, attention_mask], 1)
        if pixel_values is not None:  # the first call: prepend the image patches
            patches = self.vision(pixel_values.to(embeds.dtype)).flatten(2).transpose(1, 2)
            embeds = torch.cat([patches, embeds], 1)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -embeds.shape[1] :]
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=use_cache,
            **kwargs,
        )


def _cache_keyword(forward: Any) -> str:
    """``cache`` in transformers >= 5, ``past_key_values`` before."""
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out: Any) -> Any:
    cache = out.get("cache", None) if hasattr(out, "get") else None
    return cache if cache is not None else getattr(out, "past_key_values", None)


class HashPromptTokenizer:
    """Deterministic word-hash tokenizer for the random models (ids in [3, 31744), left padded).

    Layouts: ``"left"`` is ``[PAD..., BOS, words]``; ``"oft"`` is ``[BOS, PAD..., words, ""]``,
    the layout the real OFT model needs (Prismatic puts the image patches after position 0, and
    OFT's prompts end with the "" token 29871), see `oft_real.to_oft_layout`.
    """

    def __init__(self, length: int, layout: str = "left") -> None:
        if layout not in ("left", "oft"):
            raise ValueError(f"`layout` must be 'left' or 'oft', got {layout!r}.")
        if not isinstance(length, int) or length < (3 if layout == "oft" else 1):
            raise ValueError(f"`length` must be an int >= 3 for 'oft', >= 1 else; got {length!r}.")
        self.length, self.layout = length, layout

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = torch.full((len(texts), self.length), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(texts), self.length, dtype=torch.long)
        for row, text in enumerate(texts):
            body = [3 + zlib.crc32(w.encode()) % 31000 for w in text.split()]
            if self.layout == "oft":
                words = [BOS_ID] + body[-(self.length - 2) :] + [EMPTY_ID]
            else:
                words = ([BOS_ID] + body)[-self.length :]
            ids[row, self.length - len(words) :] = torch.tensor(words)
            mask[row, self.length - len(words) :] = 1
        if self.layout == "oft":
            ids, mask = to_oft_layout(ids, mask, PAD_ID)
        return ids, mask


class ChunkTokenPolicy:
    """Sample and score action chunks of a token VLA.

    Args:
        model: the VLA (LoRA already injected).
        codec: the `ActionTokenizer`.
        prompt_tokenizer: ``texts -> (input_ids, attention_mask)``, left padded to a fixed length.
        image_processor: ``uint8 (E, H, W, 3) numpy -> pixel_values`` tensor.
        norm_stats: ``{"q01", "q99", "mask"}`` of the action normalisation (OpenVLA's
            ``norm_stats[unnorm_key]["action"]``); the gripper's raw value is in [0, 1],
            0 = close, 1 = open.
        chunk_steps, action_dim: `H` and `D`.
        decode: ``"parallel"`` or ``"autoregressive"``.
        image_keys: the observation's cameras passed, in order, to `image_processor`
            (``("image",)``; ``("image", "wrist")`` for OFT's two-image input).
    """

    def __init__(
        self,
        model: nn.Module,
        codec: ActionTokenizer,
        prompt_tokenizer: Any,
        image_processor: Any,
        norm_stats: dict[str, Any],
        *,
        chunk_steps: int = 8,
        action_dim: int = 7,
        decode: str = "autoregressive",
        image_keys: tuple[str, ...] = ("image",),
    ) -> None:
        if decode not in ("parallel", "autoregressive"):
            raise ValueError(f"`decode` must be 'parallel' or 'autoregressive', got {decode!r}.")
        self.model, self.codec = model, codec
        self.train_model: nn.Module = model  # replaced by the DDP / FSDP2 wrapper in train.py
        self.prompt_tokenizer, self.image_processor = prompt_tokenizer, image_processor
        self.q01 = torch.as_tensor(np.asarray(norm_stats["q01"]), dtype=torch.float32)
        self.q99 = torch.as_tensor(np.asarray(norm_stats["q99"]), dtype=torch.float32)
        self.norm_mask = torch.as_tensor(np.asarray(norm_stats["mask"]), dtype=torch.bool)
        self.chunk_steps, self.action_dim, self.decode = chunk_steps, action_dim, decode
        self.tokens_per_chunk = chunk_steps * action_dim
        self.image_keys = tuple(image_keys)

    # ----------------------------------------------------------------- inputs
    def prepare(self, obs: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
        """Model inputs of one observation batch (what is stored per chunk for the update)."""
        prompts = [PROMPT.format(text.lower()) for text in obs["instruction"]]
        input_ids, attention_mask = self.prompt_tokenizer(prompts)
        pixel_values = self.image_processor(*(obs[key] for key in self.image_keys))
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "pixel_values": pixel_values.to(device),
        }

    def _action_inputs(self, inputs: dict[str, Tensor], tokens: Tensor | None) -> dict[str, Any]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        batch, k = ids.shape[0], self.tokens_per_chunk
        if self.decode == "parallel":
            slots = torch.full((batch, k), PAD_ID, dtype=ids.dtype, device=ids.device)
            stop = torch.full((batch, 1), STOP_ID, dtype=ids.dtype, device=ids.device)
            ids = torch.cat([ids, slots, stop], 1)
        else:
            assert tokens is not None
            ids = torch.cat([ids, tokens.to(ids.dtype)], 1)
        mask = torch.cat([mask, torch.ones_like(ids[:, mask.shape[1] :], dtype=mask.dtype)], 1)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["pixel_values"]}

    def action_logits(
        self, inputs: dict[str, Tensor], tokens: Tensor | None = None, *, train: bool = False
    ) -> Tensor:
        """`(B, 56, V')` logits that predict the chunk's action tokens (teacher-forced).

        With `train`, the forward goes through `train_model` (the DDP / FSDP2 wrapper, if any).
        """
        model = self.train_model if train else self.model
        out = model(**self._action_inputs(inputs, tokens))
        k = self.tokens_per_chunk
        end = -2 if self.decode == "parallel" else -1  # after the stop token / the last action
        return out.logits[:, end - k : end]

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        inputs: dict[str, Tensor],
        *,
        temperature: float,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Sample one chunk of tokens per row: `(B, 56)` ids and their behaviour log-probs."""

        def draw(logits: Tensor) -> Tensor:
            if greedy:
                return self.codec.bin_logits(logits).argmax(-1) + self.codec.token_begin
            return self.codec.sample(logits, temperature=temperature, generator=generator)

        if self.decode == "parallel":
            logits = self.action_logits(inputs)
            tokens = draw(logits)
            return tokens, self.codec.log_prob(logits, tokens, temperature=temperature)
        # Autoregressive with a KV cache: one prefix forward, then one token per forward.
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        cache_kw = _cache_keyword(self.model.forward)
        out = self.model(
            input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=True
        )
        tokens, logps = [], []
        for _ in range(self.tokens_per_chunk):
            logits = out.logits[:, -1]
            token = draw(logits)
            tokens.append(token)
            logps.append(self.codec.log_prob(logits, token, temperature=temperature))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            cache = {cache_kw: _output_cache(out)}
            out = self.model(input_ids=token[:, None], attention_mask=mask, use_cache=True, **cache)
        return torch.stack(tokens, 1), torch.stack(logps, 1)

    def log_prob(
        self, inputs: dict[str, Tensor], tokens: Tensor, *, temperature: float
    ) -> tuple[Tensor, Tensor]:
        """`(M, 56)` log-probs of `tokens` and the per-token entropy (the actor's big forward)."""
        logits = self.action_logits(inputs, tokens, train=True)
        return (
            self.codec.log_prob(logits, tokens, temperature=temperature),
            self.codec.entropy(logits, temperature=temperature),
        )

    # ----------------------------------------------------------------- actions
    def actions(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Decode `(B, 56)` tokens to normalised actions and environment actions, `(B, H, D)` each.

        The environment actions are un-normalised with the q01/q99 statistics, and their gripper
        is converted once to LIBERO's convention (-1 open, +1 close).
        """
        norm = self.codec.decode(tokens).view(-1, self.chunk_steps, self.action_dim)
        return norm, self.env_actions(norm)

    def env_actions(self, norm: Tensor) -> Tensor:
        """Normalised `(B, H, D)` actions -> environment actions (q01/q99, LIBERO's gripper)."""
        q01, q99, m = (t.to(norm.device) for t in (self.q01, self.q99, self.norm_mask))
        raw = torch.where(m, 0.5 * (norm + 1.0) * (q99 - q01) + q01, norm)
        env = raw.clone()
        env[..., -1] = model_to_env_gripper(raw[..., -1])
        return env


class ChunkGaussianL1Policy(ChunkTokenPolicy):
    """OFT's L1 regression head as the mean of a fixed-std Gaussian, for RL log-probs.

    The head (`L1RegressionActionHead`) predicts one normalised chunk `(8, 7)` deterministically,
    so it has no likelihood of its own. Here a sampled chunk is ``a = mu + std * eps`` per
    dimension, with `mu` the head's output and a fixed `std`; the 56 per-dimension Gaussian
    log-densities take the place of the 56 token log-probs (the same `(B, 56)` shape, so GRPO
    and PCM run unchanged). The sampling temperature is not used (`std` is the exploration
    knob); the entropy is the Gaussian's, a constant, so the entropy bonus has no gradient.
    `greedy` returns `mu`. The stored "tokens" are the unclipped normalised samples; the
    environment gets them clipped to [-1, 1].

    Args:
        std: the Gaussian's standard deviation in normalised action units, > 0.
        (the rest as `ChunkTokenPolicy`; decoding is OFT's parallel one.)
    """

    def __init__(self, *args: Any, std: float, **kwargs: Any) -> None:
        kwargs["decode"] = "parallel"
        super().__init__(*args, **kwargs)
        if isinstance(std, bool) or not isinstance(std, int | float) or not std > 0:
            raise ValueError(f"`std` must be a positive number, got {std!r}.")
        self.std = float(std)

    def action_mean(self, inputs: dict[str, Tensor], *, train: bool = False) -> Tensor:
        """`(B, 56)` normalised chunk predicted by the L1 head (teacher-forcing free)."""
        model = self.train_model if train else self.model
        out = model(**self._action_inputs(inputs, None))
        if getattr(out, "actions", None) is None:
            raise TypeError("`model` must be an OFTActionModel with an `action_head`.")
        return out.actions.reshape(out.actions.shape[0], self.tokens_per_chunk)

    def _gaussian(self, mean: Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(mean.float(), self.std)

    @torch.no_grad()
    def sample(
        self,
        inputs: dict[str, Tensor],
        *,
        temperature: float,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """`(B, 56)` normalised samples and their Gaussian log-densities (temperature unused)."""
        mean = self.action_mean(inputs).float()
        if greedy:
            actions = mean
        else:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device)
            actions = mean + self.std * noise
        return actions, self._gaussian(mean).log_prob(actions)

    def log_prob(
        self, inputs: dict[str, Tensor], tokens: Tensor, *, temperature: float
    ) -> tuple[Tensor, Tensor]:
        """`(M, 56)` Gaussian log-densities of the stored samples and the (constant) entropy."""
        dist = self._gaussian(self.action_mean(inputs, train=True))
        return dist.log_prob(tokens.float()), dist.entropy()

    def actions(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """`(B, 56)` samples -> clipped normalised actions and environment actions, `(B, H, D)`."""
        norm = tokens.float().clamp(-1.0, 1.0).view(-1, self.chunk_steps, self.action_dim)
        return norm, self.env_actions(norm)


def smoke_image_processor(size: int) -> Any:
    def process(images: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != size:
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return (x - 0.5) / 0.5

    return process


def inject_lora(
    model: nn.Module, *, r: int, alpha: int, targets: Any, dropout: float = 0.0
) -> None:
    """Add LoRA adapters in place (peft) and freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable (LoRA) parameters by name, on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def build_smoke_policy(
    codec: ActionTokenizer,
    *,
    image_size: int,
    prompt_len: int,
    lora_r: int,
    lora_alpha: int,
    decode: str = "parallel",
) -> ChunkTokenPolicy:
    """The tiny randomly initialised VLA with LoRA (`--smoke`)."""
    model = TinyVLA(image_size=image_size)
    inject_lora(model, r=lora_r, alpha=lora_alpha, targets=LORA_TARGETS_SMOKE)
    # Make the LoRA B matrices non-zero so that the update changes the policy visibly.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    stats = {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mask": [True] * 7}
    return ChunkTokenPolicy(
        model,
        codec,
        HashPromptTokenizer(prompt_len),
        smoke_image_processor(image_size),
        stats,
        decode=decode,
    )


TINY_REAL_STATS = {
    "q01": [-1.0] * 6 + [0.0],
    "q99": [1.0] * 6 + [1.0],
    "mask": [True] * 6 + [False],
}


def build_tiny_real_policy(
    codec: ActionTokenizer,
    *,
    prompt_len: int,
    lora_r: int,
    lora_alpha: int,
    attention: str = "bidirectional",
    action_head: str = "tokens",
    l1_std: float = 0.1,
    size: TinyOFTSize | None = None,
    seed: int = 0,
) -> ChunkTokenPolicy:
    """The real `OpenVLAForActionPrediction` at a tiny random config, LoRA on all linear layers.

    `action_head` ``"tokens"``: the 256-bin token head (`ChunkTokenPolicy`); ``"l1"``: OFT's
    `L1RegressionActionHead` (trained in full, as OFT does) under a fixed-std Gaussian
    (`ChunkGaussianL1Policy`). Two cameras (agent view and wrist), as OFT's LIBERO checkpoints.
    """
    if action_head not in ACTION_HEADS:
        raise ValueError(f"`action_head` must be one of {ACTION_HEADS}, got {action_head!r}.")
    size = TinyOFTSize() if size is None else size
    stats = {"libero_spatial_no_noops": {"action": TINY_REAL_STATS}}
    oft = build_tiny_oft(size, stats, seed=seed)
    inject_lora(oft, r=lora_r, alpha=lora_alpha, targets="all-linear")
    with torch.no_grad():  # non-zero LoRA B, so that one update changes the policy visibly
        gen = torch.Generator().manual_seed(seed)
        for name, param in oft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    head = build_l1_head(size.hidden, seed=seed) if action_head == "l1" else None
    model = OFTActionModel(oft, attention=attention, action_head=head)
    common = dict(
        model=model,
        codec=codec,
        prompt_tokenizer=HashPromptTokenizer(prompt_len, layout="oft"),
        image_processor=dinosiglip_image_processor(size.image_size),
        norm_stats=TINY_REAL_STATS,
        image_keys=("image", "wrist")[: size.num_images],
    )
    if head is not None:
        return ChunkGaussianL1Policy(**common, std=l1_std)
    return ChunkTokenPolicy(**common, decode="parallel")


def build_openvla_oft_policy(
    path: str,
    codec: ActionTokenizer,
    *,
    unnorm_key: str,
    lora_r: int = 32,
    lora_alpha: int = 32,
    dtype: torch.dtype = torch.bfloat16,
    prompt_len: int = 64,
    decode: str = "parallel",
    attention: str = "bidirectional",
) -> ChunkTokenPolicy:
    """OpenVLA-OFT from a local checkpoint (``trust_remote_code``) with LoRA ``r = alpha = 32``.

    The token path, through `OFTActionModel` (labels, action attention, BOS-first padding) as in
    `--tiny-real`; the cameras follow the checkpoint's ``num_images_in_input``. Not run here (no
    weights, no GPU); needs transformers 4.40.x, the version openvla-oft pins.

    Raises:
        ValueError: if `decode` is not ``"parallel"`` (Prismatic's cached generation takes one
            sample at a time, and OFT was trained for parallel decoding).
    """
    if decode != "parallel":
        raise ValueError(f"`decode` must be 'parallel' for OpenVLA-OFT, got {decode!r}.")
    import transformers
    from transformers import AutoProcessor

    auto = (
        getattr(transformers, "AutoModelForVision2Seq", None)
        or transformers.AutoModelForImageTextToText
    )
    oft = auto.from_pretrained(
        path, torch_dtype=dtype, trust_remote_code=True, low_cpu_mem_usage=True
    )
    inject_lora(oft, r=lora_r, alpha=lora_alpha, targets="all-linear")
    model = OFTActionModel(oft, attention=attention)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    tokenizer = processor.tokenizer

    def prompt_tokenizer(texts: list[str]) -> tuple[Tensor, Tensor]:
        enc = tokenizer(
            texts,
            padding="max_length",
            max_length=prompt_len,
            truncation=True,
            padding_side="left",
            return_tensors="pt",
        )
        ids, mask = end_with_empty_token(enc["input_ids"], enc["attention_mask"], PAD_ID)
        return to_oft_layout(ids, mask, PAD_ID)

    def image_processor(*cameras: np.ndarray) -> Tensor:
        from PIL import Image

        out = []
        for images in cameras:
            pil = [Image.fromarray(img) for img in images]
            out.append(processor.image_processor(pil, return_tensors="pt")["pixel_values"])
        return torch.cat(out, 1).to(dtype)

    cameras = oft.vision_backbone.get_num_images_in_input()
    stats = oft.norm_stats[unnorm_key]["action"]
    stats = {"q01": stats["q01"], "q99": stats["q99"], "mask": stats.get("mask", [True] * 7)}
    return ChunkTokenPolicy(
        model,
        codec,
        prompt_tokenizer,
        image_processor,
        stats,
        decode=decode,
        image_keys=("image", "wrist")[:cameras],
    )
