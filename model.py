"""Qwen2.5 and the unified Scale-RAE model, hand-written, with the official parameter names.

Part 1 is an unmodified Qwen2.5 decoder (arXiv 2412.15115) with Hugging Face's parameter names and numerics
(transformers' modeling_qwen2.py; RMSNorm in float32, rotate-half RoPE, grouped-query attention through SDPA), plus a
static KV cache. Part 2 is Scale-RAE around it (official scale_rae_qwen2.py / scale_rae_arch.py, "query" mode):
`model.latent_queries` (256 learned vectors appended after <im_start>), `model.mm_projector` (how the LLM reads
images and latents), `diff_head_projector` (the DiT's per-token condition) and `diff_head` (dit.py). Generation is
greedy, as official: prefill, text until <im_start>, then <im_start> + the 256 queries in one block, whose final
hidden states condition the DiT. Training: cross-entropy on the answer + 2.0 x the diffusion loss of answer images.
"""

import argparse
import json
import math
import re
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit import DIT_PRESETS, DiffusionHead, DiTConfig, RMSNorm, initial_noise
from rae import RELEASED_ENCODERS, RAE
from tokenizer import IMAGE_TOKEN, Tokenizer, chat_prompt
from weights import WeightsError, caster, from_dict, load_strict, read_config, read_safetensors, resolve, save_safetensors, write_folder


@dataclass
class QwenConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # std of the weights of a model trained from scratch

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_official(cls, d):  # a Hugging Face config.json; unknown fields are ignored
        return from_dict(cls, d)


QWEN_PRESETS = {
    "qwen2.5-1.5b": QwenConfig(),
    "qwen2.5-7b": QwenConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    # The toy LLM (toy.py): CPU-sized; at its width Qwen's 0.02 init made the DiT ignore its condition (README).
    "toy": QwenConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, initializer_range=128 ** -0.5),
}


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, in the rotate-half layout: [f0..f(d/2-1), f0..f(d/2-1)]."""

    def __init__(self, head_dim, theta):
        super().__init__()
        # Explicitly on the CPU in float32 (also when the model is built on `meta`), like transformers.
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions, dtype):  # positions (B, T) int
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, d/2)
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


class KVCache:
    """Static per-layer key/value buffers: prefill once, then append one token or a block (256 latent queries).
    Each call appends at `length`; the last layer's call moves `length` past the new positions."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled so far (a Python int: the loop on the host knows it anyway)

    def select(self, rows):  # keep only some batch rows (e.g. those that go on to generate an image)
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]

    def update(self, layer, k, v):  # k, v (B, n_kv, T, hd) -> all keys/values so far
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        if layer == len(self.k) - 1:
            self.length = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = (q * cos + rotate_half(q) * sin).to(v.dtype)  # under autocast fp32 cos/sin promote q, k; SDPA wants
        k = (k * cos + rotate_half(k) * sin).to(v.dtype)  # one dtype (it is not autocast on XLA)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd), S = cached + T
        # mask None means plain causal attention over a sequence that starts at position 0.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """The `model.` part: embeddings, decoder layers, final norm."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, x, positions=None, mask=None, cache=None):  # x (B, T, H) embeddings -> post-norm (B, T, H)
        if positions is None:  # the next positions: cache.length + arange(T)
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + x.shape[1], device=x.device).expand(x.shape[0], -1)
        cos, sin = self.rotary(positions, self.norm.weight.dtype)  # the model's: x may be bf16 (official rounding)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


def attention_mask(valid, start, T):
    """Boolean SDPA mask (B, 1, T, start+T): T new queries at columns start.. see the real (`valid` (B, S)), non-future
    keys, and always themselves, so a padding query's softmax never divides by zero."""
    S = start + T
    q_pos = torch.arange(start, S, device=valid.device)[:, None]
    k_pos = torch.arange(S, device=valid.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & valid[:, None, :S]  # (B, T, S)
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of the logits F.linear(h, W).float() (h (..., T, H), W (V, H)) against targets (..., T)
    (-100: ignored), `chunk` positions of every row at a time (a batch-sharded h stays sharded): forward keeps each
    row's logsumexp, backward recomputes each chunk's logits; the fp32 logits, softmax and gradient exist per chunk.
    Rows of W from `vocab` on are padding (to shard evenly, train_tpu.py): -inf logits, zero gradients."""
    gather = staticmethod(lambda w: w)  # SPMD (train_tpu.py): W made whole once for all chunks, not once per chunk

    @staticmethod
    def forward(ctx, h, W, targets, chunk, vocab):
        w, labelled, t = ChunkedCrossEntropy.gather(W.to(h.dtype)), targets != -100, targets.clamp(min=0)[..., None]
        lse, loss, ctx.chunk, ctx.vocab = [], 0, chunk, vocab
        for i in range(0, h.shape[-2], chunk):  # a fixed loop, traced unrolled; the last chunk may be shorter
            logits = F.linear(h[..., i:i + chunk, :], w).float()  # (..., chunk, V): rounded as the plain path's
            logits[..., vocab:] = -math.inf
            lse.append(logits.logsumexp(-1))
            nll = lse[-1] - logits.gather(-1, t[..., i:i + chunk, :])[..., 0]
            loss = loss + torch.where(labelled[..., i:i + chunk], nll, 0).sum()
        ctx.save_for_backward(h, W, t, labelled, torch.cat(lse, -1))  # lse (..., T) float32
        return loss

    @staticmethod
    def backward(ctx, grad):  # d loss / d logits = grad x (softmax - onehot target) on labelled rows, 0 on the others
        h, W, t, labelled, lse = ctx.saved_tensors
        w, scale = ChunkedCrossEntropy.gather(W.to(h.dtype)), torch.where(labelled, grad, 0)[..., None]  # (..., T, 1)
        grad_h, grad_W = torch.empty_like(h), torch.zeros_like(W) if ctx.needs_input_grad[1] else None
        for i in range(0, h.shape[-2], ctx.chunk):
            rows, hc = slice(i, i + ctx.chunk), h[..., i:i + ctx.chunk, :]
            d = F.linear(hc, w).float().sub_(lse[..., rows, None]).exp_()  # softmax, in place: one (..., chunk, V)
            d[..., ctx.vocab:] = 0  # padding rows (their forward logits were -inf)
            d.scatter_add_(-1, t[..., rows, :], torch.full_like(scale[..., rows, :], -1.0))
            d = d.mul_(scale[..., rows, :]).to(h.dtype)  # autograd's grad of .float(): back to the matmul's dtype
            grad_h[..., rows, :] = d @ w
            if grad_W is not None:  # in place when the dtypes match (no second (V, H) tensor); bf16 h: summed in fp32
                d, hc = d.flatten(0, -2), hc.flatten(0, -2)
                grad_W.addmm_(d.T, hc) if grad_W.dtype == d.dtype else grad_W.add_(d.T @ hc)
        return grad_h, grad_W, None, None, None


CE_CHUNK = 128  # positions: B x 128 x V x 4 bytes of logits, 78 MB per row


def chunked_cross_entropy(h, W, targets, chunk=CE_CHUNK, vocab=None):  # in h's dtype (autocast's if on, as F.linear)
    h = h.to(torch.get_autocast_dtype(h.device.type)) if torch.is_autocast_enabled(h.device.type) else h
    return ChunkedCrossEntropy.apply(h, W, targets, chunk, vocab or len(W))


class Qwen2ForCausalLM(nn.Module):
    backbone = Qwen2Model

    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.config = cfg
        self.model = self.backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """transformers' Qwen2 init, for training from scratch: N(0, initializer_range) weights, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, self.config.initializer_range)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()

    @torch.no_grad()
    def resize_token_embeddings(self, n, new_tokens=2):
        """n vocabulary rows (Qwen2.5 pads to 151936), the last `new_tokens` (<im_start>, <im_end>) set to the mean of
        the others, in both embeddings and an untied lm_head: the official initialize_vision_tokenizer of stage 1."""
        def resized(weight):
            out = weight.new_zeros(n, weight.shape[1])
            out[:min(n, len(weight))] = weight[:n]
            out[n - new_tokens:] = out[:n - new_tokens].mean(0)
            return nn.Parameter(out)
        self.model.embed_tokens.weight = resized(self.model.embed_tokens.weight)
        self.model.embed_tokens.num_embeddings = n
        if not self.config.tie_word_embeddings:
            self.lm_head.weight = resized(self.lm_head.weight)
            self.lm_head.out_features = n
        self.config.vocab_size = n

    @property
    def lm_head_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def logits(self, h):  # only where a token is chosen: vocabulary logits are the biggest tensor here
        return F.linear(h, self.lm_head_weight).float()

    def forward(self, input_ids=None, inputs_embeds=None, positions=None, mask=None, cache=None):
        """Final-norm hidden states (B, T, H). Pass ids or embeddings; positions default to cache.length + arange(T)."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.model(x, positions, mask, cache)

    checkpoint_keys = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")  # the LM in a bigger file
    config_class = QwenConfig

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Weights from a local folder or Hub id: config.json + model.safetensors (or sharded), strictly loaded."""
        folder = resolve(path, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        cfg = cls.config_class.from_official(read_config(folder))
        with torch.device("meta"):
            model = cls(cfg)
        sd = read_safetensors(folder, keep=cls.checkpoint_keys, cast=caster(model, dtype, device))
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # tied: the official save drops it, and transformers re-ties it anyway
        return load_strict(model, sd, f"{cls.__name__} weights in {folder}", dtype, device)


# ---- Part 2: Scale-RAE ----------------------------------------------------------------------------------------
@dataclass
class ScaleRAEConfig(QwenConfig):
    """The official config.json: a Qwen2 config plus the multimodal fields (official names in from/to_official)."""
    dit: DiTConfig = field(default_factory=DiTConfig)
    mm_hidden_size: int = 1152  # encoder width: the input of mm_projector
    encoder: str = "google/siglip2-so400m-patch14-224"  # not in the checkpoint: loaded only when an image is read
    encoder_image_size: int = None  # the `-res` of the official tower name (DINO): its resolution, if not its own
    tokenizer_model_max_length: int = 512

    @property
    def image_tokens(self):  # encoder tokens per image = latent queries = DiT tokens: 256 (16 x 16) when released
        return self.dit.tokens

    @classmethod
    def from_official(cls, d):
        """From an official config.json. Only the configuration of the released models is supported (query mode,
        DiT head, mlp2x_gelu projector, no latent normalization); anything else is a clear error."""
        required = ["hidden_size", "diffusion_model_hidden_size", "diffusion_model_depth", "diffusion_model_heads",
                    "diffusion_model_channels", "diffusion_model_z_channels", "mm_vision_tower_aux_list"]
        problems = [f"{k} is missing" for k in required if k not in d]
        # The values the released models have and the official code reads (a DINO tower ignores the select layer).
        tower = re.fullmatch(r"(.*?)(-res(\d+))?(-interp\d+)?", d.get("mm_vision_tower_aux_list", [""])[0])
        expected = {"model_type": ("qwen2", "cambrian_qwen"), "vision_loss": ("diffusion-loss",), "dit_cls": ("DiT",),
                    "vision_loss_mode": ("query",), "use_sliding_window": (False,), "mm_use_im_start_end": (True,),
                    "mm_projector_type": ("mlp2x_gelu",), "mm_vision_select_feature": ("patch",),
                    "diffusion_base_dim": (None, 4096), "diffusion_norm_stats_path": (None, "")}
        expected |= {} if "dino" in tower[1] else {"mm_vision_select_layer": (-1,)}
        problems += [f"{k}={d[k]!r} (supported: {' or '.join(map(repr, v))})" for k, v in expected.items()
                     if d.get(k, v[0]) not in v]
        max_length = d.get("tokenizer_model_max_length", 512)
        if not isinstance(max_length, int) or max_length < 1:
            problems.append(f"tokenizer_model_max_length={max_length!r} (a positive integer)")
        if d.get("diffusion_model_z_channels") == 0:
            problems.append("diffusion_model_z_channels=0 (a DiT without diff_head_projector)")
        tokens = d.get("mm_vision_tower_aux_token_len_list", [256])[0]  # the official DiT fixes 256; the toy has 64
        if (side := math.isqrt(tokens)) ** 2 != tokens:
            problems.append(f"mm_vision_tower_aux_token_len_list=[{tokens}] (must be a square grid)")
        if problems:
            raise WeightsError("unsupported Scale-RAE config.json: " + "; ".join(problems))
        dit = DiTConfig(hidden_size=d["diffusion_model_hidden_size"], depth=d["diffusion_model_depth"],
                        num_heads=d["diffusion_model_heads"], in_channels=d["diffusion_model_channels"],
                        z_channels=d["diffusion_model_z_channels"], input_size=side,
                        class_dropout_prob=d.get("diffusion_class_dropout_prob", 0.0))  # the official fallback
        llm = QwenConfig.from_official(d)
        return cls(**{f.name: getattr(llm, f.name) for f in fields(QwenConfig)}, dit=dit,
                   mm_hidden_size=d.get("mm_hidden_size", dit.in_channels),
                   encoder=tower[1], encoder_image_size=tower[3] and int(tower[3]),
                   tokenizer_model_max_length=d.get("tokenizer_model_max_length", 512))

    def to_official(self):
        """The official config.json fields (what the official loader reads), so an export loads in both codebases."""
        d = {f.name: getattr(self, f.name) for f in fields(QwenConfig)}
        return {
            "architectures": ["ScaleRAEQwenForCausalLM"], "model_type": "qwen2", **d, "hidden_act": "silu",
            "max_position_embeddings": 32768, "use_sliding_window": False, "rope_scaling": None, "use_cache": True,
            "torch_dtype": "float32", "vision_loss": "diffusion-loss", "vision_loss_mode": "query", "vision_coef": 2.0,
            "diffusion_split_per_token": self.image_tokens, "diffusion_model_hidden_size": self.dit.hidden_size,
            "diffusion_model_channels": self.dit.in_channels, "diffusion_model_depth": self.dit.depth,
            "diffusion_model_heads": self.dit.num_heads, "diffusion_model_z_channels": self.dit.z_channels,
            "diffusion_class_dropout_prob": self.dit.class_dropout_prob, "dit_cls": "DiT", "diffusion_base_dim": None,
            "diffusion_norm_stats_path": None, "diffusion_timesteps_per_sample": 1, "aux_regression": False,
            "mm_vision_tower_aux_list": [self.encoder + (f"-res{self.encoder_image_size}" if self.encoder_image_size
                                                         else "")],
            "mm_vision_tower_aux_token_len_list": [self.image_tokens],
            "vision_tower_aux_token_len_list": [self.image_tokens], "mm_hidden_size": self.mm_hidden_size,
            "mm_projector_type": "mlp2x_gelu", "use_mm_proj": True, "mm_vision_select_layer": -1,
            "mm_vision_select_feature": "patch", "mm_use_im_start_end": True, "mm_use_im_patch_token": False,
            "image_aspect_ratio": "square", "tokenizer_model_max_length": self.tokenizer_model_max_length,
            "tokenizer_padding_side": "right",
        }


SCALE_RAE_PRESETS = {
    # Qwen2.5-1.5B + DiT-2.4B on SigLIP-2 So400M latents (1152 channels): nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B.
    "qwen1.5b-dit2.4b": ScaleRAEConfig(**vars(QWEN_PRESETS["qwen2.5-1.5b"]) | {"vocab_size": 151667},
                                       dit=DIT_PRESETS["dit-2.4b"]),
    # Qwen2.5-7B + DiT-9.8B. The released checkpoint's z_channels is read from its config.json; 3072 is docs/Train.md.
    "qwen7b-dit9.8b": ScaleRAEConfig(**vars(QWEN_PRESETS["qwen2.5-7b"]) | {"vocab_size": 151667},
                                     dit=DIT_PRESETS["dit-9.8b"]),
}


class ScaleRAEModel(Qwen2Model):
    """The `model.` part of the checkpoint: Qwen2 plus the latent queries and the understanding projector."""

    def __init__(self, cfg: ScaleRAEConfig):
        super().__init__(cfg)
        H = cfg.hidden_size
        self.latent_queries = nn.Parameter(torch.randn(cfg.image_tokens, H) / math.sqrt(H))  # official init
        self.mm_projector = nn.Sequential(nn.Linear(cfg.mm_hidden_size, H), nn.GELU(), nn.Linear(H, H))


class ScaleRAE(Qwen2ForCausalLM):
    backbone = ScaleRAEModel

    def __init__(self, cfg: ScaleRAEConfig):
        super().__init__(cfg)
        for layer in self.model.mm_projector[::2]:
            layer.reset_parameters()  # official: built after the LLM's init, so PyTorch's default initialization
        self.diff_head_projector = nn.Linear(cfg.hidden_size, cfg.dit.z_channels)
        nn.init.normal_(self.diff_head_projector.weight, std=0.02)  # official init; the DiT initializes itself
        nn.init.zeros_(self.diff_head_projector.bias)
        self.diff_head = DiffusionHead(cfg.dit)

    def image_slots(self, input_ids):
        """(B, 256, 1) positions of each row's image slots, its one run of IMAGE_TOKEN (rows without one: 0..255,
        which callers mask). Static shapes (no boolean indexing), so XLA compiles one graph for every batch."""
        start = (input_ids == IMAGE_TOKEN).int().argmax(1, keepdim=True)  # (B, 1)
        slots = start + torch.arange(self.config.image_tokens, device=input_ids.device)
        return slots.clamp(max=input_ids.shape[1] - 1)[..., None]

    def embed(self, input_ids, image_features, image_is_target):
        """Token embeddings (B, L, H) with each row's image slots filled: an understanding image as
        mm_projector(image_features (B, 256, C)); an image to generate (image_is_target) as the latent queries."""
        x = self.model.embed_tokens(input_ids.clamp(min=0))  # (B, L, H)
        if image_features is None:
            return x
        if image_features.shape[1] != self.config.image_tokens:  # never silently cut to the first 256
            raise ValueError(f"{image_features.shape[1]} image tokens; the model reads {self.config.image_tokens}")
        fill = self.model.mm_projector(image_features.to(x.dtype))  # (B, 256, H)
        if image_is_target is not None:
            queries = self.model.latent_queries.to(x.dtype)[None]
            fill = torch.where(image_is_target[:, None, None], queries, fill)
        filled = x.scatter(1, self.image_slots(input_ids).expand(-1, -1, x.shape[-1]), fill)
        return torch.where((input_ids == IMAGE_TOKEN)[..., None], filled, x)

    def training_loss(self, input_ids, labels, image_features, image_is_target, vision_coef=2.0, timesteps_per_image=1,
                      static_shapes=True):
        """(loss, ce, diff): token-mean CE over labelled tokens + vision_coef x the mean rectified-flow loss of the
        answer images, whose token n is conditioned on the post-norm state AT query n (no shift; the last query also
        predicts <im_end>: official query mode). timesteps_per_image K: the official K-tiling, K DiT passes per LLM
        pass. static_shapes: the DiT runs on every row and a mask keeps the answer images, as official (one XLA
        graph); False runs it on the answer images alone (eager PyTorch: no work thrown away)."""
        # The backbone, not self(): a nested FSDP2 root forward (train_tpu.py) would free weights the embeddings need.
        h = self.model(self.embed(input_ids, image_features, image_is_target))  # (B, L, H)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position l predicts token l + 1; the last, nothing
        ce_sum = chunked_cross_entropy(h, self.lm_head_weight, targets, vocab=self.config.vocab_size)  # not B x L x V
        ce = ce_sum / (targets != -100).sum().clamp(min=1)  # a batch without labels gives 0, not NaN
        if not static_shapes:
            rows = image_is_target.nonzero()[:, 0]
            input_ids, h, image_features, image_is_target = (v[rows] for v in (input_ids, h, image_features,
                                                                                image_is_target))
        h_img = torch.gather(h, 1, self.image_slots(input_ids).expand(-1, -1, h.shape[-1]))  # (B, 256, H)
        K = timesteps_per_image
        cond = self.diff_head_projector(h_img).repeat_interleave(K, 0)  # (B*K, 256, Z)
        per_image = self.diff_head.loss(image_features.repeat_interleave(K, 0), cond).view(-1, K).mean(1)  # (B,)
        w = image_is_target.to(per_image.dtype)
        diff = (per_image * w).sum() / (w.sum() + 1e-8)  # 0 when no row has an answer image
        return ce + vision_coef * diff, ce, diff

    @torch.no_grad()
    def generate(self, prompts, stop_ids, image_start_id, image_features=None, max_new_tokens=512, official=False):
        """Greedy decoding of a batch of prompts with a KV cache, as the official loop does without one. prompts: lists
        of token ids; a run of 256 IMAGE_TOKEN slots holds row i of image_features (N, 256, C) (understanding). A row
        stops at a stop id (kept), at max_new_tokens, or when it emits <im_start>: then <im_start> + the 256 latent
        queries are appended in one block, and the queries' projected post-norm hidden states become its DiT condition
        (as official, no text follows an image). official: no cache, the official loop's arithmetic (see forward).
        Returns per prompt (generated ids, condition (256, Z) or None)."""
        device, dtype = self.model.norm.weight.device, self.model.norm.weight.dtype
        T = self.config.image_tokens
        B, P = len(prompts), max(map(len, prompts))
        cache = KVCache(self.config, B, P + max_new_tokens + 1 + T, device, dtype)
        ids = torch.zeros(B, P, dtype=torch.long, device=device)
        valid = torch.zeros(B, cache.max_len, dtype=torch.bool, device=device)  # real (non-padding) positions
        for b, p in enumerate(prompts):  # left padding, so every row's next token lands in the same column
            ids[b, P - len(p):] = torch.tensor(p, device=device)
            valid[b, P - len(p):P] = True
        padded, seq = not bool(valid[:, :P].all()), []

        def forward(x):  # the next x.shape[1] columns through the LLM; padding does not advance RoPE positions
            if official:  # every column again at every step, as the official loop (a bf16 prompt with an image rounds
                seq.append(x)  # in layer 0's RMSNorm on the first step only: later, fp32 tokens promote it)
                x, cache.length = torch.cat(seq, 1), 0
            col, n = cache.length, x.shape[1]
            positions = (valid.cumsum(-1) - 1).clamp(min=0)[:, col:col + n]
            mask = attention_mask(valid, col, n) if padded or col else None  # None: plain causal (SDPA's fast path)
            return self(inputs_embeds=x, positions=positions, mask=mask, cache=cache)

        x = self.embed(ids, image_features, None)
        h = forward(x.bfloat16() if official and image_features is not None else x)  # official: in bf16 with an image
        out, active, wants_image = [[] for _ in range(B)], [True] * B, [False] * B
        for step in range(max_new_tokens):
            token = self.logits(h if official else h[:, -1:])[:, -1].argmax(-1)  # (B,); official: every column's logits
            for b, t in enumerate(token.tolist()):  # one host sync per token: the loop must decide whether to stop
                if active[b]:
                    out[b].append(t)
                    wants_image[b] = t == image_start_id
                    active[b] = t not in stop_ids and not wants_image[b]
            if not any(active) or step == max_new_tokens - 1:
                break
            valid[:, cache.length] = torch.tensor(active, device=device)
            h = forward(self.model.embed_tokens(token[:, None]))
        conditions, rows = {}, [b for b in range(B) if wants_image[b]]
        if rows:
            sel = torch.tensor(rows, device=device)
            cache.select(sel)
            valid, seq[:] = valid[sel], [s[sel] for s in seq]
            valid[:, cache.length:cache.length + 1 + T] = True
            start = self.model.embed_tokens(torch.full((len(rows), 1), image_start_id, device=device))
            queries = self.model.latent_queries.to(dtype)[None].expand(len(rows), -1, -1)
            y = self.diff_head_projector(forward(torch.cat([start, queries], 1))[:, -T:])  # (rows, 256, Z)
            conditions = dict(zip(rows, y))
        return [(out[b], conditions.get(b)) for b in range(B)]

    def chat(self, tokenizer, prompts, image_features=None, max_new_tokens=512, batch_size=None, official=False):
        """Greedy answers to user prompts (the chat template is applied here), batch_size prompts at a time; with
        image_features (N, 256, C), prompt i is about image i (understanding). [(generated ids, condition or None)].
        official: the official numerics (generate), and its cut of a prompt with an image to the trained length."""
        with_image = image_features is not None
        ids = [tokenizer.encode_with_image(chat_prompt(p, image=with_image), self.config.image_tokens) for p in prompts]
        trained = self.config.tokenizer_model_max_length
        for p, i in zip(prompts, ids):
            if len(i) > trained:
                warnings.warn(f"prompt {p[:40]!r}... is {len(i)} tokens, longer than the {trained} positions the model "
                              f"was trained on; expect a poor answer")
        ids = [i[:trained] for i in ids] if official and with_image else ids  # the official cut (ours warns only)
        n = batch_size or len(ids)
        return [r for i in range(0, len(ids), n) for r in self.generate(
            ids[i:i + n], {tokenizer.chat_end}, tokenizer.image_start,
            None if image_features is None else image_features[i:i + n], max_new_tokens, official)]

    @torch.no_grad()
    def sample_latents(self, conditions, seeds, steps=None, cfg_scale=1.0, cfg_interval=None, batch_size=None):
        """DiT sampling, batch_size images at a time: conditions (N, 256, Z) -> latents (N, 256, C) float32; image i
        starts from seed seeds[i], so a batch reproduces single-image results."""
        n = batch_size or len(seeds)
        return torch.cat([self.diff_head.sample(
            conditions[i:i + n], initial_noise(seeds[i:i + n], self.config.dit.in_channels, conditions.device,
                                               size=self.config.dit.input_size),
            steps=steps, cfg_scale=cfg_scale, cfg_interval=cfg_interval)
            for i in range(0, len(seeds), n)])

    checkpoint_keys = None  # every key of the file belongs to the model
    config_class = ScaleRAEConfig

    def save_pretrained(self, folder, tokenizer, state_dict=None, full=lambda t: t):
        """The official layout in a new folder: config.json, model.safetensors (fp32: save_safetensors), tokenizer."""
        def write(tmp):
            save_safetensors(state_dict or self.state_dict(), tmp / "model.safetensors", {"format": "pt"},
                             torch.float32, full)
            (tmp / "config.json").write_text(json.dumps(self.config.to_official(), indent=2))
            tokenizer.save(tmp)
        write_folder(folder, write)


TOY_MODEL = Path(__file__).parent / "toy"  # the toy model shipped with the repository (toy.py --ship); path "toy"


def checkpoint_encoder(folder, config):
    """The encoder a checkpoint was trained on: the subfolder it ships (the toy model's), else config.encoder."""
    shipped = Path(folder) / config.encoder
    return str(shipped) if shipped.is_dir() else config.encoder


def load_pipeline(path, decoder=None, dtype=None, device=None, encoder=None, official=False):
    """(model, tokenizer, rae) of a Scale-RAE checkpoint (Hub id, folder, or "toy": the shipped TOY_MODEL); cuda and
    bfloat16 when there is a GPU, else cpu and float32. The decoder defaults to the checkpoint's `decoder/` or the one
    released for its encoder (False: none); the encoder (default: the model's) loads only when an image is read.
    official: float32, and the encoder on the CPU, as the official CLI. Failures are one-line WeightsErrors."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # "bfloat16", as the scripts' --dtype says
    dtype = torch.float32 if official else dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    try:
        folder = resolve(TOY_MODEL if str(path) == "toy" else path, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        model = ScaleRAE.from_pretrained(folder, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_dir(folder)
        encoder = encoder or checkpoint_encoder(folder, model.config)
        if decoder is None:
            released = RELEASED_ENCODERS.get(model.config.encoder, [None])[0]
            decoder = str(folder / "decoder") if (folder / "decoder").is_dir() else released
        if decoder is None:
            raise WeightsError(f"no default RAE decoder for the encoder {encoder!r}; pass a decoder")
        return model, tokenizer, RAE.from_pretrained(
            encoder, decoder or None, dtype, device, "cpu" if official else device,
            image_size=model.config.encoder_image_size, tokens=model.config.image_tokens)
    except (OSError, ValueError) as e:  # a missing or malformed file that the readers did not name themselves
        raise WeightsError(f"{type(e).__name__}: {e}") from None


def at_least(lo, kind=int, hi=None):
    """An argparse type for the scripts: a finite number in [lo, hi], so a bad value is a usage error before anything
    loads (a NaN guidance scale would otherwise draw black images)."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}" + (f" and <= {hi}" if hi is not None else "")
                                             + f", got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def available_device(name):
    """An argparse type for the scripts: a torch device this machine has (cpu, cuda[:n], mps)."""
    try:
        d = torch.device(name)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e).splitlines()[0]) from None
    if d.type == "cpu" or d.type == "cuda" and (d.index or 0) < torch.cuda.device_count() or \
            d.type == "mps" and torch.backends.mps.is_available():
        return name
    raise argparse.ArgumentTypeError(f"{name}: no such device here")
