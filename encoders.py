"""Vision towers and image preprocessing: CLIP ViT and DINOv2 in plain PyTorch, loaded from Hub-style
checkpoints, plus the multi-scale encoder that runs both on one image and concatenates their patch features.

Numerics follow transformers' CLIPVisionModel / Dinov2Model (the parity tests check this to 1e-5 in fp32).
Features are `hidden_states[layer][:, 1:]` as transformers indexes them: 0 = embeddings (CLIP: after
pre_layrnorm), -1 = last block, never a final norm; only the blocks needed are run. Checkpoints are read
from model.safetensors (or its shards), else from pytorch_model.bin (as some CLIP snapshots come).
"""

import dataclasses
import json
import math
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_COLOR = (122, 116, 104)  # CLIP mean colour in 0..255, LLaVA's padding


def read_json_config(file: str) -> dict:
    """A config.json as a dict, or a ValueError naming the file (a truncated download, a list, binary)."""
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a JSON config ({e}); download or export it again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: a JSON config is an object {{...}}, this is a {type(config).__name__}")
    return config


def check_field_types(config) -> None:
    """Each int / float / bool field of dataclass `config` holds that type: a config.json's "896" for 896
    fails here, with the field's name, not deep inside nn.Linear."""
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), field.type
        wrong = (kind is int and (not isinstance(value, int) or isinstance(value, bool))
                 or kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool))
                 or kind is bool and not isinstance(value, bool))
        if wrong:
            raise ValueError(f"{type(config).__name__}.{field.name} must be {kind.__name__}, got {value!r}")


@dataclass
class VisionConfig:
    kind: str  # "clip" | "dinov2"
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int
    patch_size: int
    image_size: int  # the size we run at
    native_image_size: int | None = None  # size the position table was trained at (None: = image_size)
    layer_norm_eps: float | None = None  # None: the kind's default (CLIP 1e-5, DINOv2 1e-6)
    feature_layer: int = -2  # hidden_states index as transformers counts it, CLS dropped, no final norm
    mean: tuple | None = None  # None: the kind's normalization (CLIP's or ImageNet's)
    std: tuple | None = None

    def __post_init__(self):
        check_field_types(self)
        if self.kind not in ("clip", "dinov2"):
            raise ValueError(f"VisionConfig.kind must be 'clip' or 'dinov2', got {self.kind!r}")
        clip = self.kind == "clip"
        self.native_image_size = self.native_image_size or self.image_size
        self.layer_norm_eps = self.layer_norm_eps or (1e-5 if clip else 1e-6)
        self.mean = tuple(self.mean or (CLIP_MEAN if clip else IMAGENET_MEAN))  # tuples: JSON gives lists
        self.std = tuple(self.std or (CLIP_STD if clip else IMAGENET_STD))
        for field in ("image_size", "native_image_size"):
            if getattr(self, field) % self.patch_size:
                raise ValueError(f"VisionConfig.{field}={getattr(self, field)} is not a multiple of "
                                 f"patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if not -self.num_layers - 1 <= self.feature_layer <= self.num_layers:
            raise ValueError(f"feature_layer={self.feature_layer} is outside [-{self.num_layers + 1}, "
                             f"{self.num_layers}] for a tower of {self.num_layers} layers")

    @property
    def blocks_run(self) -> int:
        """How many blocks run to reach feature_layer (-2 of 24: 23)."""
        return self.feature_layer % (self.num_layers + 1)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# the full-size pair of the paper (DINOv2 runs at CLIP's 336, its 518 table interpolated)
CLIP_L14_336 = dict(kind="clip", hidden_size=1024, num_layers=24, num_heads=16, mlp_size=4096, patch_size=14,
                    image_size=336)
DINOV2_L14 = dict(kind="dinov2", hidden_size=1024, num_layers=24, num_heads=16, mlp_size=4096, patch_size=14,
                  image_size=336, native_image_size=518)

# ----------------------------------------------------------------------------- the tower


class Block(nn.Module):
    """Pre-LN transformer block. CLIP: quick_gelu, no layer scale. DINOv2: exact GELU, LayerScale on both
    branches."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        width, self.num_heads = config.hidden_size, config.num_heads
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(width, config.mlp_size)
        self.fc2 = nn.Linear(config.mlp_size, width)
        self.dinov2 = config.kind == "dinov2"
        if self.dinov2:
            self.scale1 = nn.Parameter(torch.ones(width))
            self.scale2 = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, N, width]
        B, N, width = x.shape
        h = self.norm1(x)
        # [B, N, width] -> [B, heads, N, head_dim]
        q, k, v = (proj(h).view(B, N, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        h = F.scaled_dot_product_attention(q, k, v)  # bidirectional, scale head_dim**-0.5
        h = self.out_proj(h.transpose(1, 2).reshape(B, N, width))
        x = x + (h * self.scale1 if self.dinov2 else h)
        h = self.fc1(self.norm2(x))
        h = F.gelu(h) if self.dinov2 else h * torch.sigmoid(1.702 * h)  # exact erf GELU vs CLIP's quick_gelu
        h = self.fc2(h)
        return x + (h * self.scale2 if self.dinov2 else h)


class VisionTower(nn.Module):
    """A ViT (CLIP or DINOv2 flavour) returning the patch tokens of one hidden state."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        width, patch = config.hidden_size, config.patch_size
        clip = config.kind == "clip"
        self.grid = config.image_size // patch  # patches per side at the size we run at
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=not clip)
        self.cls_token = nn.Parameter(torch.zeros(width))
        native_positions = (config.native_image_size // patch) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.zeros(native_positions, width))  # checkpoint's table
        self.pre_norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if clip else None
        # only the blocks up to the feature layer: later ones would never run (an idle block is dead weight, and
        # under FSDP2 a unit that never runs breaks gradient accumulation), so they are neither built nor loaded
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.blocks_run))
        self.apply(init_weights)

    def forward(self, pixel_values: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> patch tokens of hidden_states[layer] [B, num_patches, width]; `layer`
        counts as transformers does (0 = embeddings, -1 = the last block of the checkpoint) and may not lie
        past the feature layer, whose blocks this tower holds."""
        config = self.config
        layer = config.feature_layer if layer is None else layer
        num_blocks = layer if layer >= 0 else config.num_layers + 1 + layer  # hidden_states has L+1 entries
        if not 0 <= num_blocks <= len(self.blocks):
            raise ValueError(f"layer={layer} is outside [-{config.num_layers + 1}, {config.num_layers}] or past "
                             f"feature_layer={config.feature_layer}: this tower holds {len(self.blocks)} of the "
                             f"{config.num_layers} blocks")
        if pixel_values.shape[1:] != (3, config.image_size, config.image_size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected "
                             f"[B, 3, {config.image_size}, {config.image_size}] for this {config.kind} tower")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [B, width, n, n]
        x = x.flatten(2).transpose(1, 2)  # [B, n*n, width]
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions().to(x.dtype)  # [B, 1 + n*n, width]
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks[:num_blocks]:
            x = block(x)
        return x[:, 1:]

    def positions(self) -> torch.Tensor:
        """The position table at the size we run at [1 + n*n, width]: the stored one, or (off the native
        size) resized from it in every forward, as transformers does. That costs ~20 MFLOPs at 518 -> 336 next
        to the tower's ~0.35 TFLOPs per image, and, unlike a cached copy, is never stale after a load nor of
        another dtype or placement than the table (FSDP2 gathers and casts parameters, not buffers)."""
        if self.config.image_size == self.config.native_image_size:
            return self.position_embedding
        return resize_position_table(self.position_embedding, self.grid)


def resize_position_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """[1 + m*m, width] -> [1 + side*side, width] as transformers 5.24's Dinov2Embeddings interpolates: bicubic
    to size=(side, side) (not the older scale_factor=(side+0.1)/m variant), align_corners=False, in fp32, cast
    back; the CLS position untouched. CLIP off its native size is resized the same way."""
    cls, grid = table[:1], table[1:]
    m = math.isqrt(grid.shape[0])
    if m * m != grid.shape[0]:
        raise ValueError(f"position table has {grid.shape[0]} patch positions, not a square grid")
    grid = grid.reshape(1, m, m, -1).permute(0, 3, 1, 2).float()  # [1, width, m, m]
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False).to(table.dtype)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(side * side, -1)])


def init_weights(module: nn.Module):
    """Random init for towers trained from scratch (shapes world): truncated normal 0.02, as ViTs do."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, VisionTower):
        nn.init.trunc_normal_(module.cls_token, std=0.02)
        nn.init.trunc_normal_(module.position_embedding, std=0.02)
    # LayerNorm (ones/zeros) and LayerScale (ones) keep their constructor values


# ----------------------------------------------------------------------------- checkpoint loading

# Checkpoint tensors we deliberately leave unused. DINOv2's final `layernorm` only produces
# last_hidden_state; our features are pre-norm hidden states, so it is skipped like CLIP's post_layernorm.
SKIP = {
    "clip": [r"text_model\..*", r"text_projection\.weight", r"visual_projection\.weight", r"logit_scale",
             r".*position_ids", r"post_layernorm\.(weight|bias)"],
    "dinov2": [r"embeddings\.mask_token", r"layernorm\.(weight|bias)"],
}


def checkpoint_names(config: VisionConfig) -> dict[str, str]:
    """Our parameter name -> the checkpoint key (after stripping CLIP's `vision_model.` prefix)."""
    if config.kind == "clip":
        names = {"cls_token": "embeddings.class_embedding",
                 "patch_embed.weight": "embeddings.patch_embedding.weight",
                 "position_embedding": "embeddings.position_embedding.weight",
                 "pre_norm.weight": "pre_layrnorm.weight", "pre_norm.bias": "pre_layrnorm.bias"}
        block = {"norm1": "layer_norm1", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                 "v_proj": "self_attn.v_proj", "out_proj": "self_attn.out_proj", "norm2": "layer_norm2",
                 "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
        prefix = "encoder.layers.{}."
    else:
        names = {"cls_token": "embeddings.cls_token",  # stored [1, 1, width]
                 "patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
                 "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
                 "position_embedding": "embeddings.position_embeddings"}  # stored [1, positions, width]
        block = {"norm1": "norm1", "q_proj": "attention.attention.query",
                 "k_proj": "attention.attention.key", "v_proj": "attention.attention.value",
                 "out_proj": "attention.output.dense", "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
        prefix = "encoder.layer.{}."
    for i in range(config.num_layers):  # every block of the checkpoint; load_vision_tower skips the unused
        for ours, theirs in block.items():
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{p}"] = prefix.format(i) + f"{theirs}.{p}"
        if config.kind == "dinov2":
            names[f"blocks.{i}.scale1"] = prefix.format(i) + "layer_scale1.lambda1"
            names[f"blocks.{i}.scale2"] = prefix.format(i) + "layer_scale2.lambda1"
    return names


def read_config(path: str, image_size: int | None = None, feature_layer: int = -2) -> VisionConfig:
    """VisionConfig from a Hub config.json of a CLIPModel (vision_config inside), CLIPVisionModel or
    Dinov2Model. image_size: the size to run at (None: the checkpoint's own); feature_layer: the hidden state
    whose patches are the features (-2, LLaVA's choice, which the paper follows)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: a vision tower directory needs config.json plus model."
                                "safetensors, model.safetensors.index.json + shards, or pytorch_model.bin")
    hub = read_json_config(file)
    model_type = hub.get("model_type")
    if model_type == "clip":
        hub = hub.get("vision_config") or {}  # full CLIPModel: the text tower is skipped
    if model_type in ("clip", "clip_vision_model"):
        kind, act, mlp = "clip", "quick_gelu", hub.get("intermediate_size", 3072)
        defaults = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=32,
                        image_size=224, layer_norm_eps=1e-5)
    elif model_type == "dinov2":
        kind, act = "dinov2", "gelu"
        defaults = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                        image_size=224, layer_norm_eps=1e-6)
        mlp = int(hub.get("hidden_size", 768) * hub.get("mlp_ratio", 4))
        if hub.get("use_swiglu_ffn") or not hub.get("qkv_bias", True):
            raise ValueError(f"{file}: DINOv2 with use_swiglu_ffn or without qkv_bias is not supported")
    else:
        raise ValueError(f"{file}: model_type {model_type!r} is not a vision tower this loader knows; "
                         "expected 'clip' (CLIPModel), 'clip_vision_model' (CLIPVisionModel) or 'dinov2'")
    get = lambda key: hub.get(key, defaults[key])
    if hub.get("hidden_act", act) != act:
        raise ValueError(f"{file}: hidden_act {hub['hidden_act']!r} is not supported for {kind}: only {act}")
    try:
        return VisionConfig(kind=kind, hidden_size=get("hidden_size"), num_layers=get("num_hidden_layers"),
                            num_heads=get("num_attention_heads"), mlp_size=mlp, patch_size=get("patch_size"),
                            image_size=image_size or get("image_size"), native_image_size=get("image_size"),
                            layer_norm_eps=get("layer_norm_eps"), feature_layer=feature_layer)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def safetensors_keys(file: str) -> list[str]:
    """The tensor names of a safetensors file, or a ValueError naming the file if it is not one."""
    try:
        with safe_open(file, "pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError, which names no file
        raise ValueError(f"{file}: not a readable safetensors file ({e}); download or export it again") from None


def checkpoint_files(path: str) -> tuple[dict[str, str], Callable[[str], torch.Tensor]]:
    """(checkpoint key -> file it lives in, function key -> tensor) for any of the three Hub layouts."""
    single, index, bin_file = (os.path.join(path, n) for n in
                               ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if os.path.isfile(single) or os.path.isfile(index):
        if os.path.isfile(single):
            sources = dict.fromkeys(safetensors_keys(single), single)
        else:
            try:
                with open(index) as f:
                    sources = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a weight_map ({e})") from None
            absent = sorted({file for file in sources.values() if not os.path.isfile(file)})
            if absent:
                raise FileNotFoundError(f"shards listed in {index} not found: {absent} (an interrupted download? "
                                        "fetch the snapshot again)")
            for file in set(sources.values()):
                safetensors_keys(file)  # a damaged shard is named now, not deep inside a load
        handles = {}

        def get(key):
            if sources[key] not in handles:
                handles[sources[key]] = safe_open(sources[key], "pt")
            return handles[sources[key]].get_tensor(key)
        return sources, get
    if os.path.isfile(bin_file):
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)  # tensors only: no pickle runs
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:  # torch's names no file
            raise ValueError(f"{bin_file}: not a PyTorch file of plain tensors ({type(e).__name__}); it is "
                             "refused rather than unpickled: download the snapshot again") from None
        return dict.fromkeys(state, bin_file), state.__getitem__
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors, model.safetensors.index.json "
                            "(+ shards) or pytorch_model.bin (download the snapshot with download.py)")


def load_strict(module: nn.Module, path: str, dtype, device, names: dict[str, str] | None = None,
                key=lambda k: k, skip=lambda k: False, what: str = "the model built from its config.json"):
    """Fill every entry of module.state_dict() from the checkpoint in directory `path` (any Hub layout, see
    checkpoint_files), floats cast to `dtype`; the module may live on the meta device (tensors are assigned).
    names: our key -> the checkpoint's (default: the same); key(k): a checkpoint key as `names` spells it;
    skip(k): checkpoint tensors deliberately unused. Every other checkpoint tensor must be used, every entry
    filled, every shape equal (but for leading 1s the checkpoint may add, as DINOv2 does); else a ValueError
    names the keys and files."""
    expected = module.state_dict()
    names = names or {k: k for k in expected}
    ours_of = {theirs: ours for ours, theirs in names.items()}
    sources, get = checkpoint_files(path)
    state, unexpected, bad, bad_keys = {}, [], [], set()
    for stored, file in sources.items():
        if skip(key(stored)):
            continue
        if (ours := ours_of.get(key(stored))) is None:
            unexpected.append(f"{stored} (in {file})")
            continue
        t, want = get(stored), expected[ours]
        shape = list(t.shape)
        while len(shape) > want.dim() and shape[0] == 1:  # DINOv2's [1, N, C] tables, ours [N, C]
            shape = shape[1:]
        if shape != list(want.shape) or t.is_floating_point() != want.is_floating_point():
            bad.append(f"{stored} in {file}: {list(t.shape)} {t.dtype}, expected {list(want.shape)} "
                       f"{'floating point' if want.is_floating_point() else want.dtype}")
            bad_keys.add(ours)
            continue
        state[ours] = t.reshape(want.shape).to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    missing = sorted(names[k] for k in expected if k not in state and k not in bad_keys)
    problems = {f"missing tensors, in none of {sorted(set(sources.values()))}": missing,
                "unexpected tensors": unexpected, "wrong shapes or dtypes": bad}
    if any(problems.values()):
        listing = lambda keys: f"{keys[:10]}" + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        raise ValueError(f"weights in {path} do not match {what}:\n  " +
                         "\n  ".join(f"{problem}: {listing(keys)}" for problem, keys in problems.items() if keys))
    module.load_state_dict(state, strict=True, assign=True)


def load_vision_tower(path: str, dtype=torch.float32, device="cpu", image_size: int | None = None,
                      feature_layer: int = -2) -> VisionTower:
    """Load a CLIP or DINOv2 tower from a Hub-style directory (load_strict: every tensor accounted for)."""
    config = read_config(path, image_size, feature_layer)
    with torch.device("meta"):
        tower = VisionTower(config)
    wanted = checkpoint_names(config)
    # the blocks after the feature layer are not in the tower (they would never run): their tensors are skipped
    beyond = {theirs for ours, theirs in wanted.items()
              if ours.startswith("blocks.") and int(ours.split(".")[1]) >= config.blocks_run}
    wanted = {ours: theirs for ours, theirs in wanted.items() if theirs not in beyond}
    assert set(wanted) == set(tower.state_dict()), "checkpoint_names out of sync with VisionTower"
    unused = re.compile("|".join(f"(?:{p})" for p in SKIP[config.kind]))
    # CLIPModel (and CLIPVisionModel saved by transformers < 5) prefix the vision tower with `vision_model.`
    strip = (lambda k: k.removeprefix("vision_model.")) if config.kind == "clip" else (lambda k: k)
    load_strict(tower, path, dtype, device, wanted, key=strip,
                skip=lambda k: k in beyond or bool(unused.fullmatch(k)),
                what=f"the {config.kind} tower of its config.json ({config.num_layers} layers, width "
                     f"{config.hidden_size})")
    return tower.eval()


# ----------------------------------------------------------------------------- images


def pad_to_square(img: Image.Image, fill=PAD_COLOR) -> Image.Image:
    """Paste `img` centred on a square of side max(W, H) filled with `fill` (offsets as data.pad_offsets)."""
    img = img.convert("RGB")
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def crop_object(img: Image.Image, box, margin: float = 0.1) -> Image.Image:
    """Crop the object at `box` ([x1,y1,x2,y2] normalized on the padded square) from the padded square,
    widened by `margin` x the box's width/height on each side for context and clipped to the square.
    Pixel edges round outward (floor/ceil); the crop is at least 1x1. The processor pads it square and
    resizes it, which gives the paper's "cropped and zoomed" object image."""
    if len(box) != 4:
        raise ValueError(f"box must be [x1, y1, x2, y2], got {box!r}")
    square = pad_to_square(img)
    side = square.size[0]
    x1, y1, x2, y2 = (float(v) * side for v in box)
    dx, dy = margin * max(x2 - x1, 0.0), margin * max(y2 - y1, 0.0)
    left = min(max(math.floor(x1 - dx), 0), side - 1)
    top = min(max(math.floor(y1 - dy), 0), side - 1)
    right = max(min(math.ceil(x2 + dx), side), left + 1)
    bottom = max(min(math.ceil(y2 + dy), side), top + 1)
    return square.crop((left, top, right, bottom))


class ImageProcessor:
    """PIL image -> [T, 3, S, S]: pad to square, one bicubic resize (PIL, on uint8, as CLIPImageProcessor),
    then each tower's own mean/std. Plain attributes only, so it pickles into DataLoader workers."""

    def __init__(self, configs: list[VisionConfig]):
        sizes = {c.image_size for c in configs}
        if len(sizes) != 1:
            raise ValueError(f"all towers must share image_size, got {sorted(sizes)}")
        self.image_size = sizes.pop()
        self.mean = [tuple(c.mean) for c in configs]
        self.std = [tuple(c.std) for c in configs]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        size = self.image_size
        img = pad_to_square(img).resize((size, size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, S, S]
        mean, std = torch.tensor(self.mean)[:, :, None, None], torch.tensor(self.std)[:, :, None, None]
        return (pixels[None] - mean) / std  # [T, 3, S, S]


# ----------------------------------------------------------------------------- multi-scale encoder


class MultiScaleEncoder(nn.Module):
    """Several towers on the same image; patch features concatenated on the channel axis."""

    def __init__(self, configs: list[VisionConfig], towers: list[VisionTower] | None = None):
        super().__init__()
        self.configs = list(configs)
        patches = {c.num_patches for c in self.configs}
        if len(patches) != 1:
            raise ValueError(f"towers must yield the same number of patches, got {sorted(patches)} "
                             "(use one image_size and patch_size for all)")
        self.towers = nn.ModuleList(towers if towers is not None else [VisionTower(c) for c in self.configs])
        self.processor = ImageProcessor(self.configs)
        self.num_patches = patches.pop()
        self.hidden_size = sum(c.hidden_size for c in self.configs)

    @classmethod
    def from_pretrained(cls, paths: list[str], image_size: int = 336, dtype=torch.float32, device="cpu"):
        towers = [load_vision_tower(p, dtype, device, image_size) for p in paths]
        return cls([t.config for t in towers], towers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, 3, S, S] -> [B, num_patches, sum(hidden)] in tower order."""
        if pixels.dim() != 5 or pixels.shape[1] != len(self.towers):
            raise ValueError(f"pixels must be [B, {len(self.towers)}, 3, S, S], got {tuple(pixels.shape)}")
        return torch.cat([tower(pixels[:, t]) for t, tower in enumerate(self.towers)], dim=-1)

