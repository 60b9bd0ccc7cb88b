"""The diffusion head of Scale-RAE: a LightningDiT and rectified flow in the encoder's latent space.

The DiT (LightningDiT, arXiv 2501.01423; DiT, arXiv 2212.09748) generates the 256 encoder tokens conditioned token by
token on the LLM's latent-query states: 1×1 patch embedding + fixed 2-D sin-cos positions, Gaussian-Fourier timestep
embedding, adaLN-Zero blocks with RMSNorm, 2-D RoPE and SwiGLU, with the official parameter names (`diff_head.model.*`;
official code: scale_rae/model/diffusion_loss/). Rectified flow (SD3, arXiv 2403.03206): x_t = (1 - t)·x0 + t·ε,
v = ε - x0, time shifted by s = sqrt(C·T / 4096). In float32 the forward (its attention the official explicit
softmax), the 49-step sampler, the loss and a fresh init match the official modules bit for bit; Fourier features,
RoPE tables, the softmax and the sampler stay float32 in a bf16 model (the official bf16 run loses phase).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiTConfig:
    hidden_size: int = 2048
    depth: int = 32
    num_heads: int = 32
    in_channels: int = 1152         # C: the encoder width (1152 SigLIP-2, 1024 WebSSL)
    z_channels: int = 2048          # Z: the condition width (the diff_head_projector output)
    input_size: int = 16            # the latent grid is input_size × input_size tokens
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # CFG condition dropout; 0 means no learned null condition (no dropout_embedding)

    @property
    def tokens(self):
        return self.input_size ** 2


DIT_PRESETS = {
    "dit-2.4b": DiTConfig(),  # 2,435,944,896 parameters; 2,435,977,664 state-dict numbers with the RoPE tables
    # Sizes from the official docs/Train.md; its z_channels (3072) gives 8.19B, not 9.8B: the released checkpoint's
    # config.json says the real Z (model.ScaleRAEConfig.from_official reads it).
    "dit-9.8b": DiTConfig(hidden_size=3072, depth=48, num_heads=48, z_channels=3072),
    # The toy DiT on the toy encoder's 8 x 8 tokens of 96 channels: wider than its tokens, as RAE found a DiT must be.
    "toy": DiTConfig(hidden_size=128, depth=4, num_heads=4, in_channels=96, z_channels=128, input_size=8),
}


# ---- fixed tables: absolute positions, RoPE ----
def sincos_pos_embed(dim, n):
    """(n*n, dim) fixed 2-D sin-cos table (MAE/DiT). Token h*n+w: the first dim/2 channels encode the column w, the
    last dim/2 the row h; each half is [sin(p·ω_k)]_k ++ [cos(p·ω_k)]_k with ω_k = 10000^(-k/(dim/4)), in float64."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    h, w = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")

    def half(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return torch.from_numpy(np.concatenate([half(w), half(h)], axis=1)).float()


def rope_tables(head_dim, n, theta=10000.0):
    """cos, sin (n*n, head_dim) of EVA-02's 2-D RoPE, in float32 as the official code builds them. Each axis gets
    head_dim/2 channels with frequencies f_j = theta^(-2j/(head_dim/2)), each repeated twice (the pairs (2m, 2m+1)
    rotate together); channels [0, head_dim/2) rotate by the row index, the rest by the column index."""
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, device="cpu")[:quarter].float() / (head_dim // 2))
    angles = torch.outer(torch.arange(n, device="cpu").float(), freqs).repeat_interleave(2, -1)   # (n, head_dim/2)
    table = torch.cat([angles.repeat_interleave(n, 0), angles.repeat(n, 1)], -1)  # token h*n + w: (row h, column w)
    return table.cos(), table.sin()


# ---- leaf modules ----
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalize in float32, back to the input dtype, then the weight (official order)
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class PatchEmbed(nn.Module):
    """`x_embedder`: timm's PatchEmbed with patch size 1, i.e. a 1×1 conv. Kept a conv (not a Linear) so that it
    runs under the same backend flags as the official one (cuDNN may use TF32 for convs by default on CUDA)."""

    def __init__(self, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=1, bias=True)

    def forward(self, x):  # (B, C, n, n) -> (B, n*n, H), token h*n + w
        return self.proj(x).flatten(2).transpose(1, 2)


class FourierTimestepEmbedder(nn.Module):
    """`t_embedder`: [sin(2π t W), cos(2π t W)] (sin first) with fixed W, then Linear-SiLU-Linear. t is used as is.
    W, the official Gaussian-Fourier frequencies, is n draws of N(0, 1) from a CPU generator seeded 114514. It is not
    in the checkpoint, so it must be regenerated exactly (the CPU normal stream is stable across torch versions)."""

    def __init__(self, z_channels, n=256):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(114514)
        self.register_buffer("W", torch.normal(0.0, 1.0, size=(n,), generator=g, device="cpu"), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * n, z_channels), nn.SiLU(), nn.Linear(z_channels, z_channels))

    def forward(self, t):  # (B,) -> (B, Z)
        angles = t.float()[:, None] * self.W.float()[None, :] * 2 * torch.pi  # ((t·W)·2)·π, the official order
        features = torch.cat([angles.sin(), angles.cos()], -1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Rope2D(nn.Module):
    """`feat_rope`: 2-D RoPE over the whole head_dim with interleaved pairs. The tables are checkpoint entries."""

    def __init__(self, head_dim, n):
        super().__init__()
        cos, sin = rope_tables(head_dim, n)
        self.register_buffer("freqs_cos", cos)  # (T, head_dim)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x):  # (B, heads, T, head_dim); float32 tables promote the product, then back to x's dtype
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x2, x1), -1).flatten(-2)  # (x[2m], x[2m+1]) -> (-x[2m+1], x[2m])
        return (x * self.freqs_cos + rotated * self.freqs_sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):  # (B, T, H)
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, T, hd)
        q, k = rope(q), rope(k)  # RoPE, then the official explicit softmax attention (bidirectional, in float32)
        w = (q * self.head_dim ** -0.5 @ k.transpose(-2, -1)).softmax(-1, dtype=torch.float32).to(q.dtype)
        return self.proj((w @ v).transpose(1, 2).reshape(B, T, H))


class SwiGLU(nn.Module):
    """Fused `w12` (the gate is the first half of its rows) and `w3`; hidden width int(2/3 · mlp_ratio · H)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, up = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(gate) * up)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """adaLN-Zero block with per-token modulation: shift, scale and gate are (B, T, H), computed from c (B, T, Z)."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.norm1 = RMSNorm(H)
        self.norm2 = RMSNorm(H)
        self.attn = Attention(H, cfg.num_heads)
        self.mlp = SwiGLU(H, int(2 / 3 * cfg.mlp_ratio * H))
        # The official code applies SiLU here although c is already silu(t_emb + y): SiLU twice, kept.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.z_channels, 6 * H))

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, -1)
        x = x + self.attn(modulate(self.norm1(x), shift1, scale1), rope) * gate1
        return x + self.mlp(modulate(self.norm2(x), shift2, scale2)) * gate2


class FinalLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm_final = RMSNorm(cfg.hidden_size)
        self.linear = nn.Linear(cfg.hidden_size, cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.z_channels, 2 * cfg.hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---- the DiT ----
class DiT(nn.Module):
    """The official LightningDiT as released: velocity v(x_t, t, y). Submodules are registered in the official
    order, so a fresh init draws the same random numbers as the official one under the same seed."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ValueError(f"hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must be a multiple of 4")
        self.config = cfg
        self.x_embedder = PatchEmbed(cfg.in_channels, cfg.hidden_size)
        self.t_embedder = FourierTimestepEmbedder(cfg.z_channels)
        if cfg.class_dropout_prob > 0:  # CFG's learned null condition (none without dropout, as ConditionEmbedder)
            self.y_embedder = nn.Module()
            self.y_embedder.dropout_embedding = nn.Parameter(torch.zeros(cfg.z_channels))
        # A frozen Parameter (not a buffer) because that is how the checkpoint stores it.
        self.pos_embed = nn.Parameter(sincos_pos_embed(cfg.hidden_size, cfg.input_size)[None], requires_grad=False)
        self.feat_rope = Rope2D(cfg.hidden_size // cfg.num_heads, cfg.input_size)
        self.dit_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """The official init (GPU_initialize_weights), adaLN-Zero: every adaLN output and the final linear are zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[1] for b in self.dit_blocks] + [self.final_layer.adaLN_modulation[1],
                                                                          self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        """x (B, C, n, n) channel-first noisy latent, t (B,) in (0, 1], y (B, T, Z) -> velocity (B, C, n, n)."""
        cfg, B, n = self.config, x.shape[0], self.config.input_size
        if x.shape[1:] != (cfg.in_channels, n, n) or y.shape != (B, cfg.tokens, cfg.z_channels) or t.shape != (B,):
            raise ValueError(f"DiT expects x (B, {cfg.in_channels}, {n}, {n}), t (B,), y (B, {cfg.tokens}, "
                             f"{cfg.z_channels}); got {tuple(x.shape)}, {tuple(t.shape)}, {tuple(y.shape)}")
        dtype = self.x_embedder.proj.weight.dtype
        s = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)                 # (B, T, H)
        c = F.silu(self.t_embedder(t)[:, None, :] + y.to(dtype))                    # (B, T, Z): per-token condition
        for block in self.dit_blocks:
            s = block(s, c, self.feat_rope)
        out = self.final_layer(s, c)                                                # (B, T, C)
        return out.view(B, n, n, cfg.in_channels).permute(0, 3, 1, 2)               # (B, C, n, n)


def dit_flops(cfg: DiTConfig):
    """Forward FLOPs (2 per multiply-add) of the DiT for one image and one step: the matmuls, the 1×1 conv and
    attention's two T×T products; elementwise work is not counted. ≈1.26 TFLOP for the 2.4B model."""
    H, Z, C, T, L = cfg.hidden_size, cfg.z_channels, cfg.in_channels, cfg.tokens, cfg.depth
    ffn = int(2 / 3 * cfg.mlp_ratio * H)
    per_token_block = 3 * H * H + H * H + H * 2 * ffn + ffn * H + Z * 6 * H   # qkv, proj, w12, w3, adaLN
    attention = 2 * T * T * H                                              # q·kᵀ and a·v, all heads
    per_token_outer = C * H + Z * 2 * H + H * C                             # x_embedder, final adaLN, final linear
    t_embed = 512 * Z + Z * Z                                               # once per image, not per token
    return 2 * (L * (T * per_token_block + attention) + T * per_token_outer + t_embed)


# ---- rectified flow: time grids and initial noise ----
def time_shift(t, shift):
    """s·t / (1 + (s - 1)·t), evaluated in this order as the official code does (numpy float64 or torch)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_shift(channels, tokens=256, base_dim=4096):
    """s = 1 / sqrt(base_dim / (C·T)), written as the official code computes it: √72 for C = 1152, 8.0 for C = 1024."""
    return 1 / math.sqrt(base_dim / (channels * tokens))


def official_timesteps(shift=flow_shift(1152)):
    """(t_curr, t_next), 49 float32 entries: the official "50-step" sampler (transport.py, respace.py) on 50 points of
    the grid shift(k/1000), k = 1..1000. It steps down 48 times from t = 0.99760 to 0.00842, then UP from index 48 to 49
    (t = 1.0) at the nearly clean sample: an official bug, reproduced so that official weights give official images."""
    grid = time_shift(np.linspace(1 / 1000, 1, 1000), shift)
    used = [round(k * 999 / 49) for k in range(50)]  # the same indices as the official accumulating float's
    pairs = [(used[i], used[i - 1]) for i in range(len(used) - 2, 0, -1)] + [(used[-2], used[-1])]
    t_curr = torch.tensor([grid[a] for a, _ in pairs], dtype=torch.float32)  # float64 -> float32, as torch.tensor(x)
    t_next = torch.tensor([grid[b] for _, b in pairs], dtype=torch.float32)
    return t_curr, t_next


def euler_timesteps(steps, shift):
    """(t_curr, t_next) float32 of a plain `steps`-step Euler sampler on the shifted grid from t = 1 down to t = 0."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    grid = time_shift(np.linspace(1.0, 0.0, steps + 1), shift)
    return torch.tensor(grid[:-1], dtype=torch.float32), torch.tensor(grid[1:], dtype=torch.float32)


def initial_noise(seeds, channels, device, dtype=torch.float32, size=16):
    """(B, C, size, size) channel-first noise, image i drawn alone from Generator(device).manual_seed(seeds[i]), so a
    batch reproduces single-image results (one randn over the batch would not)."""
    return torch.cat([torch.randn((1, channels, size, size), generator=torch.Generator(device).manual_seed(int(s)),
                                  device=device, dtype=dtype) for s in seeds])


# ---- the head: training loss and sampler ----
class DiffusionHead(nn.Module):
    """The official `diff_head` (FullSequenceRectifiedFlowProjector): a DiT, its flow shift, loss and sampler.
    Latents are exchanged in token layout (B, T, C), token n = h·n_side + w; the DiT works channel-first."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.model = DiT(cfg)
        self.shift = flow_shift(cfg.in_channels, cfg.tokens)

    @staticmethod
    def _check(what, x, *shape):
        """ValueError unless x has `shape`, where None (the batch size, still unknown) matches any size."""
        if x.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
            sizes = ", ".join("B" if s is None else str(s) for s in shape)
            raise ValueError(f"{what}: expected ({sizes}), got {tuple(x.shape)}")

    def loss(self, x0, y, t=None, noise=None):
        """Per-image rectified-flow loss (B,): mean over (C, H, W) of (v_θ(x_t, t, y) - (ε - x0))² for clean latents
        x0 (B, T, C), conditions y (B, T, Z). Drawn as the official training does, in its order: t = shift(sigmoid(u)),
        u ~ N(0, 1); ε in bfloat16 (get_x_end's default); in training, the null condition at p = class_dropout_prob."""
        cfg = self.config
        B = x0.shape[0]
        self._check("x0", x0, None, cfg.tokens, cfg.in_channels)
        self._check("y", y, B, cfg.tokens, cfg.z_channels)
        # (B, C, n, n), contiguous as the official, so that the loss sums in the same order
        x0 = x0.view(B, cfg.input_size, cfg.input_size, cfg.in_channels).permute(0, 3, 1, 2).contiguous()
        if t is None:
            t = time_shift(torch.sigmoid(torch.randn(B, device=x0.device)), self.shift)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=torch.bfloat16)
        if self.training and cfg.class_dropout_prob > 0:  # a dropped image's whole condition is the null one
            drop = torch.rand(B, device=y.device) < cfg.class_dropout_prob
            y = torch.where(drop[:, None, None], self.model.y_embedder.dropout_embedding.to(y.dtype), y)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * noise
        v = self.model(x_t, t, y)
        return (v.float() - (noise - x0).float()).pow(2).mean(dim=(1, 2, 3))

    @torch.no_grad()
    def sample(self, y, noise, steps=None, cfg_scale=1.0, cfg_interval=None):
        """Integrate dx/dt = v from noise (t ≈ 1) to data. y (B, T, Z), noise (B, C, n, n) -> latents (B, T, C) fp32.
        steps: None, the official 49-evaluation schedule; N, plain Euler from t = 1 to 0 on the same shifted grid.
        cfg_scale s > 1: real classifier-free guidance v = v_u + s·(v_c - v_u) with the learned null condition, in
        one batch of 2B (the official CLI's guidance is a no-op: diffloss.py infer), only where lo <= t <= hi for
        cfg_interval (lo, hi). The loop never reads a device value: which steps are guided is decided on the host."""
        cfg = self.config
        B = noise.shape[0]
        self._check("noise", noise, None, cfg.in_channels, cfg.input_size, cfg.input_size)
        self._check("y", y, B, cfg.tokens, cfg.z_channels)
        guided = cfg_scale != 1.0
        if guided and not hasattr(self.model, "y_embedder"):
            raise ValueError("cfg_scale != 1 needs the learned null condition, and this DiT was built without one "
                             "(class_dropout_prob = 0)")
        if cfg_interval is not None and not (len(cfg_interval) == 2 and cfg_interval[0] <= cfg_interval[1]):
            raise ValueError(f"cfg_interval must be (lo, hi) with lo <= hi, got {cfg_interval!r}")
        t_curr, t_next = official_timesteps(self.shift) if steps is None else euler_timesteps(steps, self.shift)
        lo, hi = cfg_interval if cfg_interval is not None else (-math.inf, math.inf)
        guide = [guided and lo <= float(tc) <= hi for tc in t_curr]
        t_curr, t_next = t_curr.to(noise.device), t_next.to(noise.device)
        dt = t_next - t_curr                                      # float32 on the device, as the official code
        x = noise.float()
        if guided:
            null = self.model.y_embedder.dropout_embedding.to(y.dtype).expand(B, cfg.tokens, -1)
            y2 = torch.cat([y, null])  # (2B, T, Z): cond, then the null condition
        for i in range(len(guide)):
            if guide[i]:
                v_c, v_u = self.model(torch.cat([x, x]), t_curr[i].expand(2 * B), y2).float().chunk(2)
                v = v_u + cfg_scale * (v_c - v_u)
            else:
                v = self.model(x, t_curr[i].expand(B), y).float()
            x = x + dt[i] * v
        return x.permute(0, 2, 3, 1).reshape(B, cfg.tokens, cfg.in_channels)
