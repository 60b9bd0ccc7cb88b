"""The frozen representation encoders of Scale-RAE and their image preprocessing, hand-written.

Scale-RAE (arXiv 2601.16208) generates and reads images in the token space of a frozen encoder (a Representation
AutoEncoder, RAE: arXiv 2510.11690): SigLIP-2 So400M/14 (`google/siglip2-so400m-patch14-224`, the default, 256 x 1152)
or WebSSL-DINO 300M (`facebook/webssl-dino300m-full2b-224`, DINOv2 architecture, 256 x 1024). The latent is what the
official towers compute (scale_rae/model/multimodal_encoder/): for SigLIP the LAST layer's output, then a LayerNorm
without weight and bias (eps 1e-6; `post_layernorm` and the pooling head are neither run nor loaded); for DINOv2 the
final LayerNorm output without the CLS (and register) tokens. Parameter names are transformers', so the Hub checkpoints
load with no renaming. Preprocessing reproduces the slow transformers image processors (PIL resize on uint8, rescale in
float64, normalize in float32). DINOv2 also runs at another resolution with its token grid resized to the model's
(official `-res448-interp256`); `official=True` adds the official bf16 roundings.
"""

import io
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from weights import WeightsError, caster, from_dict, load_strict, read_config, read_safetensors, resolve

ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}  # transformers' names


def activation(name):
    if name not in ACTIVATIONS:
        raise WeightsError(f"hidden_act {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


@dataclass
class SiglipVisionConfig:  # defaults are transformers' SiglipVisionConfig defaults, as the Hub files rely on them
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6


@dataclass
class Dinov2Config:  # defaults are transformers' Dinov2Config defaults
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False
    num_register_tokens: int = 0  # > 0 only for model_type `dinov2_with_registers`


def num_tokens(cfg):
    """Latent tokens of an encoder config: one per patch (256 for SigLIP-2 at 224 px, patch 14)."""
    return (cfg.image_size // cfg.patch_size) ** 2


# ---- Images in: files and PIL images to normalized pixel tensors, and back ----
def to_rgb(image):
    """Any PIL image as 8-bit RGB, as the official CLI's `.convert("RGB")` (alpha dropped), except that 16-bit
    grayscale, which convert clips to 255 (a mostly white image), is scaled to 8 bits (v >> 8) first."""
    if image.mode in ("I;16", "I;16L", "I;16B"):
        a = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
        image = Image.fromarray(a.astype(np.uint8))  # mode L
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(src, name=None):
    """A path or the bytes of an image file -> an RGB PIL image. Training and sampling both read images here, so
    they decode them alike; anything unreadable raises ValueError naming the file (`name`, else the path)."""
    is_bytes = isinstance(src, bytes)
    name = name or ("image bytes" if is_bytes else str(src))
    if not is_bytes and not Path(src).is_file():
        raise ValueError(f"{name}: no such image file")
    try:
        with Image.open(io.BytesIO(src) if is_bytes else src) as im:
            im.load()  # decode now: PIL opens lazily, and a truncated file only fails here
            return to_rgb(im)
    except Exception as e:  # UnidentifiedImageError (an OSError), DecompressionBombError, SyntaxError, ...
        raise ValueError(f"{name} is not a readable image ({type(e).__name__}: {e})") from None


def denormalize(pixels, mean, std):
    """Normalized pixels (B, C, H, W) -> [0, 1] pixels, with per-channel preprocessing statistics."""
    return pixels * pixels.new_tensor(std).view(1, -1, 1, 1) + pixels.new_tensor(mean).view(1, -1, 1, 1)


@dataclass
class ImageProcessing:
    """The official (slow) transformers image processor. `size` (height, width): resize to it (SiglipImageProcessor);
    an int: resize the shorter side to it, center-crop size x size (BitImageProcessor, as the DINO tower sets it)."""
    size: object
    image_mean: tuple
    image_std: tuple
    resample: int = 3  # PIL bicubic, both processors' default; the files set their own
    rescale_factor: float = 1 / 255

    @classmethod
    def from_file(cls, folder, size=None):
        """From `preprocessor_config.json`; `size` replaces the file's (the official DINO tower does that)."""
        path = Path(folder) / "preprocessor_config.json"
        d = read_config(folder, path.name)
        off = [k for k in ("do_resize", "do_rescale", "do_normalize", "do_center_crop") if d.get(k) is False]
        missing = [k for k in ("image_mean", "image_std") if k not in d]
        if size is None:
            size = d.get("size", {"height": 224, "width": 224})  # SiglipImageProcessor's default
            size = (size["height"], size["width"]) if "height" in size else None
        if off or missing or size is None:
            raise WeightsError(f"{path}: unsupported preprocessing (turned off: {off}, missing: {missing}, "
                               f"size: {d.get('size')})")
        keep = {k: d[k] for k in ("resample", "rescale_factor") if k in d}
        return cls(size=size, image_mean=tuple(d["image_mean"]), image_std=tuple(d["image_std"]), **keep)

    def resize(self, image):
        if isinstance(self.size, int):
            w, h = image.size
            new_long = int(self.size * max(w, h) / min(w, h))
            a = np.asarray(image.resize((self.size, new_long) if w <= h else (new_long, self.size), self.resample))
            top, left = (a.shape[0] - self.size) // 2, (a.shape[1] - self.size) // 2
            return a[top:top + self.size, left:left + self.size]
        h, w = self.size
        return np.asarray(image.resize((w, h), self.resample))

    def __call__(self, images):
        """A list of PIL images -> (B, 3, H, W) float32 normalized pixels."""
        if not images:
            raise ValueError("no images to preprocess")
        x = np.stack([self.resize(to_rgb(im)) for im in images])  # (B, H, W, 3) uint8
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)  # transformers rescales in float64
        x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


# ---- Shared pieces: attention, MLP, what both encoders do ----
def named(**modules):
    """A container that only reproduces the official nesting of parameter names (`output.dense.weight`)."""
    return nn.ModuleDict(modules)


def attend(q, k, v, heads, divide=False):
    """Bidirectional multi-head attention: (B, T, D) projections -> (B, T, D), in transformers' eager order, as the
    official modules compute it: scores x d^-1/2 (SigLIP), or / sqrt(d) with `divide` (DINOv2, the MAE decoder)."""
    B, T, D = q.shape
    q, k, v = (t.view(B, T, heads, D // heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
    scores = q @ k.transpose(-1, -2)  # (B, h, T, T); SDPA's last bits would be whole bf16 steps in official features
    scores = scores / math.sqrt(D // heads) if divide else scores * (D // heads) ** -0.5
    return (scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v).transpose(1, 2).reshape(B, T, D)


class ViTAttention(nn.Module):
    """Self-attention with transformers' ViT names `attention.{query,key,value}` and `output.dense` (DINOv2, rae.py)."""

    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.attention = named(**{n: nn.Linear(dim, dim, bias=qkv_bias) for n in ("query", "key", "value")})
        self.output = named(dense=nn.Linear(dim, dim))

    def forward(self, x):
        a = self.attention
        return self.output.dense(attend(a.query(x), a.key(x), a.value(x), self.heads, divide=True))


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), activation(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Encoder(nn.Module):
    """What both encoders share: their preprocessing and the facts the decoder and the LLM need."""

    def __init__(self, cfg, processing: ImageProcessing, tokens=None):
        super().__init__()
        self.config, self.processing = cfg, processing
        self.preprocess = processing  # list of PIL images -> (B, 3, image_size, image_size) float32
        self.image_size = processing.size if isinstance(processing.size, int) else processing.size[0]
        self.hidden_size, self.image_mean, self.image_std = cfg.hidden_size, processing.image_mean, processing.image_std
        self.num_tokens = tokens or (self.image_size // cfg.patch_size) ** 2  # what encode returns

    def check(self, pixels, official=False):  # official: the pixels are rounded to bf16 before the encoder
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"expected pixels (B, 3, {self.image_size}, {self.image_size}), got {tuple(pixels.shape)}")
        return (pixels.bfloat16() if official else pixels).to(next(self.parameters()).dtype)


# ---- SigLIP (the vision tower of a SigLIP / SigLIP-2 fixed-resolution checkpoint) ----
class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(num_tokens(cfg), cfg.hidden_size)

    def forward(self, pixels):  # (B, 3, H, W) -> (B, N, C); learned absolute positions, no CLS token
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x):
        return self.out_proj(attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class SiglipLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SigLIP2Encoder(Encoder):
    """The SigLIP vision tower up to its last layer, named as the checkpoint's `vision_model.*` without the prefix."""

    prefix, keep = "vision_model.", ("embeddings.", "encoder.")  # post_layernorm and head are never read

    def __init__(self, cfg: SiglipVisionConfig, processing: ImageProcessing, tokens=None):
        super().__init__(cfg, processing, tokens)
        if self.num_tokens != num_tokens(cfg):  # the official SigLIP tower raises NotImplementedError
            raise WeightsError(f"SigLIP gives {num_tokens(cfg)} tokens, not {self.num_tokens}: it is never resized")
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = named(layers=nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.num_hidden_layers)))

    @staticmethod
    def read_config(config, folder, image_size=None):
        cfg = from_dict(SiglipVisionConfig, config.get("vision_config", {}))  # the text tower's config is not read
        processing = ImageProcessing.from_file(folder)  # direct resize to the file's (height, width)
        if processing.size != (cfg.image_size, cfg.image_size) or image_size not in (None, cfg.image_size):
            raise WeightsError(f"{folder}: SigLIP runs at its own {cfg.image_size} px only (preprocessor size "
                               f"{processing.size}, asked for {image_size})")
        return cfg, processing

    def encode(self, pixels, official=False):  # (B, 3, 224, 224) normalized -> (B, 256, C) RAE latents
        x = self.embeddings(self.check(pixels, official))
        for layer in self.encoder.layers:
            x = layer(x)
        x = x.bfloat16() if official else x  # official: the LayerNorm runs on (and returns) bf16
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6)  # non-affine LN on the last layer's output (RAE space)


# ---- DINOv2 (WebSSL-DINO) ----
class Dinov2Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, C))
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_tokens(cfg) + 1, C))
        self.patch_embeddings = named(
            projection=nn.Conv2d(cfg.num_channels, C, cfg.patch_size, stride=cfg.patch_size))

    def positions(self, grid):  # the table for grid x grid patches: transformers 4.37's bicubic resize (official pin)
        table, side = self.position_embeddings, math.isqrt(self.position_embeddings.shape[1] - 1)
        if grid == side:
            return table
        patches = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        scale = (grid + 0.1) / side  # 4.37 resizes by a scale factor, + 0.1 against rounding down
        patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
        return torch.cat([table[:, :1], patches.to(table.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)

    def forward(self, pixels):  # (B, 3, H, W) -> (B, 1 + R + N, C): CLS, registers (no position), patches
        x = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)  # (B, grid * grid, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.positions(math.isqrt(x.shape[1]))
        if hasattr(self, "register_tokens"):
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], 1)
        return x


class Dinov2Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.attention = ViTAttention(C, cfg.num_attention_heads, cfg.qkv_bias)
        self.layer_scale1 = nn.ParameterDict(dict(lambda1=nn.Parameter(torch.ones(C))))  # LayerScale
        self.norm2 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.mlp = MLP(C, int(C * cfg.mlp_ratio), cfg.hidden_act)
        self.layer_scale2 = nn.ParameterDict(dict(lambda1=nn.Parameter(torch.ones(C))))  # LayerScale

    def forward(self, x):
        x = x + self.attention(self.norm1(x)) * self.layer_scale1.lambda1
        return x + self.mlp(self.norm2(x)) * self.layer_scale2.lambda1


class DINOv2Encoder(Encoder):
    """Dinov2Model (optionally with registers); keys = the checkpoint's, minus the unused `embeddings.mask_token`."""

    prefix, keep = "", None

    def __init__(self, cfg: Dinov2Config, processing: ImageProcessing, tokens=None):
        super().__init__(cfg, processing, tokens)
        if cfg.use_swiglu_ffn:
            raise WeightsError("DINOv2 with a SwiGLU MLP (use_swiglu_ffn) is not supported")
        self.embeddings = Dinov2Embeddings(cfg)
        self.encoder = named(layer=nn.ModuleList(Dinov2Layer(cfg) for _ in range(cfg.num_hidden_layers)))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @staticmethod
    def read_config(config, folder, image_size=None):
        cfg = from_dict(Dinov2Config, config)
        # As the official tower (dino_encoder.py): its size (the model's, or its name's `-res`) replaces the file's.
        return cfg, ImageProcessing.from_file(folder, image_size or cfg.image_size)

    def encode(self, pixels, official=False):  # (B, 3, 224, 224) normalized -> (B, 256, C) RAE latents
        x = self.embeddings(self.check(pixels, official))
        for layer in self.encoder.layer:
            x = layer(x)
        x = self.layernorm(x[:, 1 + self.config.num_register_tokens:])  # per token: dropping CLS/registers is exact
        x = x.bfloat16() if official else x  # official: the features are rounded to bf16
        side, grid = math.isqrt(self.num_tokens), math.isqrt(x.shape[1])
        if grid == side:
            return x
        y = x.unflatten(1, (grid, grid)).permute(0, 3, 1, 2).float()  # the official resize of the grid: in fp32
        y = F.interpolate(y, size=(side, side), mode="bilinear", align_corners=False).to(x.dtype)
        return y.permute(0, 2, 3, 1).flatten(1, 2)


# model_type in config.json -> architecture. SigLIP-2 fixed-resolution checkpoints declare `siglip`.
ENCODERS = {"siglip": SigLIP2Encoder, "dinov2": DINOv2Encoder, "dinov2_with_registers": DINOv2Encoder}


def read_encoder_config(folder, image_size=None):
    """(encoder class, config, preprocessing) from a folder's JSON files at `image_size` (default: the model's)."""
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type == "siglip2":
        raise WeightsError(f"{folder}: model_type 'siglip2' is a NaFlex (variable-resolution) SigLIP-2; use a fixed-"
                           f"resolution checkpoint such as google/siglip2-so400m-patch14-224 (model_type 'siglip')")
    if model_type not in ENCODERS:
        raise WeightsError(f"{folder}: encoder model_type {model_type!r} is not supported ({sorted(ENCODERS)})")
    cls = ENCODERS[model_type]
    return (cls, *cls.read_config(config, folder, image_size))


def load_encoder(path_or_repo, dtype=torch.float32, device="cpu", image_size=None, tokens=None):
    """A frozen encoder (eval, requires_grad False) from a local folder or Hub id, architecture from config.json;
    at `image_size` px, giving `tokens` tokens (defaults: the checkpoint's own)."""
    folder = resolve(path_or_repo, allow_patterns=["*.json", "*.safetensors"])
    cls, cfg, processing = read_encoder_config(folder, image_size)
    with torch.device("meta"):
        encoder = cls(cfg, processing, tokens)
    sd = read_safetensors(folder, prefix=cls.prefix, keep=cls.keep, cast=caster(encoder, dtype, device))
    sd.pop("embeddings.mask_token", None)  # DINOv2's masked-image-modeling token: pre-training only
    return load_strict(encoder, sd, f"{cls.__name__} weights in {folder}", dtype, device).requires_grad_(False)
