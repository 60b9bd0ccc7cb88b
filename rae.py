"""The RAE pixel decoder and the RAE object (a frozen encoder paired with its decoder), hand-written.

The decoder of a Representation AutoEncoder (arXiv 2510.11690; used by Scale-RAE, arXiv 2601.16208) is RAE's
`GeneralDecoder`, a ViT-MAE decoder (arXiv 2111.06377) without masking (scale_rae/model/multimodal_decoder/decoder.py;
released as `nyu-visionx/{siglip2,webssl300m}_decoder`: a ViT-MAE-style `config.json` and a raw state dict `model.pt`):
    x = [trainable_cls_token; decoder_embed(latents)] + decoder_pos_embed   # fixed 2-D sin-cos, zero row for cls
    patches = decoder_pred(decoder_norm(pre-LN ViTMAE layers(x)))[:, 1:]     # (B, 256, p*p*3) normalized pixels
    image = unpatchify(patches) * std + mean                                 # with the ENCODER's statistics
Official parameter names, so `model.pt` loads with a strict key check (the official loader ignores mismatches). The
decoder's input width is read from `model.pt` (`decoder_embed.weight`): config.json's `hidden_size` is a ViT-MAE
leftover that the official code overrides with the encoder's. Text-to-image needs no encoder file at all: the
de-normalization statistics of the released encoders are in RELEASED_ENCODERS.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dit import sincos_pos_embed
from encoders import ViTAttention, activation, denormalize, load_encoder, named, read_encoder_config
from weights import WeightsError, from_dict, load_strict, read_config, resolve, write_folder


RELEASED_ENCODERS = {  # encoder id: (its released RAE decoder, image_mean, image_std of its preprocessor_config.json)
    "google/siglip2-so400m-patch14-224": ("nyu-visionx/siglip2_decoder", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "facebook/webssl-dino300m-full2b-224": ("nyu-visionx/webssl300m_decoder", (0.485, 0.456, 0.406),
                                            (0.229, 0.224, 0.225)),  # ImageNet's, as DINOv2's processor
}


@dataclass
class DecoderConfig:  # defaults are transformers' ViTMAEConfig defaults, which the official AutoConfig fills in
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 2048
    patch_size: int = 16
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: bool = True

    @property
    def grid(self):  # tokens per side; the official decoder is built for 256 = 16 x 16 tokens
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d):
        cfg = from_dict(cls, d)
        sizes = (cfg.patch_size, cfg.image_size, cfg.decoder_hidden_size)
        if not all(isinstance(n, int) for n in sizes) or cfg.image_size % cfg.patch_size or cfg.decoder_hidden_size % 4:
            raise WeightsError(f"decoder config: patch_size, image_size, decoder_hidden_size = {sizes} must be "
                               f"integers, image_size a multiple of patch_size and decoder_hidden_size of 4")
        return cfg


# RAE's decoder configs (bytetriper/RAE configs/decoder/ViT{B,L,XL}) at 16 x 16 tokens of patch 16. The released
# Scale-RAE decoders' numbers are read from their config.json; these are for training a decoder from scratch.
DECODER_PRESETS = {  # width, depth, heads, MLP width
    "vit-b": DecoderConfig(768, 12, 12, 3072, patch_size=16, image_size=256),
    "vit-l": DecoderConfig(1024, 24, 16, 4096, patch_size=16, image_size=256),
    "vit-xl": DecoderConfig(1152, 28, 16, 4096, patch_size=16, image_size=256),
    "toy": DecoderConfig(128, 2, 4, 256, patch_size=8, image_size=64),  # toy.py: 64 px from 8 x 8 tokens
}


class DecoderLayer(nn.Module):
    """transformers' ViTMAELayer: pre-LN attention and MLP, with its parameter names."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        D, H = cfg.decoder_hidden_size, cfg.decoder_intermediate_size
        self.layernorm_before = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attention = ViTAttention(D, cfg.decoder_num_attention_heads, cfg.qkv_bias)
        self.layernorm_after = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.intermediate = named(dense=nn.Linear(D, H))
        self.output = named(dense=nn.Linear(H, D))
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))


class RAEDecoder(nn.Module):
    """Encoder tokens (B, N, C) -> pixels (B, 3, H, W), de-normalized but not clipped (training needs them raw).
    Built fresh it is ready to train: PyTorch's default initialization, as the official GeneralDecoder (a plain
    nn.Module) has, a zero cls token, and the fixed sin-cos position table (a buffer: it is never trained)."""

    def __init__(self, cfg: DecoderConfig, in_dim, image_mean, image_std):
        super().__init__()
        self.config = cfg
        D, p = cfg.decoder_hidden_size, cfg.patch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)  # the encoder's; kept as Python floats
        self.decoder_embed = nn.Linear(in_dim, D)
        pos = F.pad(sincos_pos_embed(D, cfg.grid), (0, 0, 1, 0))  # MAE's table, with a zero row for the cls slot
        self.register_buffer("decoder_pos_embed", pos[None])  # (1, 1 + N, D)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_num_hidden_layers))
        self.decoder_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.decoder_pred = nn.Linear(D, p * p * cfg.num_channels)

    def predict_patches(self, latents):  # (B, N, C) -> (B, N, p*p*3) normalized pixels, the decoder's raw output
        B, N, _ = latents.shape
        if N != self.config.grid ** 2:
            raise ValueError(f"the decoder expects {self.config.grid ** 2} tokens, got {N}")
        latents = latents.to(self.decoder_embed.weight.dtype)  # the sampler returns float32 latents
        # The official code embeds a zero cls row with the tokens (cli.py) and predicts the cls row's patch, then drops
        # both. The 257-row GEMMs stay (1/257 more work): on GPUs the kernel, so the rounding, can vary with row count.
        x = self.decoder_embed(torch.cat([latents.new_zeros(B, 1, latents.shape[-1]), latents], 1))[:, 1:]
        x = torch.cat([self.trainable_cls_token.expand(B, -1, -1), x], 1) + self.decoder_pos_embed.to(x.dtype)
        for layer in self.decoder_layers:
            x = layer(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def unpatchify(self, patches):  # (B, N, p*p*c) -> (B, c, H, W); patch rows (p, p, c), as MAE
        B, g, p, c = patches.shape[0], self.config.grid, self.config.patch_size, self.config.num_channels
        return patches.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)

    def save_pretrained(self, folder, state_dict=None, full=lambda t: t):
        """The released layout, in a new folder: a ViT-MAE-style config.json and model.pt (flat, float32), of this
        model's state_dict (default) or of state_dict, each tensor made whole by full() (a sharded one gathered)."""
        config = dict(model_type="vit_mae", architectures=["GeneralDecoder"],
                      hidden_size=self.decoder_embed.in_features, **asdict(self.config))

        def write(tmp):
            sd = {k: full(v.detach()).float().cpu() for k, v in (state_dict or self.state_dict()).items()}
            torch.save(sd, tmp / "model.pt")
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_folder(folder, write)

    def forward(self, latents):  # (B, N, C) -> (B, 3, H, W) pixels, ~[0, 1], in float32 like the official output
        return denormalize(self.unpatchify(self.predict_patches(latents)).float(), self.image_mean, self.image_std)


def load_decoder(path_or_repo, image_mean, image_std, dtype=torch.float32, device="cpu"):
    """A released decoder (config.json + model.pt) from a folder or Hub id; strict but for MAE's unused `mask_token`."""
    folder = resolve(path_or_repo, allow_patterns=["config.json", "model.pt"])
    cfg = DecoderConfig.from_dict(read_config(folder))
    path = Path(folder) / "model.pt"
    if not path.is_file():
        raise WeightsError(f"{path} not found: expected the decoder's state dict next to its config.json")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with code in it, ...
        raise WeightsError(f"{path} is corrupt or not a plain PyTorch state dict ({type(e).__name__}: {e})") from None
    embed = sd.get("decoder_embed.weight") if isinstance(sd, dict) else None
    if not isinstance(embed, torch.Tensor) or embed.ndim != 2 or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a flat {{name: tensor}} state dict with decoder_embed.weight")
    with torch.device("meta"):
        decoder = RAEDecoder(cfg, embed.shape[1], image_mean, image_std)  # in_dim: the encoder's width
    return load_strict(decoder, sd, f"RAE decoder weights in {path}", dtype, device, harmless=["mask_token"])


class RAE:
    """A frozen encoder paired with its pixel decoder, each loaded only when needed: drawing an image needs only the
    decoder, reading one only the encoder (loaded on first use, with the keyword arguments of load_encoder)."""

    def __init__(self, decoder: RAEDecoder = None, decoder_path=None, device="cpu", encoder_args=None):
        self.decoder, self._encoder, self.device, self.encoder_args = decoder, None, device, encoder_args or {}
        self.encoder_path, self.decoder_path = self.encoder_args.get("path_or_repo"), decoder_path  # for manifests

    @classmethod
    def from_pretrained(cls, encoder_path, decoder_path=None, dtype=torch.float32, device="cpu", encoder_device=None,
                        **encoder_args):
        """De-normalization from RELEASED_ENCODERS, else from the encoder's preprocessor_config.json."""
        if decoder_path is None:
            decoder = None
        elif encoder_path in RELEASED_ENCODERS:
            decoder = load_decoder(decoder_path, *RELEASED_ENCODERS[encoder_path][1:], dtype, device)
        else:
            processing = read_encoder_config(resolve(encoder_path, allow_patterns=["*.json"]))[2]
            decoder = load_decoder(decoder_path, processing.image_mean, processing.image_std, dtype, device)
        encoder_args = dict(path_or_repo=encoder_path, dtype=dtype, device=encoder_device or device) | encoder_args
        return cls(decoder, decoder_path, device, encoder_args)

    @property
    def encoder(self):
        if self._encoder is None:
            try:
                encoder = load_encoder(**self.encoder_args)
            except WeightsError as e:
                raise WeightsError(f"reading an image needs the encoder {self.encoder_path}: {e}") from None
            stats = (tuple(encoder.image_mean), tuple(encoder.image_std))
            if self.decoder is not None and stats != (self.decoder.image_mean, self.decoder.image_std):
                raise WeightsError(f"the encoder {self.encoder_path} normalizes pixels with mean, std = {stats}, but "
                                   f"the decoder de-normalizes with {self.decoder.image_mean, self.decoder.image_std}")
            self._encoder = encoder
        return self._encoder

    @torch.no_grad()
    def encode(self, images, official=False):  # a list of PIL images -> latents (B, 256, C) on self.device
        pixels = self.encoder.preprocess(images).to(next(self.encoder.parameters()).device)
        return self.encoder.encode(pixels, official).to(self.device)

    @torch.no_grad()
    def decode(self, latents):  # (B, 256, C) -> (B, 3, H, W) in [0, 1]
        return self.decoder(latents).clamp(0, 1)

    @staticmethod
    def to_pil(images):
        """(B, 3, H, W) images -> uint8 PIL images as the official CLI makes them: clip to [0, 1], x255, truncate."""
        a = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(x) for x in (a * 255).astype(np.uint8)]
