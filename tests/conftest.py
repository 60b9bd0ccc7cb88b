"""Tiny random encoder checkpoints in the Hub repos' exact on-disk layout, written by transformers itself:
a full SigLIP model (`vision_model.*` and `text_model.*`, model_type `siglip`) like google/siglip2-so400m-patch14-224,
and a DINOv2 model like facebook/webssl-dino300m-full2b-224, each with its preprocessor_config.json.
Real geometry (224 px, patch 14, 256 tokens), tiny width (32) and depth (2)."""

import pytest
import torch

from helpers import write_scale_rae_tokenizer

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def randomize(model):
    """transformers initializes norms to 1 and biases to 0; make every parameter matter in the parity tests."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or "lambda1" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("bias") or "token" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=14),
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16))
    randomize(transformers.SiglipModel(cfg)).save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=[0, 4], ids=["dinov2", "dinov2-registers"])
def tiny_dino_dir(request, tmp_path_factory):
    """Dinov2Model (as WebSSL-DINO ships) and, to cover the register variant, Dinov2WithRegistersModel."""
    transformers = pytest.importorskip("transformers")
    registers = request.param
    folder = tmp_path_factory.mktemp(f"dino{registers}")
    torch.manual_seed(1)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=224,
                  patch_size=14, layerscale_value=0.5)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**common, num_register_tokens=registers))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    randomize(model).save_pretrained(folder)
    # facebook/dinov2-* ship shortest_edge 256; the official tower overrides it with 224 (crop 224).
    transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                                   image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """Long runs started with the session, for the tests that wait for them: the tests run one at a time, mostly on
    one core, and these runs use another. A test module opts in with a function start_background(tmp_path_factory,
    selected tests), called here when one of its tests is selected; it returns a handle with stop(), which its tests
    find under the module's name."""
    handles, selected = {}, request.session.items
    for module in dict.fromkeys(getattr(item, "module", None) for item in selected):
        if hasattr(module, "start_background"):
            handles[module.__name__] = module.start_background(tmp_path_factory, selected)
    yield handles
    for handle in handles.values():
        handle.stop()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A Scale-RAE tokenizer folder (slow-format files) on the real Qwen2.5 vocabulary."""
    return write_scale_rae_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tok(tok_dir):
    from tokenizer import Tokenizer
    return Tokenizer.from_dir(tok_dir)
