"""The model: the Qwen2.5 language model (loads the public checkpoints exactly), the vision->LLM projector,
TinyGroundingGPT (vision towers + projector + LLM; image and object features replace placeholder tokens),
and fast generation over a static, preallocated KV cache.

Precision: weights run in the dtype they are loaded in; RMSNorm, RoPE angles, the attention softmax and
the loss are computed in fp32 (the numerics of transformers' Qwen2, which the tests check to 1e-5).
"""

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import save_file

from encoders import MultiScaleEncoder, VisionConfig, check_field_types, load_strict, read_json_config

# ----------------------------------------------------------------------------- Qwen2.5 language model


@dataclass
class Qwen2Config:
    """Defaults are Qwen2.5-3B; `from_hf` reads a Hub config.json."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768

    def __post_init__(self):
        check_field_types(self)
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if self.hidden_size % heads or heads % kv_heads:
            raise ValueError(f"Qwen2Config: hidden_size={self.hidden_size} must divide by num_attention_heads"
                             f"={self.num_attention_heads}, which must divide by num_key_value_heads"
                             f"={self.num_key_value_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hub: dict, source: str = "config.json") -> "Qwen2Config":
        """From a Hub config.json. Older files carry `rope_theta`, transformers 5 writes `rope_parameters`."""
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"]
        if missing := [k for k in required if k not in hub]:
            raise ValueError(f"{source}: missing Qwen2 fields {missing}")
        rope = hub.get("rope_parameters") or {}
        problems = []
        if hub.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={hub['hidden_act']!r} (only 'silu')")
        if hub.get("use_sliding_window"):
            problems.append("use_sliding_window=true")
        if rope.get("rope_type", "default") != "default" or hub.get("rope_scaling"):
            problems.append(f"RoPE scaling {hub.get('rope_scaling') or rope} (only plain RoPE)")
        if "head_dim" in hub and hub["head_dim"] * hub["num_attention_heads"] != hub["hidden_size"]:
            problems.append(f"head_dim={hub['head_dim']} (only hidden_size / num_attention_heads)")
        if problems:
            raise ValueError(f"{source}: unsupported Qwen2 settings: {'; '.join(problems)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "tie_word_embeddings"}
        try:
            return cls(**{k: hub[k] for k in names if k in hub},
                       rope_theta=float(rope.get("rope_theta", hub.get("rope_theta", 10000.0))),
                       tie_word_embeddings=bool(hub.get("tie_word_embeddings", False)))  # transformers' default
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalize in fp32, cast back to the input dtype, *then* scale (Qwen2's order)
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """positions [B, L] -> cos, sin [B, 1, L, head_dim]: angles in fp32, cast to the activation dtype.
    Computed per call rather than kept in a buffer, so model.to(bfloat16) cannot round them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = positions[..., None].float() * inv_freq  # [B, L, head_dim / 2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # rotate_half layout (NeoX), not interleaved
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    """Static cache [B, kv_heads, max_len, head_dim] of one layer, written at slot indices (gpt-fast style).
    Non-persistent buffers: never part of a checkpoint."""

    def __init__(self, batch_size: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """slots [L]; k, v [n, kv_heads, L, head_dim] -> the cache's first n rows [n, kv_heads, max_len, head_dim]
        (n < B: shared prompt starts are computed in the first rows, then copied: Qwen2.generate)."""
        n = k.shape[0]
        self.k[:n, :, slots] = k
        self.v[:n, :, slots] = v
        return self.k[:n], self.v[:n]


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        self.cache: KVCache | None = None  # set by Qwen2.setup_cache

    def forward(self, x, cos, sin, mask, cache_slots=None, return_attn=False):
        """x [B, L, C]; mask None (plain causal) or bool [B or 1, 1, L, S], True where a query may look."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # [B, heads, L, head_dim]
        k = self.k_proj(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, kv_heads, L, hd]
        v = self.v_proj(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_slots is not None:
            k, v = self.cache.update(cache_slots, k, v)  # [B, kv_heads, max_len, head_dim]
        group = self.heads // self.kv_heads
        probs = None
        if return_attn:  # eager twin of SDPA, for the attention map: kv head j serves query heads j*group...
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # [B, heads, L, S]
            if mask is None:
                mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float).to(q.dtype)
            y = probs @ v
        elif mask is None:  # training and plain prompts: the flash kernel, GQA without copying k and v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
        else:  # padding / cache mask. The kernels that take a mask do not all take GQA, and expanding k, v
            # would copy the whole cache every decode step: instead fold each kv head's group of query heads
            # into the query axis ([B, heads, L, hd] -> [B, kv_heads, group * L, hd], rows ordered (g, l)).
            q = q.reshape(B, self.kv_heads, group * L, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, group, 1))
            y = y.reshape(B, self.heads, L, self.head_dim)  # not view: CUDA kernels may return other strides
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1)), probs


class MLP(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache_slots=None, return_attn=False):
        h, probs = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_slots, return_attn)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), probs


def attention_mask_4d(L: int, S: int, key_valid: torch.Tensor | None, cache_slots: torch.Tensor | None,
                      device) -> torch.Tensor | None:
    """Bool [B or 1, 1, L, S]: query i (at cache slot cache_slots[i], or i without a cache) sees key j iff
    j <= its slot and key_valid[b, j]. A query always sees itself, so the rows of padding tokens are not
    all-masked (SDPA would return NaN there); nothing real ever looks at them. None = plain causal."""
    if key_valid is None and cache_slots is None:
        return None
    key_idx = torch.arange(S, device=device)
    query_idx = cache_slots if cache_slots is not None else torch.arange(L, device=device)
    visible = key_idx[None, :] <= query_idx[:, None]  # [L, S]
    if key_valid is not None:
        visible = visible & (key_valid[:, None, :] | (key_idx[None, :] == query_idx[:, None]))  # [B, L, S]
    return visible.view(-1, 1, L, S)


class Qwen2(nn.Module):
    """Qwen2 / Qwen2.5 decoder. Module names mirror the checkpoint keys (`model.layers.0.self_attn.q_proj`...)
    so loading needs no renaming. Tied checkpoints have no `lm_head`: the embedding matrix is reused."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        # nn.Embedding without its own init, drawn here off the meta device only: on it (exports are built there
        # to be loaded) torch's normal_ imports torch._dynamo, ~2 s of every load
        embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                    _weight=torch.empty(config.vocab_size, config.hidden_size))
        if not embed_tokens.weight.is_meta:
            nn.init.normal_(embed_tokens.weight)  # nn.Embedding's own draw: a seed makes the same random model
        self.model = nn.ModuleDict(dict(
            embed_tokens=embed_tokens,
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(init_weights)
        self.activation_checkpointing = False  # training: recompute each block in backward (memory for time)
        self._compiled_decode = None

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, positions=None,
                cache_slots=None, last_only=False, return_last_attn=False, hidden_only=False):
        """Logits [B, L, V] (L = 1 with last_only) for input_ids [B, L] or inputs_embeds [B, L, C].

        attention_mask: bool, True on real tokens: [B, L], or [B, max_len] over cache slots with a cache.
        positions [B, L]: RoPE positions; default: counted over real tokens (so padding does not shift them).
        cache_slots [L]: write k/v at these slots of the static cache (setup_cache first) and attend over it.
        return_last_attn: also return the last layer's attention probabilities [B, heads, L, S] (eager path).
        hidden_only: return the final-norm hidden states [B, L, C] instead of logits (see `head`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Qwen2.forward: pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, C]
        B, L, _ = x.shape
        S = L
        if cache_slots is not None:
            if self.layers[0].self_attn.cache is None:
                raise RuntimeError("Qwen2.forward got cache_slots but there is no cache: call setup_cache()")
            S = self.layers[0].self_attn.cache.k.shape[2]
        if positions is None:
            if cache_slots is not None:
                positions = cache_slots[None].expand(B, L)
            elif attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(L, device=x.device)[None].expand(B, L)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = attention_mask_4d(L, S, attention_mask, cache_slots, x.device)
        probs = None
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            args = (x, cos, sin, mask, cache_slots, return_last_attn and i == len(self.layers) - 1)
            if checkpointing:
                x, probs = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x, probs = layer(*args)
        x = self.model.norm(x[:, -1:] if last_only else x)
        out = x if hidden_only else self.head(x)
        return (out, probs) if return_last_attn else out

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [..., C] -> logits [..., V] (tied checkpoints reuse the embedding matrix)."""
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed_tokens.weight)

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> int:
        """Preallocate every layer's KV cache; returns its length. A cache of the same batch size, dtype and
        device that is long enough is reused: no reallocation, and a compiled decode step sees the same
        shapes (the step's shapes depend on batch size and cache length only), so it does not recompile."""
        weight = self.embed_tokens.weight
        dtype, device = dtype or weight.dtype, torch.device(device or weight.device)
        c = self.config
        old = self.layers[0].self_attn.cache
        if old is not None and (old.k.shape[0], old.k.dtype, old.k.device) == (batch_size, dtype, device) \
                and old.k.shape[2] >= max_len:
            return old.k.shape[2]
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        for layer in self.layers:
            layer.self_attn.cache = KVCache(*shape, dtype, device)
        return max_len

    def decode_step(self, tokens, positions, cache_slots, key_valid):
        """One token per row: tokens, positions [B, 1]; cache_slots [1]; key_valid [B, max_len] -> [B, V].
        Static shapes, no Python branching on values: the part worth torch.compile (gpt-fast)."""
        return self(input_ids=tokens, positions=positions, cache_slots=cache_slots,
                    attention_mask=key_valid)[:, -1]

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 64, stop_token_ids=(), sampleable_size: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 compile: bool = False, prefix_embeds: torch.Tensor | None = None,
                 prefix_of: torch.Tensor | None = None) -> list[list[int]]:
        """New tokens per row, stopping each row at its first stop token (excluded).

        inputs_embeds [B, L, C] are LEFT-padded prompts, attention_mask [B, L] True on real tokens. Left
        padding makes every row's prompt end at the same slot, so all rows write the same cache slot at each
        decode step (one slot index for the batch, as in gpt-fast); RoPE positions are counted per row over
        real tokens, so a padded row computes exactly what it would alone. Ids >= sampleable_size never come
        out. With prefix_embeds [U, Lp, C] (no padding) and prefix_of [B]: row b's prompt is
        prefix_embeds[prefix_of[b]] followed by inputs_embeds[b]. Each of the U prefixes is computed once, in
        the cache's first rows, and its keys and values copied to the rows that share it (several questions
        about one image prefill its tokens once).
        """
        B, L, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.bool, device=device)
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if (attention_mask[:, 1:] < attention_mask[:, :-1]).any() or not attention_mask[:, -1].all():
            raise ValueError("Qwen2.generate expects left-padded prompts (mask rows False..False True..True)")
        if max_new_tokens < 1:
            return [[] for _ in range(B)]
        Lp = 0 if prefix_embeds is None else prefix_embeds.shape[1]
        P = Lp + L
        cache_len = self.setup_cache(B, cache_length(P + max_new_tokens, self.config.max_position_embeddings),
                                     inputs_embeds.dtype, device)
        key_valid = torch.ones(B, cache_len, dtype=torch.bool, device=device)  # slots past the end: unused
        key_valid[:, Lp:P] = attention_mask
        if Lp:  # the shared prefixes: computed in the first U rows, then copied to their rows
            self(inputs_embeds=prefix_embeds, attention_mask=key_valid[:len(prefix_embeds)],
                 cache_slots=torch.arange(Lp, device=device), last_only=True, hidden_only=True)
            for layer in self.layers:
                cache = layer.self_attn.cache
                cache.k[:, :, :Lp], cache.v[:, :, :Lp] = cache.k[prefix_of, :, :Lp], cache.v[prefix_of, :, :Lp]
        positions = Lp + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
        logits = self(inputs_embeds=inputs_embeds, attention_mask=key_valid, positions=positions,
                      cache_slots=torch.arange(Lp, P, device=device), last_only=True)[:, -1]  # prefill: [B, V]
        decode = self.decode_step
        if compile:
            if self._compiled_decode is None:
                # one graph per (batch size, cache length): CUDA graphs replay fixed shapes
                self._compiled_decode = torch.compile(self.decode_step, mode="reduce-overhead",
                                                      fullgraph=True, dynamic=False)
            decode = self._compiled_decode
        stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        next_position, slot = positions[:, -1:] + 1, torch.tensor([P], device=device)
        tokens = []
        for step in range(max_new_tokens):
            token = sample(logits[:, :sampleable_size], temperature, top_p, generator)  # [B]
            tokens.append(token)
            done |= torch.isin(token, stop)
            # done.all() waits for the GPU: ask every 8 steps only (tokens after a stop are cut below)
            if step == max_new_tokens - 1 or (step % 8 == 7 and done.all()):
                break
            logits = decode(token[:, None], next_position + step, slot + step, key_valid)
        out = torch.stack(tokens, dim=1).tolist()  # [B, steps]
        return [row[:next((i for i, t in enumerate(row) if t in stop_token_ids), len(row))] for row in out]


def cache_length(needed: int, context: int) -> int:
    """The KV cache's length for `needed` slots: the next power of two from 256 on (within the context), so
    that prompts of many lengths share a few cache shapes, each one compiled decode step and one CUDA graph;
    a cache that is long enough is reused (setup_cache)."""
    return max(needed, min(context, 1 << max(8, (needed - 1).bit_length())))


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None):
    """logits [B, V] -> ids [B]: greedy when temperature < 1e-6, else temperature + nucleus (top-p) sampling.
    Below 1e-6 sampling is greedy but for exact ties, and float32 would round a temperature of 1e-50 to 0."""
    if temperature < 1e-6:
        return logits.argmax(-1)
    logits = logits.float()  # the max subtracted first: at tiny temperatures logits / T would overflow to inf
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # drop a token once the tokens ranked above it already reach top_p (the top token always stays)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    drop[..., 0] = False  # also when top_p is below float32's range (1e-300 rounds to 0)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    pick = torch.multinomial(sorted_probs, 1, generator=generator)  # multinomial renormalizes
    return order.gather(-1, pick).squeeze(-1)


def init_weights(module: nn.Module):
    """Random init (as transformers' Qwen2, initializer_range 0.02) for tests, benchmarks and tiny models."""
    if isinstance(module, (nn.Linear, nn.Embedding)) and not module.weight.is_meta:  # meta: to be loaded
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def load_qwen2(path: str, dtype=torch.float32, device="cpu") -> Qwen2:
    """Qwen2 / Qwen2.5 from a Hub-style directory: config.json + model.safetensors, or shards + index, or
    pytorch_model.bin."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: point at a Qwen2.5 snapshot (see download.py)")
    config = Qwen2Config.from_hf(read_json_config(config_file), config_file)
    with torch.device("meta"):
        model = Qwen2(config)
    # a tied checkpoint may still carry lm_head.weight (a copy of the embedding): deliberately unused
    load_strict(model, path, dtype, device, skip=lambda k: config.tie_word_embeddings and k == "lm_head.weight")
    return model.eval()


# ----------------------------------------------------------------------------- TinyGroundingGPT


class Projector(nn.Module):
    """Concatenated vision features -> LLM embeddings: Linear -> GELU -> Linear (LLaVA-1.5's mlp2x_gelu)."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


@dataclass
class TinyGroundingGPTConfig:
    vision: list[VisionConfig]
    llm: Qwen2Config
    image_token_id: int  # <|image_pad|>: one per image patch token
    object_token_id: int  # <|vision_pad|>: one per pooled object token
    pad_token_id: int
    stop_token_ids: list[int]
    sampleable_size: int  # ids >= this are padding rows of the embedding: never generated
    # Object crops are pooled to this many tokens (a square: an adaptive average over the patch grid).
    # 16 = 4x4 at full size, each token averaging 6x6 of the 24x24 patches: an object costs 16 tokens.
    object_tokens: int = 16

    def __post_init__(self):
        check_field_types(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "TinyGroundingGPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        for removed in ("train_towers", "image_after_question"):  # fields of exports up to commit 31d6f20
            if d.pop(removed, False):
                raise ValueError(f"{source}: {removed}=true is no longer supported (its last commit: 31d6f20)")
        if unknown := set(d) - fields:
            raise ValueError(f"{source}: unknown TinyGroundingGPT config fields {sorted(unknown)}")
        try:
            vision, llm = [VisionConfig(**v) for v in d["vision"]], Qwen2Config(**d["llm"])
            return cls(**{**d, "vision": vision, "llm": llm})
        except (TypeError, KeyError) as e:
            raise ValueError(f"{source}: not a TinyGroundingGPT config ({e})") from e


def pool_patches(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """[N, P, D] on a square patch grid -> [N, tokens, D], adaptive average pooling to sqrt(tokens)^2."""
    N, P, D = features.shape
    side = math.isqrt(P)
    grid = features.transpose(1, 2).reshape(N, D, side, side)  # row-major patches -> [N, D, side, side]
    return F.adaptive_avg_pool2d(grid, math.isqrt(tokens)).flatten(2).transpose(1, 2)


class TinyGroundingGPT(nn.Module):
    def __init__(self, config: TinyGroundingGPTConfig, encoder: MultiScaleEncoder | None = None,
                 llm: Qwen2 | None = None):
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else MultiScaleEncoder(config.vision)
        self.projector = Projector(self.encoder.hidden_size, config.llm.hidden_size)
        self.llm = llm if llm is not None else Qwen2(config.llm)
        self.encoder.requires_grad_(False)  # the towers are frozen, as in the paper (eval mode, no grad)
        patches, side = self.encoder.num_patches, math.isqrt(config.object_tokens)
        if side * side != config.object_tokens or not 0 < config.object_tokens <= patches \
                or math.isqrt(patches) ** 2 != patches:
            raise ValueError(f"object_tokens={config.object_tokens} must be a square number no larger than "
                             f"the {patches} patches of the (square) patch grid")

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per <image>: one per patch (<object> takes config.object_tokens)."""
        return self.encoder.num_patches

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def encode(self, images=None, objects=None) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [NI, T, 3, S, S] and [NO, T, 3, S, S] -> LLM-space features [NI, num_patches, C] and
        [NO, object_tokens, C]. Images and objects go through the towers in one call, and under FSDP every
        process makes that call even without any picture (on one blank image, weighted 0 later): sharded
        towers gather their weights in a collective that all processes must join."""
        weight = self.llm.embed_tokens.weight  # its dtype is the compute dtype, also under FSDP2
        parts = [p for p in (images, objects) if p is not None and len(p)]
        if not parts:
            side = self.encoder.configs[0].image_size
            parts = [torch.zeros(1, len(self.encoder.configs), 3, side, side)]
        pixels = torch.cat(parts).to(weight.device, weight.dtype)
        with torch.no_grad():
            features = self.encoder(pixels)  # [NI + NO, P, sum(hidden)]
        n_images = 0 if images is None else len(images)
        image_features, object_features = features[:n_images], features[n_images:]
        if objects is not None and len(objects):
            object_features = pool_patches(object_features, self.config.object_tokens)
        return self.projector(image_features.to(weight.dtype)), self.projector(object_features.to(weight.dtype))

    def embed(self, input_ids: torch.Tensor, images=None, objects=None) -> torch.Tensor:
        """input_ids [B, L] -> [B, L, C], image and object features scattered into their placeholder runs in
        row-major order (the i-th run of the batch gets the i-th image / object)."""
        embeds = self.llm.embed_tokens(input_ids)
        c = self.config
        if images is None and objects is None and not (dist.is_initialized() and torch.is_grad_enabled()):
            return embeds  # text only, one process (or inference): the towers need not run
        features = self.encode(images, objects)
        for name, token_id, pixels, feats, per_item in [
                ("image", c.image_token_id, images, features[0], self.encoder.num_patches),
                ("object", c.object_token_id, objects, features[1], c.object_tokens)]:
            slots = input_ids == token_id  # [B, L]
            count, n = int(slots.sum()), 0 if pixels is None else len(pixels)
            if count != n * per_item:
                raise ValueError(f"input_ids hold {count} {name} placeholder tokens (id {token_id}) but {n} "
                                 f"{name}s x {per_item} tokens = {n * per_item} features were given: each "
                                 f"<{name}> must expand to exactly {per_item} tokens, one per {name} passed")
            if n:
                embeds = embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))
            else:  # keeps unused outputs in the graph, so every process has the same gradients to reduce
                embeds = embeds + 0.0 * feats.sum().to(embeds.dtype)
        return embeds

    def forward(self, input_ids, attention_mask=None, labels=None, images=None, objects=None,
                return_last_attn=False, loss_mean="token"):
        """The batch contract of data.py -> (logits, loss or None), plus the last layer's attention
        probabilities [B, heads, L, L] with return_last_attn. Without labels: logits [B, L, V]. With labels:
        the loss, the cross-entropy in fp32 of token t+1 at the N positions whose label is not -100, and the
        logits [N, V] of those positions only: the LM head runs nowhere else (image tokens and prompts need
        none, and the full [B, L, V] logits of Qwen's 152k vocabulary are 5 GB in fp32 at 4 x 2048).
        loss_mean "token": the mean over the N answer tokens; "sample": each sample's mean over its answer
        tokens, then the mean over the samples that have any (a one-word "Yes." weighs as much as a paragraph)."""
        embeds = self.embed(input_ids, images, objects)
        if attention_mask is not None and not (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            # right padding: causal attention alone gives real tokens exactly their outputs (they never see
            # the padding after them), and no mask keeps SDPA on its flash kernel
            attention_mask = None
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, return_last_attn=return_last_attn,
                       hidden_only=labels is not None)
        out, attn = out if return_last_attn else (out, None)
        if labels is None:
            logits, loss = out, None  # [B, L, V]
        else:
            targets = labels[:, 1:]
            keep = targets != -100  # [B, L-1]
            logits = self.llm.head(out[:, :-1][keep])  # hidden states [B, L, C] -> [N, C] -> logits [N, V]
            if loss_mean == "token":
                loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum") / keep.sum().clamp(min=1)
            elif loss_mean == "sample":
                weight = (keep / keep.sum(1, keepdim=True).clamp(min=1))[keep]  # [N]: 1 / its sample's tokens
                loss = (F.cross_entropy(logits.float(), targets[keep], reduction="none") * weight).sum()
                loss = loss / keep.any(1).sum().clamp(min=1)
            else:
                raise ValueError(f"loss_mean must be 'token' or 'sample', got {loss_mean!r}")
        return (logits, loss, attn) if return_last_attn else (logits, loss)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], images=None, objects=None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 compile: bool = False, image_of: list[int] | None = None) -> list[list[int]]:
        """New token ids per prompt (stop token excluded). Prompts are left-padded (see Qwen2.generate).
        image_of[b]: prompt b is about images[image_of[b]] (several prompts about one image, and no objects).
        Then the prompts' common start, through the image, is computed once per image: their ids must be the
        same up to the end of the image's tokens (as eval.py's questions are)."""
        if not prompts or not all(prompts):
            raise ValueError("generate needs a non-empty list of non-empty prompts")
        device = self.llm.embed_tokens.weight.device
        c = self.config
        prefix_embeds = prefix_of = None
        if image_of is not None:
            if images is None or len(image_of) != len(prompts) or not all(0 <= i < len(images) for i in image_of):
                raise ValueError(f"generate: image_of needs one index into the {0 if images is None else len(images)}"
                                 f" images per prompt ({len(prompts)}), got {list(image_of)}")
            shared = shared_start(prompts)  # the prompts' common start; each row keeps >= 1 token of its own
            if objects is not None or any(c.image_token_id in p[shared:] for p in prompts):
                raise ValueError("generate(image_of=...) needs prompts that are the same through the image's "
                                 "tokens, and no objects")
            used = sorted(set(image_of))  # only the images asked about: U <= B rows of the cache
            prefix = torch.tensor([prompts[0][:shared]] * len(used), device=device)  # [U, Lp]
            prefix_embeds = self.embed(prefix, images[used])
            prefix_of = torch.tensor([used.index(i) for i in image_of], device=device)
            prompts, images = [p[shared:] for p in prompts], None
        P = max(map(len, prompts))
        ids = torch.full((len(prompts), P), c.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), P, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, P - len(prompt):] = torch.tensor(prompt)
            mask[row, P - len(prompt):] = True
        embeds = self.embed(ids.to(device), images, objects)
        return self.llm.generate(embeds, mask.to(device), max_new_tokens, c.stop_token_ids, c.sampleable_size,
                                 temperature, top_p, generator, compile, prefix_embeds, prefix_of)

    # ------------------------------------------------------------------------- saving and loading

    def save_pretrained(self, directory: str, tokenizer_path: str | None = None):
        """directory/config.json + model.safetensors (+ a copy of tokenizer.json)."""
        self.save_state(self.state_dict(), self.config, directory, tokenizer_path)

    @staticmethod
    def save_state(state: dict, config: TinyGroundingGPTConfig, directory: str,
                   tokenizer_path: str | None = None):
        """save_pretrained for a state dict gathered elsewhere (e.g. from FSDP shards). The files are written
        into a temporary folder that is then renamed to `directory`: a crash leaves either no export or a
        whole one (config.json, model.safetensors and tokenizer.json together), never part of one."""
        directory = os.path.normpath(directory)
        tmp, old = directory + ".writing", directory + ".replaced"
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier try
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
        if os.path.exists(directory):  # replacing an export: the old one is moved aside, then removed
            if others := set(os.listdir(directory)) - {"config.json", "model.safetensors", "tokenizer.json"}:
                shutil.rmtree(tmp)
                raise FileExistsError(f"{directory} holds more than an export ({sorted(others)[:3]}): an export "
                                      "replaces its folder whole, so choose an empty or new one")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, directory: str, dtype=None, device="cpu") -> "TinyGroundingGPT":
        """The one loader of an export (train.py's, or save_pretrained's with a tokenizer): config.json +
        model.safetensors, with tokenizer.json beside them (read by data.Tokenizer). dtype: default bf16 on a
        GPU, else fp32."""
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"{directory} has no {name}: give a directory exported by train.py "
                                        "(config.json, model.safetensors, tokenizer.json)")
        if dtype is None:
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        config_file = os.path.join(directory, "config.json")
        fields = read_json_config(config_file)  # names the file itself when it is not a JSON object
        try:
            config = TinyGroundingGPTConfig.from_dict(fields, config_file)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{config_file}: not a TinyGroundingGPT config ({type(e).__name__}: {e})") from None
        with torch.device("meta"):
            model = cls(config)
        load_strict(model, directory, dtype, device)
        return model.eval()

    @classmethod
    def from_components(cls, clip_dir: str, dino_dir: str, qwen_dir: str, image_size: int = 336,
                        dtype=torch.float32, device="cpu", **overrides) -> "TinyGroundingGPT":
        """The stage-1 starting point from the three public checkpoints; the projector is random.
        Token ids are looked up by name in qwen_dir/tokenizer.json; `overrides` set other config fields."""
        from tokenizers import Tokenizer

        tokenizer_file = os.path.join(qwen_dir, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{tokenizer_file} not found: the Qwen2.5 snapshot must include it")
        tok = Tokenizer.from_file(tokenizer_file)

        def token_id(text):
            if (i := tok.token_to_id(text)) is None:
                raise ValueError(f"{tokenizer_file} has no token {text}: is this a Qwen2.5 tokenizer?")
            return i
        encoder = MultiScaleEncoder.from_pretrained([clip_dir, dino_dir], image_size, dtype, device)
        llm = load_qwen2(qwen_dir, dtype, device)
        fields = dict(vision=encoder.configs, llm=llm.config, image_token_id=token_id("<|image_pad|>"),
                      object_token_id=token_id("<|vision_pad|>"), pad_token_id=token_id("<|endoftext|>"),
                      stop_token_ids=[token_id("<|im_end|>"), token_id("<|endoftext|>")],
                      sampleable_size=tok.get_vocab_size(with_added_tokens=True))
        if unknown := set(overrides) - {f.name for f in dataclasses.fields(TinyGroundingGPTConfig)}:
            raise TypeError(f"from_components: unknown config fields {sorted(unknown)}")
        model = cls(TinyGroundingGPTConfig(**{**fields, **overrides}), encoder=encoder, llm=llm)
        model.projector.to(device=device, dtype=dtype)
        return model.eval()


def shared_start(prompts: list[list[int]]) -> int:
    """How many first ids all prompts share, leaving each at least one of its own."""
    n = min(map(len, prompts)) - 1
    return next((i for i in range(n) if any(p[i] != prompts[0][i] for p in prompts)), n)


def image_attention(attn: torch.Tensor, ids: torch.Tensor, queries, image_token_id: int) -> torch.Tensor:
    """How much each query position looks at the image: one sequence's last-layer attention [heads, L, L]
    (forward(..., return_last_attn=True)), its ids [L] -> [len(queries), P] over the P image-patch positions,
    the mean over heads. The attention loss, the attention map and the probes all read it this way."""
    patches = (ids == image_token_id).nonzero().flatten()
    return attn[:, queries][:, :, patches].float().mean(0)


# ----------------------------------------------------------------------------- processes


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) for train.py and eval.py. Under torchrun: NCCL on GPUs, gloo on CPUs; alone:
    no process group. On GPUs TF32 is on for what still runs in fp32."""
    cuda = torch.cuda.is_available()
    if cuda:  # TF32 for the fp32 matmuls and convolutions that remain (the paper trains with BF16 and TF32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device
