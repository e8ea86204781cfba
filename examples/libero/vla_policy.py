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
    """Deterministic word-hash tokenizer for the smoke model (ids in [3, 31744), left padded)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = torch.full((len(texts), self.length), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(texts), self.length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [1] + [3 + zlib.crc32(w.encode()) % 31000 for w in text.split()]
            words = words[-self.length :]
            ids[row, self.length - len(words) :] = torch.tensor(words)
            mask[row, self.length - len(words) :] = 1
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

    # ----------------------------------------------------------------- inputs
    def prepare(self, obs: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
        """Model inputs of one observation batch (what is stored per chunk for the update)."""
        prompts = [PROMPT.format(text.lower()) for text in obs["instruction"]]
        input_ids, attention_mask = self.prompt_tokenizer(prompts)
        pixel_values = self.image_processor(obs["image"])
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
        q01, q99, m = (t.to(norm.device) for t in (self.q01, self.q99, self.norm_mask))
        raw = torch.where(m, 0.5 * (norm + 1.0) * (q99 - q01) + q01, norm)
        env = raw.clone()
        env[..., -1] = model_to_env_gripper(raw[..., -1])
        return norm, env


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
) -> ChunkTokenPolicy:
    """OpenVLA-OFT from a local checkpoint (``trust_remote_code``) with LoRA ``r = alpha = 32``.

    Not run here (no weights, no GPU). The remote code of openvla-oft targets the transformers
    version it pins; use that version for real runs.
    """
    import transformers
    from transformers import AutoProcessor

    auto = (
        getattr(transformers, "AutoModelForVision2Seq", None)
        or transformers.AutoModelForImageTextToText
    )
    model = auto.from_pretrained(
        path, torch_dtype=dtype, trust_remote_code=True, low_cpu_mem_usage=True
    )
    inject_lora(model, r=lora_r, alpha=lora_alpha, targets="all-linear")
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
        return enc["input_ids"], enc["attention_mask"]

    def image_processor(images: np.ndarray) -> Tensor:
        from PIL import Image

        pil = [Image.fromarray(img) for img in images]
        return processor.image_processor(pil, return_tensors="pt")["pixel_values"].to(dtype)

    stats = model.norm_stats[unnorm_key]["action"]
    stats = {"q01": stats["q01"], "q99": stats["q99"], "mask": stats.get("mask", [True] * 7)}
    return ChunkTokenPolicy(model, codec, prompt_tokenizer, image_processor, stats, decode=decode)
