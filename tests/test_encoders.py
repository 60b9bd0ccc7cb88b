"""encoders.py against transformers (the numerical oracle): SigLIP vision features (last layer before post-LN, then
a non-affine LN) and DINOv2 features (final LN without CLS/registers) to 1e-5, loaded from checkpoints transformers
wrote in the Hub layout; preprocessing against the documented arithmetic and the slow transformers processors;
image files of every mode, bad image files, and loading errors."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from encoders import (Dinov2Config, DINOv2Encoder, ImageProcessing, SigLIP2Encoder, SiglipVisionConfig, load_encoder,
                      load_image, read_encoder_config)
from weights import WeightsError

transformers = pytest.importorskip("transformers")


def synthetic_image(w=300, h=200, seed=0):
    """Smooth gradients plus noise, so that resampling filters and crops all change the numbers."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray((base + rng.integers(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------- features vs transformers

def test_siglip_features_equal_transformers(tiny_siglip_dir):
    ours = load_encoder(tiny_siglip_dir)
    hf = transformers.SiglipVisionModel.from_pretrained(tiny_siglip_dir, attn_implementation="eager").eval()
    pixels = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        out = hf(pixels, output_hidden_states=True)
        ref = F.layer_norm(out.hidden_states[-1], (32,), eps=1e-6)  # siglip_encoder.py: before post_layernorm
        got = ours.encode(pixels)
    assert got.shape == (3, 256, 32) and ours.hidden_size == 32 and ours.num_tokens == 256
    assert (got - ref).abs().max() < 1e-5
    # The test can tell the RAE space from the post_layernorm output it must not be.
    assert (got - out.last_hidden_state).abs().max() > 1e-2


def test_siglip_reads_only_the_vision_tower_without_renaming(tiny_siglip_dir):
    with safe_open(tiny_siglip_dir / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any(k.startswith("text_model.") for k in names)  # a full SigLIP checkpoint, as on the Hub
    wanted = {k[len("vision_model."):] for k in names if k.startswith("vision_model.")
              and not k.startswith(("vision_model.post_layernorm.", "vision_model.head."))}
    ours = load_encoder(tiny_siglip_dir)
    assert set(ours.state_dict()) == wanted
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())


def test_dino_features_equal_transformers(tiny_dino_dir):
    ours = load_encoder(tiny_dino_dir)
    hf = transformers.AutoModel.from_pretrained(tiny_dino_dir, attn_implementation="eager").eval()
    registers = getattr(hf.config, "num_register_tokens", 0)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        full = hf(pixels).last_hidden_state
        got = ours.encode(pixels)
    assert full.shape[1] == 1 + registers + 256 and got.shape == (2, 256, 32)
    assert (got - full[:, 1 + registers:]).abs().max() < 1e-5


def test_bf16_encoder_is_close_to_float32(tiny_siglip_dir):
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = load_encoder(tiny_siglip_dir).encode(pixels)
        got = load_encoder(tiny_siglip_dir, dtype=torch.bfloat16).encode(pixels)
    assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max() < 0.1


RELEASED = {  # the config.json numbers of google/siglip2-so400m-patch14-224 and facebook/webssl-dino300m-full2b-224
    "siglip2": SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                  patch_size=14),
    "webssl": Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}


@pytest.mark.parametrize("name,cls,width", [("siglip2", SigLIP2Encoder, 1152), ("webssl", DINOv2Encoder, 1024)])
def test_released_geometry_gives_256_tokens(name, cls, width):
    """The released encoders' configs, built on `meta` (no memory): 256 tokens of 1152 or 1024 channels."""
    with torch.device("meta"):
        enc = cls(RELEASED[name], ImageProcessing(224, (0.5,) * 3, (0.5,) * 3))
        out = enc.encode(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 256, width) and enc.hidden_size == width


def test_wrong_pixel_shape_is_refused(tiny_siglip_dir):
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        load_encoder(tiny_siglip_dir).encode(torch.zeros(1, 3, 256, 256))


# ---------------------------------------------------------------- preprocessing

def normalize(a, mean, std):
    """The documented arithmetic: uint8 * (1/255) in float64, to float32, then (x - mean) / std in float32."""
    x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(mean)) / np.float32(std)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def test_siglip_preprocessing(tiny_siglip_dir):
    image = synthetic_image()
    enc = load_encoder(tiny_siglip_dir)
    got = enc.preprocess([image, image.convert("RGBA")])  # RGBA is converted to RGB first
    expected = normalize(np.asarray(image.resize((224, 224), Image.BILINEAR)), 0.5, 0.5)  # direct, no aspect
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    assert (got[0] - expected).abs().max() <= 1e-6 and torch.equal(got[0], got[1])
    hf = transformers.SiglipImageProcessor.from_pretrained(tiny_siglip_dir)(image, return_tensors="pt")
    assert (got[0] - hf.pixel_values[0]).abs().max() <= 1e-6
    assert enc.image_mean == (0.5, 0.5, 0.5) and enc.image_std == (0.5, 0.5, 0.5) and enc.image_size == 224


@pytest.mark.parametrize("w,h", [(300, 200), (200, 301)])
def test_dino_preprocessing(tiny_dino_dir, w, h):
    image = synthetic_image(w, h)
    enc = load_encoder(tiny_dino_dir)
    # shortest edge -> 224 (the longer edge int(224 * long / short)), bicubic, then a 224 center crop
    new = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    a = np.asarray(image.resize(new, Image.BICUBIC))
    top, left = (a.shape[0] - 224) // 2, (a.shape[1] - 224) // 2
    expected = normalize(a[top:top + 224, left:left + 224], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    got = enc.preprocess([image])
    assert got.shape == (1, 3, 224, 224) and (got[0] - expected).abs().max() <= 1e-6
    # The official tower: AutoImageProcessor with crop 224 and shortest edge 224 (dino_encoder.py).
    hf = transformers.BitImageProcessor.from_pretrained(tiny_dino_dir, crop_size=dict(height=224, width=224),
                                                        size=dict(shortest_edge=224))
    assert (got[0] - hf(image, return_tensors="pt").pixel_values[0]).abs().max() <= 1e-6


# ---------------------------------------------------------------- image files

def test_load_image_converts_every_mode_to_rgb(tmp_path):
    rgb = np.asarray(synthetic_image(40, 30))
    gray = rgb[..., 0]
    cases = {
        "gray.png": (Image.fromarray(gray), np.stack([gray] * 3, -1)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full_like(gray, 7)])), rgb),  # alpha dropped, like .convert
        "rgb.jpg": (Image.fromarray(rgb), None),
    }
    palette = Image.fromarray(rgb).quantize(16)
    cases["palette.png"] = (palette, np.asarray(palette.convert("RGB")))
    deep = (np.arange(30 * 40).reshape(30, 40) * 54).astype(np.uint16)  # up to 64746
    cases["gray16.png"] = (Image.fromarray(deep), np.stack([deep >> 8] * 3, -1).astype(np.uint8))
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        got = load_image(tmp_path / name)
        assert got.mode == "RGB" and got.size == (40, 30), name
        if expected is not None:
            assert np.array_equal(np.asarray(got), expected), name
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")  # really a 16-bit file


def test_bad_image_files_give_a_clear_error(tmp_path):
    (tmp_path / "notes.png").write_bytes(b"this is not an image at all")
    synthetic_image().save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    for name in ("notes.png", "cut.png"):
        with pytest.raises(ValueError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(ValueError, match="missing.png: no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="key-7"):  # the bytes of a tar member, named by its sample's key
        load_image(data[:len(data) // 2], name="key-7")
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(load_image(tmp_path / "full.png")))


def test_training_and_sampling_decode_16_bit_images_alike(tmp_path):
    """data.py's stream and sample.py both read images through encoders.load_image: a 16-bit grayscale PNG (which
    PIL's convert("RGB") clips to mostly white) gives the same RGB pixels on both paths, scaled to 8 bits."""
    from data import SampleStream, open_source
    ramp = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    (tmp_path / "data.jsonl").write_text(json.dumps(dict(image="deep.png", conversations=[
        dict(**{"from": "human"}, value="Draw it."), dict(**{"from": "gpt"}, value="<image>")])) + "\n")
    stream = SampleStream(open_source(tmp_path / "data.jsonl"), None, 64, shuffle=False, epochs=1, images_only=True)
    trained = np.asarray(next(iter(stream)).image)
    sampled = np.asarray(load_image(tmp_path / "deep.png"))
    assert np.array_equal(trained, sampled) and np.array_equal(sampled, np.stack([ramp >> 8] * 3, -1))
    assert (trained == 255).mean() < 0.01  # not the clipped, mostly white image


# ---------------------------------------------------------------- loading errors

def test_encoder_key_mismatch_lists_the_keys(tiny_siglip_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_siglip_dir, folder)
    with safe_open(folder / "model.safetensors", "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd.pop("vision_model.encoder.layers.1.mlp.fc2.bias")
    sd["vision_model.encoder.layers.2.mlp.fc2.bias"] = torch.zeros(32)
    sd["vision_model.embeddings.position_embedding.weight"] = torch.zeros(100, 32)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(WeightsError) as e:
        load_encoder(folder)
    for text in ("layers.1.mlp.fc2.bias", "layers.2.mlp.fc2.bias", "position_embedding.weight: file (100, 32)"):
        assert text in str(e.value)


def test_unsupported_encoders_are_refused(tiny_siglip_dir, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(tiny_siglip_dir, folder)
    for model_type, message in [("siglip2", "NaFlex"), ("clip", "not supported")]:
        cfg = json.loads((tiny_siglip_dir / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
        with pytest.raises(WeightsError, match=message):
            read_encoder_config(folder)


def test_toy_encoder_saves_the_hub_layout_and_loads_back(tmp_path):
    """The toy SigLIP encoder is written in the layout load_encoder reads, and gives 8 x 8 tokens at 64 px."""
    from encoders import ImageProcessing, SigLIP2Encoder, load_encoder
    from shapes import TOY_ENCODER, save_siglip
    torch.manual_seed(0)
    enc = SigLIP2Encoder(TOY_ENCODER, ImageProcessing((64, 64), (0.5,) * 3, (0.5,) * 3, resample=2)).eval()
    save_siglip(enc, tmp_path)
    back = load_encoder(tmp_path)
    images = [synthetic_image(80, 50, seed=s) for s in range(2)]
    assert torch.equal(back.preprocess(images), enc.preprocess(images))
    with torch.no_grad():
        z = back.encode(back.preprocess(images))
        assert z.shape == (2, 64, 96) and torch.equal(z, enc.encode(enc.preprocess(images)))


def test_siglip_init_lets_image_content_dominate_the_toy_tokens():
    """SigLIP's own initialization (positions ~ N(0, 1/C), LeCun-normal patches), not PyTorch's N(0, 1) positions:
    the tokens of differently colored squares are further apart, so the toy latents carry the colors."""
    import random

    from encoders import ImageProcessing, SigLIP2Encoder
    from shapes import COLORS, TOY_ENCODER, Shapes, init_siglip, render_shapes
    images = [render_shapes(Shapes("square", c, 1, "large", "center"), random.Random(0), 64)[0] for c in COLORS]

    def color_similarity(enc):  # mean cosine between the centre tokens of the six colors
        with torch.no_grad():
            t = torch.nn.functional.normalize(enc.encode(enc.preprocess(images))[:, 27], dim=-1)
        return ((t @ t.T).sum() - len(t)) / (len(t) * (len(t) - 1))

    def encoder(init):
        torch.manual_seed(0)
        enc = SigLIP2Encoder(TOY_ENCODER, ImageProcessing((64, 64), (0.5,) * 3, (0.5,) * 3, resample=2))
        return init_siglip(enc) if init else enc

    siglip, default = encoder(True), encoder(False)
    pos = siglip.embeddings.position_embedding.weight
    assert abs(pos.std().item() * siglip.hidden_size ** 0.5 - 1) < 0.1 and not siglip.embeddings.patch_embedding.bias.any()
    assert color_similarity(siglip) < color_similarity(default) - 0.03
