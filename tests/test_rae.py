"""rae.py: each decoder layer against transformers' ViTMAELayer, the whole decoder against a reference built from
ViTMAELayers and the official forward (decoder.py GeneralDecoder + MultimodalDecoder + cli.py), loaded from a
decoder folder in the released layout (ViT-MAE config.json + raw state dict model.pt); the official key listing;
the MAE sin-cos table; round trips through tiny encoders; training; and loading errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dit import sincos_pos_embed
from rae import RAE, DecoderConfig, DecoderLayer, RAEDecoder, load_decoder
from weights import WeightsError, write_folder

transformers = pytest.importorskip("transformers")
from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer, get_2d_sincos_pos_embed  # noqa: E402

TINY = dict(decoder_hidden_size=48, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
            decoder_intermediate_size=96, patch_size=14, image_size=224, layer_norm_eps=1e-12, hidden_act="gelu")
ENC_WIDTH = 32  # the tiny encoders' width (conftest.py)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def patchify(dec, images):  # (B, c, H, W) -> (B, N, p*p*c), the exact inverse of dec.unpatchify
    B, g, p, c = images.shape[0], dec.config.grid, dec.config.patch_size, dec.config.num_channels
    return images.reshape(B, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * c)


def normalize(dec, images):  # pixels in [0, 1] -> the space of dec.predict_patches
    mean, std = (images.new_tensor(s).view(1, -1, 1, 1) for s in (dec.image_mean, dec.image_std))
    return (images - mean) / std


def hf_layer_config():
    return transformers.ViTMAEConfig(hidden_size=48, num_attention_heads=4, intermediate_size=96,
                                     layer_norm_eps=1e-12, hidden_act="gelu", attn_implementation="eager")


def random_layer():
    layer = ViTMAELayer(hf_layer_config()).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(1.0 if "layernorm" in name and name.endswith("weight") else 0.0, 0.1 if "layernorm" in name or
                      name.endswith("bias") else 0.15)
    return layer


def official_state_dict(seed=0):
    """What a released model.pt holds: GeneralDecoder.state_dict() (the official decoder.py), with random values."""
    torch.manual_seed(seed)
    D, p = 48, 14
    sd = {"decoder_embed.weight": torch.randn(D, ENC_WIDTH) * 0.2, "decoder_embed.bias": torch.randn(D) * 0.1,
          "decoder_pos_embed": torch.from_numpy(get_2d_sincos_pos_embed(D, 16, add_cls_token=True)).float()[None],
          "trainable_cls_token": torch.randn(1, 1, D),
          "decoder_norm.weight": 1 + 0.1 * torch.randn(D), "decoder_norm.bias": 0.1 * torch.randn(D),
          "decoder_pred.weight": torch.randn(p * p * 3, D) * 0.2, "decoder_pred.bias": torch.randn(p * p * 3) * 0.1}
    for i in range(2):
        sd.update({f"decoder_layers.{i}.{k}": v for k, v in random_layer().state_dict().items()})
    return sd


def write_decoder(folder, sd=None, **config):
    """A decoder folder as nyu-visionx/siglip2_decoder ships it: a ViTMAEConfig config.json and model.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    transformers.ViTMAEConfig(hidden_size=768, **{**TINY, **config}).to_json_file(folder / "config.json")
    torch.save(official_state_dict() if sd is None else sd, folder / "model.pt")
    return folder


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return write_decoder(tmp_path_factory.mktemp("decoder"))


def reference_decode(sd, z, mean, std):
    """The official path: cli.py prepends a zero cls row, GeneralDecoder.forward(drop_cls_token=True) with
    transformers' ViTMAELayer (eager), unpatchify by einsum, MultimodalDecoder de-normalizes."""
    layers = []
    for i in range(2):
        layer = ViTMAELayer(hf_layer_config()).eval()
        layer.load_state_dict({k[len(f"decoder_layers.{i}."):]: v for k, v in sd.items()
                               if k.startswith(f"decoder_layers.{i}.")})
        layers.append(layer)
    feats = torch.cat([torch.zeros(z.shape[0], 1, z.shape[-1]), z], 1)
    x = F.linear(feats, sd["decoder_embed.weight"], sd["decoder_embed.bias"])[:, 1:]
    x = torch.cat([sd["trainable_cls_token"].expand(z.shape[0], -1, -1), x], 1) + sd["decoder_pos_embed"]
    for layer in layers:
        x = layer(x)
        x = x[0] if isinstance(x, tuple) else x
    x = F.layer_norm(x, (48,), sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-12)
    x = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(z.shape[0], 16, 16, 14, 14, 3)).reshape(z.shape[0], 3, 224, 224)
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


# ---------------------------------------------------------------- numerics

def test_decoder_layer_equals_transformers_vitmae_layer():
    torch.manual_seed(0)
    hf = random_layer()
    ours = DecoderLayer(DecoderConfig(**TINY)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # same parameter names
    x = torch.randn(2, 257, 48)
    with torch.no_grad():
        ref = hf(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        assert (ours(x) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("B", [1, 3])
def test_decoder_equals_the_official_forward(decoder_dir, B):
    sd = official_state_dict()
    dec = load_decoder(decoder_dir, SIGLIP_MEAN, SIGLIP_STD)
    z = torch.randn(B, 256, ENC_WIDTH)
    with torch.no_grad():
        got = dec(z)
        ref = reference_decode(sd, z, SIGLIP_MEAN, SIGLIP_STD)
    assert got.shape == (B, 3, 224, 224) and got.dtype == torch.float32
    assert (got - ref).abs().max() < 1e-5
    assert got.min() < 0 or got.max() > 1  # not clipped: training needs the raw output


def test_keys_and_shapes_are_the_official_listing():
    """The official GeneralDecoder: Dd = 48, F = 96, p = 14, two layers."""
    D, Fh, P = 48, 96, 14 * 14 * 3
    expected = {"decoder_embed.weight": (D, ENC_WIDTH), "decoder_embed.bias": (D,), "decoder_pos_embed": (1, 257, D),
                "trainable_cls_token": (1, 1, D), "decoder_norm.weight": (D,), "decoder_norm.bias": (D,),
                "decoder_pred.weight": (P, D), "decoder_pred.bias": (P,)}
    for i in range(2):
        for name, shape in [("layernorm_before", (D,)), ("layernorm_after", (D,))]:
            expected.update({f"decoder_layers.{i}.{name}.weight": shape, f"decoder_layers.{i}.{name}.bias": shape})
        for name in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense"):
            expected.update({f"decoder_layers.{i}.{name}.weight": (D, D), f"decoder_layers.{i}.{name}.bias": (D,)})
        expected.update({f"decoder_layers.{i}.intermediate.dense.weight": (Fh, D),
                         f"decoder_layers.{i}.intermediate.dense.bias": (Fh,),
                         f"decoder_layers.{i}.output.dense.weight": (D, Fh),
                         f"decoder_layers.{i}.output.dense.bias": (D,)})
    dec = RAEDecoder(DecoderConfig(**TINY), ENC_WIDTH, SIGLIP_MEAN, SIGLIP_STD)
    assert {k: tuple(v.shape) for k, v in dec.state_dict().items()} == expected


def test_fresh_decoder_has_the_mae_sincos_table():
    dec = RAEDecoder(DecoderConfig(**TINY), ENC_WIDTH, SIGLIP_MEAN, SIGLIP_STD)
    table = torch.from_numpy(get_2d_sincos_pos_embed(48, 16, add_cls_token=True)).float()[None]
    assert torch.equal(dec.decoder_pos_embed, table) and not dec.decoder_pos_embed[0, 0].any()
    assert not dec.trainable_cls_token.any()


def mae_sincos_table(dim, grid):
    """rae.py's former own table (MAE's code: float32 positions, einsum in float64, 'xy' meshgrid), which dit's
    sincos_pos_embed replaced: the two are the same bits."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_axis(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    table = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), table])).float()


@pytest.mark.parametrize("dim, grid", [(48, 16), (1152, 16), (128, 8), (32, 16)])
def test_dit_sincos_table_is_maes_bit_for_bit(dim, grid):
    ours = RAEDecoder(DecoderConfig(dim, 1, 4, 8, patch_size=1, image_size=grid), 8, SIGLIP_MEAN, SIGLIP_STD)
    assert torch.equal(ours.decoder_pos_embed[0], mae_sincos_table(dim, grid))
    assert torch.equal(ours.decoder_pos_embed[0, 1:], sincos_pos_embed(dim, grid))


def test_patchify_inverts_unpatchify():
    dec = RAEDecoder(DecoderConfig(**TINY), ENC_WIDTH, SIGLIP_MEAN, SIGLIP_STD)
    images = torch.rand(2, 3, 224, 224)
    patches = patchify(dec, images)
    assert patches.shape == (2, 256, 14 * 14 * 3) and torch.equal(dec.unpatchify(patches), images)
    # patch n = row * 16 + col holds pixels (p, q, channel) of that 14 x 14 square, as MAE lays them out
    assert torch.equal(patches[1, 17].view(14, 14, 3), images[1, :, 14:28, 14:28].permute(1, 2, 0))


def test_fresh_decoder_trains():
    """A plain trainable nn.Module: a few Adam steps on a patch loss lower it; the fixed table stays fixed."""
    torch.manual_seed(0)
    small = DecoderConfig(**{**TINY, "image_size": 56})  # 4 x 4 tokens: fast
    dec = RAEDecoder(small, ENC_WIDTH, SIGLIP_MEAN, SIGLIP_STD)
    table = dec.decoder_pos_embed.clone()
    z, images = torch.randn(2, 16, ENC_WIDTH), torch.rand(2, 3, 56, 56)
    target = patchify(dec, normalize(dec, images))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(dec.predict_patches(z), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(dec.decoder_pos_embed, table) and dec.trainable_cls_token.grad is not None
    with torch.no_grad():  # the pixel output is the patch output de-normalized
        assert (dec(z) - dec.unpatchify(dec.predict_patches(z)) * 0.5 - 0.5).abs().max() < 1e-6


# ---------------------------------------------------------------- the RAE object

@pytest.mark.parametrize("B", [1, 4])
def test_round_trip_through_tiny_encoders(tiny_siglip_dir, tiny_dino_dir, decoder_dir, B):
    rng = np.random.default_rng(B)
    images = [Image.fromarray(rng.integers(0, 256, (180, 200 + 10 * i, 3), dtype=np.uint8)) for i in range(B)]
    for encoder_dir, mean in [(tiny_siglip_dir, SIGLIP_MEAN), (tiny_dino_dir, (0.485, 0.456, 0.406))]:
        rae = RAE.from_pretrained(encoder_dir, decoder_dir)
        assert rae._encoder is None  # the decoder alone: the encoder is loaded on first use
        assert rae.decoder.image_mean == mean  # de-normalized with the encoder's statistics
        latents = rae.encode(images)
        assert latents.shape == (B, 256, ENC_WIDTH)
        assert torch.equal(latents, rae.encoder.encode(rae.encoder.preprocess(images)))
        out = rae.decode(latents)
        assert out.shape == (B, 3, 224, 224) and out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, rae.decoder(latents).clamp(0, 1))
        pils = RAE.to_pil(out)
        assert len(pils) == B and all(p.mode == "RGB" and p.size == (224, 224) for p in pils)
        expected = (out.permute(0, 2, 3, 1).numpy().clip(0, 1) * 255).astype(np.uint8)  # cli.py's arithmetic
        assert np.array_equal(np.stack([np.asarray(p) for p in pils]), expected)


def test_to_pil_truncates_like_the_official_cli():
    images = torch.tensor([-0.5, 0.0, 0.2, 0.999, 1.0, 1.7, 0.5, 0.25]).view(1, 1, 2, 4).expand(1, 3, 2, 4)
    got = np.asarray(RAE.to_pil(images)[0])[..., 0].reshape(-1)
    assert got.tolist() == [0, 0, 51, 254, 255, 255, 127, 63]


# ---------------------------------------------------------------- loading errors

def test_decoder_key_mismatch_lists_the_keys(tmp_path):
    sd = official_state_dict()
    sd.pop("decoder_layers.1.output.dense.bias")
    sd["decoder.mask_token"] = torch.zeros(1, 1, 48)
    sd["decoder_pred.bias"] = torch.zeros(5)
    with pytest.raises(WeightsError) as e:
        load_decoder(write_decoder(tmp_path / "d", sd), SIGLIP_MEAN, SIGLIP_STD)
    for text in ("decoder_layers.1.output.dense.bias", "decoder.mask_token", "decoder_pred.bias: file (5,)"):
        assert text in str(e.value)



def test_decoder_width_comes_from_model_pt_and_mask_token_is_harmless(tmp_path):
    """config.json's hidden_size (768 here, a ViT-MAE leftover) is not the input width: model.pt's decoder_embed is.
    MAE's unused mask_token, which the official non-strict load ignores, is dropped with a one-line note."""
    dec = load_decoder(write_decoder(tmp_path / "w"), SIGLIP_MEAN, SIGLIP_STD)
    assert json.loads((tmp_path / "w" / "config.json").read_text())["hidden_size"] == 768
    assert dec.decoder_embed.in_features == ENC_WIDTH
    sd = official_state_dict()
    with pytest.warns(UserWarning, match=r"ignoring \['mask_token'\]"):
        masked = load_decoder(write_decoder(tmp_path / "m", {**sd, "mask_token": torch.zeros(1, 1, 48)}),
                              SIGLIP_MEAN, SIGLIP_STD)
    assert all(torch.equal(v, sd[k]) for k, v in masked.state_dict().items())


def test_corrupt_model_pt_names_the_file(tmp_path, decoder_dir):
    good = (decoder_dir / "model.pt").read_bytes()
    for name, data in [("random", b"\x00garbage" * 100), ("truncated", good[:len(good) // 2])]:
        folder = write_decoder(tmp_path / name)
        (folder / "model.pt").write_bytes(data)
        with pytest.raises(WeightsError, match=str(folder / "model.pt")):
            load_decoder(folder, SIGLIP_MEAN, SIGLIP_STD)
    nested = write_decoder(tmp_path / "nested", {"model": official_state_dict()})  # a training checkpoint
    with pytest.raises(WeightsError, match="state dict"):
        load_decoder(nested, SIGLIP_MEAN, SIGLIP_STD)


def test_bad_decoder_configs_are_refused(tmp_path):
    folder = write_decoder(tmp_path / "d")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "patch_size": "SHOULD BE RELOADED"}))  # RAE's template
    with pytest.raises(WeightsError, match="patch_size"):
        load_decoder(folder, SIGLIP_MEAN, SIGLIP_STD)
    dec = RAEDecoder(DecoderConfig(**TINY), ENC_WIDTH, SIGLIP_MEAN, SIGLIP_STD)
    with pytest.raises(ValueError, match="256 tokens, got 196"):
        dec(torch.zeros(1, 196, ENC_WIDTH))


def test_bfloat16_decoder_decodes_float32_latents(decoder_dir):
    """The sampler returns float32 latents; a bfloat16 decoder (the GPU default) must take them as they are."""
    fp32 = RAE(load_decoder(decoder_dir, SIGLIP_MEAN, SIGLIP_STD))
    bf16 = RAE(load_decoder(decoder_dir, SIGLIP_MEAN, SIGLIP_STD, dtype=torch.bfloat16))
    z = torch.randn(2, 256, ENC_WIDTH)
    out = bf16.decode(z)
    assert out.shape == (2, 3, 224, 224) and (out.float() - fp32.decode(z)).abs().max() < 0.1


def test_fresh_decoder_saves_the_released_layout(tmp_path):
    """A trained decoder (train_tpu.py --stage decoder) is exported as config.json + model.pt and loads back."""
    torch.manual_seed(0)
    dec = RAEDecoder(DecoderConfig(48, 2, 4, 64, patch_size=4, image_size=64), ENC_WIDTH, SIGLIP_MEAN, SIGLIP_STD)
    dec.save_pretrained(tmp_path / "d")
    with pytest.raises(FileExistsError):
        dec.save_pretrained(tmp_path / "d")
    back = load_decoder(tmp_path / "d", SIGLIP_MEAN, SIGLIP_STD)
    z = torch.randn(2, 256, ENC_WIDTH)
    with torch.no_grad():
        assert torch.equal(back(z), dec(z))
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == "vit_mae"


def test_write_folder_is_atomic(tmp_path):
    """A folder appears complete or not at all: a stale `.tmp` of a killed write is replaced, an existing folder is
    refused, and a failed write leaves no folder."""
    stale = tmp_path / "out.tmp"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    write_folder(tmp_path / "out", lambda tmp: (tmp / "a.txt").write_text("a"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt"] and not stale.exists()
    with pytest.raises(FileExistsError, match="out"):
        write_folder(tmp_path / "out", lambda tmp: (tmp / "b.txt").write_text("b"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt"]

    def fail(tmp):
        (tmp / "c.txt").write_text("c")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        write_folder(tmp_path / "other", fail)
    assert not (tmp_path / "other").exists()
