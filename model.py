"""Qwen2.5, hand-written, with the Hugging Face parameter names.

The language model of Scale-RAE (arXiv 2601.16208) is an unmodified Qwen2.5 decoder (Qwen2.5 technical report,
arXiv 2412.15115; reference code: transformers' modeling_qwen2.py). Parameter names are Hugging Face's
(`model.embed_tokens.weight`, `model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`), so official
checkpoints load with no renaming, and RoPE uses the same rotate-half layout.

Numerics follow transformers (checked to 1e-5 in float32 by tests/test_qwen.py):
  RMSNorm normalizes in float32, casts back to the input dtype, and only then multiplies by the weight;
  the RoPE inverse frequencies are computed once on the CPU in float32;
  attention is causal grouped-query attention through F.scaled_dot_product_attention (q/k/v have biases, o_proj not).
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import load_strict, read_config, read_safetensors, resolve


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

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d):
        """From a Hugging Face config.json; fields this model does not use are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


QWEN_PRESETS = {
    "qwen2.5-1.5b": QwenConfig(),
    "qwen2.5-7b": QwenConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # cast before the weight multiply, as transformers does


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
    """Static per-layer key/value buffers: prefill once, then append one token or a block (256 latent queries)."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled so far (a Python int: the loop on the host knows it anyway)

    def update(self, layer, k, v):  # k, v (B, n_kv, T, hd) -> all keys/values so far
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
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
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
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

    def forward(self, x, positions, mask=None, cache=None):  # x (B, T, H) embeddings -> post-norm (B, T, H)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)


def attention_mask(valid, start, T):
    """Boolean SDPA mask (B, 1, T, start+T) for T new queries at positions start.. over all keys so far.

    `valid` (B, S) marks real (non-padding) key positions; a query sees a key iff it is real and not in the future.
    Rows that see nothing (a padding query) get their own position unmasked, so softmax never divides by zero.
    """
    S = start + T
    q_pos = torch.arange(start, S, device=valid.device)[:, None]
    k_pos = torch.arange(S, device=valid.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & valid[:, None, :S]  # (B, T, S)
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


class Qwen2ForCausalLM(nn.Module):
    backbone = Qwen2Model

    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.config = cfg
        self.model = self.backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def lm_head_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def logits(self, h):  # only where a token is chosen: vocabulary logits are the biggest tensor here
        return F.linear(h, self.lm_head_weight).float()

    def forward(self, input_ids=None, inputs_embeds=None, positions=None, mask=None, cache=None):
        """Final-norm hidden states (B, T, H). Pass ids or embeddings; positions default to cache.length + arange(T)."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self.model(x, positions, mask, cache)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Qwen2 weights from a local folder or Hub id; only the LM's keys are read from a larger checkpoint."""
        folder = resolve(path, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        cfg = QwenConfig.from_dict(read_config(folder))
        with torch.device("meta"):
            model = cls(cfg)
        sd = read_safetensors(folder, keep=("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."))
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # tied: the official save drops it, and transformers re-ties it anyway
        load_strict(model, sd, f"Qwen2 weights in {folder}", dtype=dtype)
        return model.to(device).eval()

