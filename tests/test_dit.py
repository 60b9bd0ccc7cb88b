"""Tests for dit.py: official weights layout, fixed tables, samplers, CFG, init and a real learning check.

Everything is offline on tiny random DiTs. Reference values (Fourier frequencies, the sampler's time table) are the
documented ones from the official code (official model_utils.py, transport.py, respace.py); table formulas are re-derived here in float64.
"""

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dit
from dit import DiffusionHead, DiT, DiTConfig
from model import ScaleRAEConfig
from weights import WeightsError, load_strict, read_safetensors, save_safetensors


def load_dit(sd, cfg, dtype=torch.float32, cls=DiT):
    """A DiT (or a DiffusionHead, whose `model` is the DiT) from official tensors named without `diff_head.model.`,
    built on `meta` and loaded strictly, as model.py loads a checkpoint's head."""
    with torch.device("meta"):
        m = cls(cfg)
    load_strict(m if cls is DiT else m.model, sd, "DiT weights", dtype=dtype)
    return m


def load_head(sd, cfg, dtype=torch.float32):
    return load_dit(sd, cfg, dtype, DiffusionHead)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning makes them
    many times slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    """A tiny DiT on a 4×4 latent grid (the tables are tested at the released 16×16 separately)."""
    return DiTConfig(**{"hidden_size": 64, "depth": 2, "num_heads": 4, "in_channels": 8, "z_channels": 48,
                        "input_size": 4, **kw})


def random_state(cfg, seed=0):
    """A fresh DiT's state dict with every learned tensor randomized (the adaLN-Zero layers too), tables kept."""
    g = torch.Generator().manual_seed(seed)
    sd = DiT(cfg).state_dict()
    for k, v in sd.items():
        if k in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):
            continue
        scale = 0.5 / math.sqrt(v[0].numel()) if v.dim() > 1 else 0.1
        sd[k] = torch.randn(v.shape, generator=g) * scale + (1.0 if "norm" in k else 0.0)
    return sd


def inputs(cfg, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = cfg.input_size
    return (torch.randn(B, cfg.in_channels, n, n, generator=g), torch.rand(B, generator=g) * 0.98 + 0.01,
            torch.randn(B, cfg.tokens, cfg.z_channels, generator=g))


class Recorder(torch.nn.Module):
    """Wraps a DiT, records the batch size and the t of every call."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.clone()))
        return self.inner(x, t, y)


def recording_head(cfg, sd):
    head = load_head(sd, cfg).eval()
    inner = head.model
    head.model = Recorder(inner)
    head.model.y_embedder = inner.y_embedder
    return head, inner


# ---- fixed tables ----

def test_fourier_frequencies_are_the_documented_ones():
    W = DiT(tiny()).t_embedder.W
    documented = [0.16499802, -0.42873916, -0.02426691, 0.14942360, -0.07068532, 0.21661247, -1.08993149, 0.89571387]
    assert W.shape == (256,) and W.dtype == torch.float32
    np.testing.assert_allclose(W[:8].numpy(), documented, atol=5e-9)
    assert abs(W.double().sum().item() - (-12.888589979)) < 1e-6
    assert "t_embedder.W" not in DiT(tiny()).state_dict()  # regenerated, never loaded


def test_pos_embed_is_the_2d_sincos_formula():
    D, n = 96, 16
    cfg = tiny(hidden_size=D, num_heads=4, input_size=n)
    m = DiT(cfg)
    expected = np.zeros((n * n, D))
    q = D // 4
    for h in range(n):
        for w in range(n):
            for j in range(D):
                pos = w if j < D // 2 else h           # first half: column, second half: row
                k = j % (D // 2)
                omega = 10000.0 ** (-(k % q) / q)
                expected[h * n + w, j] = math.sin(pos * omega) if k < q else math.cos(pos * omega)
    assert m.pos_embed.shape == (1, n * n, D) and not m.pos_embed.requires_grad
    np.testing.assert_allclose(m.pos_embed[0].numpy(), expected, atol=1e-6)
    assert "pos_embed" in m.state_dict()


@pytest.mark.parametrize("head_dim", [16, 64])
def test_rope_tables_and_interleaved_rotation(head_dim):
    n = 16
    cos, sin = dit.rope_tables(head_dim, n)
    half = head_dim // 2
    angle = np.zeros((n * n, head_dim))
    for h in range(n):
        for w in range(n):
            for j in range(head_dim):
                pos = h if j < half else w              # first half: row, second half: column
                m = (j % half) // 2                    # channels 2m, 2m+1 share a frequency
                angle[h * n + w, j] = pos * 10000.0 ** (-2 * m / half)
    np.testing.assert_allclose(cos.numpy(), np.cos(angle), atol=2e-6)
    np.testing.assert_allclose(sin.numpy(), np.sin(angle), atol=2e-6)
    # The rotation acts on adjacent pairs (x[2m], x[2m+1]) by the pair's angle.
    x = torch.randn(1, 1, n * n, head_dim)
    out = dit.Rope2D(head_dim, n)(x)[0, 0].double().numpy()
    xd, a = x[0, 0].double().numpy(), angle[:, ::2]
    np.testing.assert_allclose(out[:, 0::2], xd[:, 0::2] * np.cos(a) - xd[:, 1::2] * np.sin(a), atol=1e-5)
    np.testing.assert_allclose(out[:, 1::2], xd[:, 0::2] * np.sin(a) + xd[:, 1::2] * np.cos(a), atol=1e-5)


def test_forward_uses_the_loaded_tables():
    cfg = tiny()
    sd = random_state(cfg)
    x, t, y = inputs(cfg)
    with torch.no_grad():
        base = load_dit(sd, cfg)(x, t, y)
        for key, change in [("pos_embed", lambda v: v + 0.1),
                            ("feat_rope.freqs_cos", torch.ones_like), ("feat_rope.freqs_sin", torch.zeros_like)]:
            sd2 = dict(sd, **{key: change(sd[key])})
            m = load_dit(sd2, cfg)
            assert torch.equal(m.state_dict()[key], sd2[key])
            assert (m(x, t, y) - base).abs().max() > 1e-3, key


def reference_forward(sd, cfg, x, t, y):
    """The official lightningDiT.py forward written out in float64 from the state dict alone (explicit softmax attention)."""
    d = {k: v.double() for k, v in sd.items()}
    B, C, n, _ = x.shape
    H, nh = cfg.hidden_size, cfg.num_heads
    hd = H // nh
    silu = torch.nn.functional.silu

    def lin(v, name):
        return v @ d[name + ".weight"].T + d[name + ".bias"]

    def rms(v, name):
        return v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * d[name + ".weight"]

    def rope(v):  # interleaved pairs: (v[2m], v[2m+1]) -> (-v[2m+1], v[2m])
        r = torch.empty_like(v)
        r[..., 0::2], r[..., 1::2] = -v[..., 1::2], v[..., 0::2]
        return v * d["feat_rope.freqs_cos"] + r * d["feat_rope.freqs_sin"]

    s = x.double().flatten(2).transpose(1, 2) @ d["x_embedder.proj.weight"][:, :, 0, 0].T + d["x_embedder.proj.bias"]
    s = s + d["pos_embed"]
    W = torch.normal(0.0, 1.0, (256,), generator=torch.Generator().manual_seed(114514)).double()
    angle = t.double()[:, None] * W * 2 * math.pi
    te = lin(silu(lin(torch.cat([angle.sin(), angle.cos()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = silu(te[:, None, :] + y.double())
    for i in range(cfg.depth):
        p = f"dit_blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(silu(c), p + "adaLN_modulation.1").chunk(6, -1)
        q, k, v = lin(rms(s, p + "norm1") * (1 + sc1) + sh1, p + "attn.qkv").view(B, -1, 3, nh, hd).permute(2, 0, 3, 1, 4)
        a = ((rope(q) @ rope(k).transpose(-2, -1)) / math.sqrt(hd)).softmax(-1) @ v
        s = s + lin(a.transpose(1, 2).reshape(B, -1, H), p + "attn.proj") * g1
        gate, up = lin(rms(s, p + "norm2") * (1 + sc2) + sh2, p + "mlp.w12").chunk(2, -1)
        s = s + lin(silu(gate) * up, p + "mlp.w3") * g2
    sh, sc = lin(silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = lin(rms(s, "final_layer.norm_final") * (1 + sc) + sh, "final_layer.linear")
    return out.view(B, n, n, C).permute(0, 3, 1, 2)   # token h*n + w -> channel-first


@pytest.mark.parametrize("input_size", [4, 16])
def test_forward_matches_the_documented_arithmetic(input_size):
    cfg = tiny(input_size=input_size)
    sd = random_state(cfg)
    x, t, y = inputs(cfg, B=3)
    with torch.no_grad():
        got = load_dit(sd, cfg)(x, t, y)
    ref = reference_forward(sd, cfg, x, t, y)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


def test_timestep_features_are_sin_then_cos():
    m = DiT(tiny())
    seen = []
    m.t_embedder.mlp[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    t = torch.tensor([0.0084222, 0.5, 0.9976007])
    m.t_embedder(t)
    angle = t.double()[:, None] * m.t_embedder.W.double() * 2 * math.pi
    torch.testing.assert_close(seen[0].double(), torch.cat([angle.sin(), angle.cos()], -1), atol=2e-6, rtol=0)


# ---- loading ----

def test_round_trip_through_official_names(tmp_path):
    cfg = tiny(input_size=16)   # a checkpoint's head is always 16×16
    sd = random_state(cfg)
    full = {f"diff_head.model.{k}": v for k, v in sd.items()}
    full["diff_head_projector.weight"] = torch.randn(cfg.z_channels, 32)   # other parts of the checkpoint
    full["model.norm.weight"] = torch.ones(32)
    save_safetensors(full, tmp_path / "model.safetensors")
    read = read_safetensors(tmp_path, prefix="diff_head.model.")
    assert sorted(read) == sorted(sd)
    m = load_dit(read, cfg)
    got = m.state_dict()
    assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert not m.pos_embed.requires_grad and all(p.requires_grad for n, p in m.named_parameters() if n != "pos_embed")
    head = load_head(read, cfg)
    x, t, y = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(head.model(x, t, y), m(x, t, y))


def test_missing_unexpected_and_misshaped_keys_are_clear_errors():
    cfg = tiny()
    sd = random_state(cfg)
    with pytest.raises(WeightsError, match=r"missing \(1\): dit_blocks\.1\.mlp\.w3\.bias"):
        load_dit({k: v for k, v in sd.items() if k != "dit_blocks.1.mlp.w3.bias"}, cfg)
    with pytest.raises(WeightsError, match=r"unexpected \(1\): s_embedder\.proj\.weight"):
        load_dit(dict(sd, **{"s_embedder.proj.weight": torch.zeros(1)}), cfg)
    with pytest.raises(WeightsError, match=r"wrong shape \(1\): final_layer\.linear\.weight"):
        load_dit(dict(sd, **{"final_layer.linear.weight": torch.zeros(9, 64)}), cfg)
    with pytest.raises(WeightsError, match="y_embedder.dropout_embedding"):  # no dropout -> no null condition key
        load_dit(sd, tiny(class_dropout_prob=0.0))


def test_config_from_checkpoint():
    """The head's configuration is read from a Scale-RAE config.json (model.ScaleRAEConfig.from_official); without
    diffusion_class_dropout_prob the official fallback 0.0 applies (no learned null condition)."""
    d = {"hidden_size": 1536, "diffusion_model_hidden_size": 3072, "diffusion_model_depth": 48,
         "diffusion_model_heads": 48, "diffusion_model_z_channels": 2560, "diffusion_model_channels": 1024,
         "mm_vision_tower_aux_list": ["facebook/webssl-dino300m-full2b-224"]}
    cfg = ScaleRAEConfig.from_official(d).dit
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.z_channels, cfg.in_channels, cfg.class_dropout_prob) == \
        (3072, 48, 48, 2560, 1024, 0.0)
    assert ScaleRAEConfig.from_official(dict(d, diffusion_class_dropout_prob=0.1)).dit.class_dropout_prob == 0.1
    with pytest.raises(WeightsError, match="diffusion_model_depth"):
        ScaleRAEConfig.from_official({k: v for k, v in d.items() if k != "diffusion_model_depth"})
    with pytest.raises(WeightsError, match="diffusion_model_z_channels"):
        ScaleRAEConfig.from_official(dict(d, diffusion_model_z_channels=0))
    assert DiffusionHead(tiny(in_channels=1024, hidden_size=16, depth=1, num_heads=1, z_channels=8, input_size=16)).shift == 8.0
    assert abs(flow_shift_1152 - math.sqrt(72)) < 1e-12


flow_shift_1152 = dit.flow_shift(1152)


# ---- samplers ----

OFFICIAL_TABLE = [  # (t_curr, t_next, Δt) of the official sampler (transport.py, respace.py)
    (0.99760067, 0.99498677, -0.00261390), (0.99498677, 0.99240226, -0.00258452), (0.99240226, 0.98958266, -0.00281960),
    (0.98958266, 0.98679060, -0.00279206), (0.98679060, 0.98388815, -0.00290245), (0.98388815, 0.98071450, -0.00317365),
    (0.98071450, 0.97756422, -0.00315028), (0.97756422, 0.97428143, -0.00328279), (0.97428143, 0.97068244, -0.00359899),
    (0.97068244, 0.96710032, -0.00358212), (0.96710032, 0.96316558, -0.00393474), (0.96316558, 0.95924133, -0.00392425),
    (0.95924133, 0.95513207, -0.00410926), (0.95513207, 0.95060360, -0.00452846), (0.95060360, 0.94607186, -0.00453174),
    (0.94607186, 0.94106549, -0.00500637), (0.94106549, 0.93604249, -0.00502300), (0.93604249, 0.93075037, -0.00529212),
    (0.93075037, 0.92487967, -0.00587070), (0.92487967, 0.91896367, -0.00591600), (0.91896367, 0.91237980, -0.00658387),
    (0.91237980, 0.90572268, -0.00665712), (0.90572268, 0.89865237, -0.00707030), (0.89865237, 0.89074051, -0.00791186),
    (0.89074051, 0.88269359, -0.00804693), (0.88269359, 0.87409508, -0.00859851), (0.87409508, 0.86440873, -0.00968635),
    (0.86440873, 0.85448653, -0.00992221), (0.85448653, 0.84324932, -0.01123720), (0.84324932, 0.83167243, -0.01157689),
    (0.83167243, 0.81913394, -0.01253849), (0.81913394, 0.80479664, -0.01433730), (0.80479664, 0.78987145, -0.01492518),
    (0.78987145, 0.77266872, -0.01720273), (0.77266872, 0.75460410, -0.01806462), (0.75460410, 0.73463589, -0.01996821),
    (0.73463589, 0.71127212, -0.02336377), (0.71127212, 0.68632650, -0.02494562), (0.68632650, 0.65675229, -0.02957422),
    (0.65675229, 0.62470585, -0.03204644), (0.62470585, 0.58804178, -0.03666407), (0.58804178, 0.54339319, -0.04464859),
    (0.54339319, 0.49350190, -0.04989129), (0.49350190, 0.43439695, -0.05910495), (0.43439695, 0.35932788, -0.07506907),
    (0.35932788, 0.27114025, -0.08818763), (0.27114025, 0.15398575, -0.11715449), (0.15398575, 0.00842224, -0.14556351),
    (0.99760067, 1.00000000, +0.00239933),
]


def test_official_schedule_reproduces_the_documented_table():
    t_curr, t_next = dit.official_timesteps(dit.flow_shift(1152))
    assert t_curr.dtype == t_next.dtype == torch.float32 and len(t_curr) == 49
    ref = np.array(OFFICIAL_TABLE)
    np.testing.assert_allclose(t_curr.numpy(), ref[:, 0], atol=6e-9, rtol=0)   # 8 printed decimals
    np.testing.assert_allclose(t_next.numpy(), ref[:, 1], atol=6e-9, rtol=0)
    np.testing.assert_allclose((t_next - t_curr).numpy(), ref[:, 2], atol=6e-9, rtol=0)


def test_official_sampler_makes_49_calls_and_integrates_the_table():
    cfg = tiny()
    head, inner = recording_head(cfg, random_state(cfg))
    y = torch.randn(2, cfg.tokens, cfg.z_channels)
    noise = dit.initial_noise([3, 4], cfg.in_channels, "cpu", size=4)
    out = head.sample(y, noise)
    t_curr, t_next = dit.official_timesteps(head.shift)
    assert len(head.model.calls) == 49 and all(b == 2 for b, _ in head.model.calls)
    assert all(torch.equal(t, t_curr[i].expand(2)) for i, (_, t) in enumerate(head.model.calls))
    assert t_curr[0] == t_curr[-1] and t_next[-1] == 1.0          # the official final step goes UP to t = 1
    x = noise.clone()
    with torch.no_grad():
        for tc, tn in zip(t_curr, t_next):
            x = x + (tn - tc) * inner(x, tc.expand(2), y)
    assert out.dtype == torch.float32 and out.shape == (2, cfg.tokens, cfg.in_channels)
    assert torch.equal(out, x.permute(0, 2, 3, 1).reshape(2, cfg.tokens, cfg.in_channels))  # token n = h*4 + w


def test_euler_makes_n_calls_and_ends_at_zero():
    cfg = tiny()
    head, _ = recording_head(cfg, random_state(cfg))
    head.sample(torch.randn(1, cfg.tokens, cfg.z_channels), dit.initial_noise([0], cfg.in_channels, "cpu", size=4), steps=7)
    assert len(head.model.calls) == 7
    t_curr, t_next = dit.euler_timesteps(7, head.shift)
    s, u = head.shift, 1 - np.arange(8) / 7
    np.testing.assert_allclose(torch.cat([t_curr, t_next[-1:]]).numpy(), s * u / (1 + (s - 1) * u), rtol=1e-6)
    assert t_curr[0] == 1.0 and t_next[-1] == 0.0 and torch.equal(t_next[:-1], t_curr[1:])
    assert [float(t[0]) for _, t in head.model.calls] == t_curr.tolist()


def test_cfg_scale_one_is_the_conditional_sampler_with_no_extra_pass():
    cfg = tiny()
    sd = random_state(cfg)
    head, inner = recording_head(cfg, sd)
    y = torch.randn(3, cfg.tokens, cfg.z_channels)
    noise = dit.initial_noise([0, 1, 2], cfg.in_channels, "cpu", size=4)
    out = head.sample(y, noise, steps=5, cfg_scale=1.0, cfg_interval=(0.0, 1.0))
    assert [b for b, _ in head.model.calls] == [3] * 5
    t_curr, t_next = dit.euler_timesteps(5, head.shift)
    x = noise.clone()
    with torch.no_grad():
        for tc, tn in zip(t_curr, t_next):
            x = x + (tn - tc) * inner(x, tc.expand(3), y)
    assert torch.equal(out, x.permute(0, 2, 3, 1).reshape(3, cfg.tokens, cfg.in_channels))


@pytest.mark.parametrize("interval", [None, (0.3, 0.8)])
def test_cfg_is_the_two_pass_formula(interval):
    cfg = tiny()
    head, inner = recording_head(cfg, random_state(cfg))
    B, s = 2, 3.5
    y = torch.randn(B, cfg.tokens, cfg.z_channels)
    noise = dit.initial_noise([7, 8], cfg.in_channels, "cpu", size=4)
    out = head.sample(y, noise, steps=6, cfg_scale=s, cfg_interval=interval)
    t_curr, t_next = dit.euler_timesteps(6, head.shift)
    null = inner.y_embedder.dropout_embedding.expand(B, cfg.tokens, -1)
    assert null.abs().max() > 0   # a learned, non-zero null condition, so guidance matters
    x, sizes = noise.clone(), []
    with torch.no_grad():
        for tc, tn in zip(t_curr, t_next):
            t = tc.expand(B)
            v = inner(x, t, y)
            if interval is None or interval[0] <= tc <= interval[1]:
                v_u = inner(x, t, null)
                v = v_u + s * (v - v_u)
                sizes.append(2 * B)
            else:
                sizes.append(B)
            x = x + (tn - tc) * v
    assert [b for b, _ in head.model.calls] == sizes and (interval is None or B in sizes and 2 * B in sizes)
    torch.testing.assert_close(out, x.permute(0, 2, 3, 1).reshape(B, cfg.tokens, cfg.in_channels), atol=2e-5, rtol=0)
    plain = head.sample(y, noise, steps=6)
    assert (out - plain).abs().max() > 1e-2


def test_initial_noise_is_per_image():
    batch = dit.initial_noise([5, 6, 7], 4, "cpu")
    assert batch.shape == (3, 4, 16, 16) and batch.dtype == torch.float32
    for i, s in enumerate([5, 6, 7]):
        assert torch.equal(batch[i:i + 1], torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(s)))
        assert torch.equal(batch[i:i + 1], dit.initial_noise([s], 4, "cpu"))


def test_bad_shapes_fail_early():
    cfg = tiny()
    head = DiffusionHead(cfg)
    y, noise = torch.randn(1, cfg.tokens, cfg.z_channels), dit.initial_noise([0], cfg.in_channels, "cpu", size=4)
    with pytest.raises(ValueError, match="y: expected"):
        head.sample(y[:, 1:], noise)
    with pytest.raises(ValueError, match="noise: expected"):
        head.sample(y, torch.randn(1, cfg.in_channels + 1, 4, 4))
    with pytest.raises(ValueError, match="steps"):
        head.sample(y, noise, steps=0)
    with pytest.raises(ValueError, match="null condition"):
        DiffusionHead(tiny(class_dropout_prob=0.0)).sample(y, noise, cfg_scale=2.0)
    with pytest.raises(ValueError, match="DiT expects"):
        head.model(noise, torch.rand(2), y)


# ---- dtypes and cost ----

def test_bfloat16_forward_and_sampler():
    cfg = tiny()
    sd = random_state(cfg)
    x, t, y = inputs(cfg)
    h32 = load_head(sd, cfg).eval()
    h16 = load_head(sd, cfg, dtype=torch.bfloat16).eval()
    assert h16.model.dit_blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert h16.model.feat_rope.freqs_cos.dtype == torch.float32 and h16.model.t_embedder.W.dtype == torch.float32
    with torch.no_grad():
        a, b = h32.model(x, t, y), h16.model(x, t, y)
    assert b.dtype == torch.bfloat16 and ((b.float() - a).norm() / a.norm()) < 3e-2
    noise = dit.initial_noise([1, 2], cfg.in_channels, "cpu", size=4)
    s32, s16 = h32.sample(y, noise, steps=4), h16.sample(y.bfloat16(), noise, steps=4)
    assert s16.dtype == torch.float32 and ((s16 - s32).norm() / s32.norm()) < 3e-2
    h16.train()
    assert h16.loss(torch.randn(2, cfg.tokens, cfg.in_channels), y).dtype == torch.float32


def test_flops_match_a_flop_counter(monkeypatch):
    cfg = tiny(input_size=16)
    m = load_dit(random_state(cfg), cfg)
    x, t, y = inputs(cfg, B=1)

    def explicit_attention(q, k, v):  # the counter does not see the CPU SDPA kernel; count its two matmuls instead
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    monkeypatch.setattr(dit.F, "scaled_dot_product_attention", explicit_attention)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(x, t, y)
    assert counter.get_total_flops() == dit.dit_flops(cfg)
    assert abs(dit.dit_flops(DiTConfig()) / 1e12 - 1.26) < 0.01   # ≈1.24 TFLOP of matmuls + 0.02 of attention


# ---- training ----

def test_fresh_init_is_adaln_zero():
    torch.manual_seed(0)
    cfg = tiny()
    m = DiT(cfg)
    x, t, y = inputs(cfg)
    assert torch.equal(m(x, t, y), torch.zeros_like(x))
    assert torch.equal(m.y_embedder.dropout_embedding, torch.zeros(cfg.z_channels))
    qkv = m.dit_blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))          # xavier-uniform
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound and torch.equal(m.dit_blocks[0].attn.qkv.bias,
                                                                                      torch.zeros(3 * cfg.hidden_size))
    assert abs(m.t_embedder.mlp[2].weight.std().item() - 0.02) < 0.002
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == sum(
        p.numel() for n, p in m.named_parameters() if n != "pos_embed")


def test_loss_formula_draws_and_condition_dropout():
    cfg = tiny()
    head = load_head(random_state(cfg), cfg)
    B = 4
    x0, y = torch.randn(B, cfg.tokens, cfg.in_channels), torch.randn(B, cfg.tokens, cfg.z_channels)
    head.eval()
    torch.manual_seed(3)
    got = head.loss(x0, y)
    torch.manual_seed(3)
    t = torch.sigmoid(torch.randn(B))
    t = head.shift * t / (1 + (head.shift - 1) * t)
    eps = torch.randn(B, cfg.in_channels, 4, 4, dtype=torch.bfloat16).float()   # bf16-quantized noise
    x0g = x0.view(B, 4, 4, cfg.in_channels).permute(0, 3, 1, 2)                  # token n = h*4 + w
    xt = (1 - t.view(-1, 1, 1, 1)) * x0g + t.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        v = head.model(xt, t, y)
    torch.testing.assert_close(got, ((v - (eps - x0g)) ** 2).mean(dim=(1, 2, 3)), atol=1e-6, rtol=1e-6)
    # training mode with p = 1: every condition is the learned null condition
    h1 = load_head(random_state(cfg), tiny(class_dropout_prob=1.0)).train()
    fixed_t, fixed_eps = torch.full((B,), 0.5), torch.randn(B, cfg.in_channels, 4, 4)
    dropped = h1.loss(x0, y, t=fixed_t, noise=fixed_eps)
    null = h1.model.y_embedder.dropout_embedding.expand(B, cfg.tokens, -1)
    assert torch.equal(dropped, h1.eval().loss(x0, null, t=fixed_t, noise=fixed_eps))
    assert not torch.equal(dropped, h1.loss(x0, y, t=fixed_t, noise=fixed_eps))


def test_training_learns_a_conditional_gaussian_mixture():
    """A tiny DiT on 4×4×4 latents: 4 mixture components, the condition names the component. The held-out loss
    must drop well below the zero-init loss, and samples must land near their own component's mean."""
    torch.manual_seed(0)
    cfg = DiTConfig(hidden_size=32, depth=2, num_heads=2, in_channels=4, z_channels=16, input_size=4)
    head = DiffusionHead(cfg)
    K, T, C = 4, cfg.tokens, cfg.in_channels
    means = torch.randn(K, T, C) * 1.5
    conds = torch.randn(K, T, cfg.z_channels)

    def batch(n, g=None):
        k = torch.randint(K, (n,), generator=g)
        return means[k] + 0.1 * torch.randn(n, T, C, generator=g), conds[k], k

    g = torch.Generator().manual_seed(1)
    xv, yv, _ = batch(256, g)
    tv = dit.time_shift(torch.sigmoid(torch.randn(256, generator=g)), head.shift)
    ev = torch.randn(256, C, 4, 4, generator=g)

    def held_out():
        head.eval()
        with torch.no_grad():
            return head.loss(xv, yv, t=tv, noise=ev).mean().item()

    before = held_out()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    head.train()
    for _ in range(200):
        x0, y, _ = batch(64)
        loss = head.loss(x0, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    assert after < 0.3 * before, (before, after)
    k = torch.arange(K).repeat(4)
    samples = head.sample(conds[k], dit.initial_noise(range(16), C, "cpu", size=4), steps=20)
    nearest = torch.cdist(samples.flatten(1), means.flatten(1)).argmin(1)
    assert (nearest == k).sum() >= 15, nearest
