"""The release, offline: tiny checkpoints in each released layout (sharded safetensors with an index or one file, bf16
or fp32 on disk, tied or untied lm_head; SigLIP-2 at 1152 channels and WebSSL-DINO at 1024, with their decoders),
run through sample.py's t2i / img / latent commands with an empty Hugging Face cache and HF_HUB_OFFLINE=1; the official
numerics switch (`--official`) against the official loop's roundings; and the config checks of every released variant."""

import json

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import sample
from helpers import opens_an_image_first, random_scale_rae
from encoders import load_encoder
from model import ScaleRAE, ScaleRAEConfig
from rae import RELEASED_ENCODERS, DecoderConfig, RAEDecoder
from test_rae import TINY
from test_sample import official_config, write_scale_rae_tokenizer
from weights import WeightsError

transformers = pytest.importorskip("transformers")
IM_START = 151665
SIGLIP, DINO = "google/siglip2-so400m-patch14-224", "facebook/webssl-dino300m-full2b-224"
WIDTH = {SIGLIP: 1152, DINO: 1024}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """An air-gapped machine: an empty cache and no Hub."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_release(folder, encoder, shards=1, dtype=torch.float32, tied=True, always_image=True, **over):
    """A tiny Scale-RAE checkpoint as released: the official config.json naming the Hub encoder, the slow tokenizer
    files, and the weights in one model.safetensors or `shards` files with model.safetensors.index.json."""
    write_scale_rae_tokenizer(folder)
    cfg = official_config(encoder, diffusion_model_channels=WIDTH[encoder], mm_hidden_size=WIDTH[encoder],
                          tie_word_embeddings=tied, **over)
    (folder / "config.json").write_text(json.dumps(cfg))
    model = random_scale_rae(cfg)
    if always_image:
        opens_an_image_first(model, IM_START)
    sd = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    if shards == 1:
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    names, weight_map = list(sd), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in names[s::shards]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_decoder(folder, width, extra=()):
    """A released decoder folder (ViT-MAE config.json whose hidden_size is the ViT-MAE default, model.pt) for an
    encoder of `width` channels, with `extra` unused keys such as MAE's mask_token."""
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    sd = RAEDecoder(DecoderConfig(**TINY), width, (0.5,) * 3, (0.5,) * 3).state_dict()
    torch.save(sd | {k: torch.zeros(1, 1, TINY["decoder_hidden_size"]) for k in extra}, folder / "model.pt")
    transformers.ViTMAEConfig(hidden_size=768, **TINY).to_json_file(folder / "config.json")
    return folder


def write_encoder(folder, encoder):
    """A tiny encoder in the Hub layout, at the released width (1152 or 1024) and geometry (224 px, patch 14)."""
    torch.manual_seed(2)
    if encoder == SIGLIP:
        cfg = transformers.SiglipConfig(vision_config=dict(hidden_size=1152, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=16, image_size=224, patch_size=14),
                                        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=40,
                                                         num_hidden_layers=1, num_attention_heads=4))
        transformers.SiglipModel(cfg).save_pretrained(folder)
        transformers.SiglipImageProcessor(size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3,
                                          image_std=[0.5] * 3).save_pretrained(folder)
    else:
        cfg = transformers.Dinov2Config(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, mlp_ratio=0.0625,
                                        image_size=224, patch_size=14)
        transformers.Dinov2Model(cfg).save_pretrained(folder)
        _, mean, std = RELEASED_ENCODERS[DINO]
        transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                       image_mean=list(mean), image_std=list(std)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    return dict(
        siglip=write_release(root / "siglip", SIGLIP, shards=3, dtype=torch.bfloat16, tied=True),
        siglip_fp32=write_release(root / "siglip_fp32", SIGLIP, tied=False),
        dino=write_release(root / "dino", DINO, shards=2, tied=False),
        chat=write_release(root / "chat", SIGLIP, always_image=False),
        siglip_decoder=write_decoder(root / "siglip_decoder", 1152, extra=["mask_token"]),
        dino_decoder=write_decoder(root / "dino_decoder", 1024),
        siglip_encoder=write_encoder(root / "siglip_encoder", SIGLIP),
        dino_encoder=write_encoder(root / "dino_encoder", DINO))


def run(capsys, tmp_path, release, *args, model="siglip", decoder="siglip_decoder", ok=True):
    """sample.main on release[model]; returns (the manifest, what it printed) or, with ok=False, the exit message."""
    argv = [*args, "--model-path", str(release[model]), "--device", "cpu", "--steps", "2", "--output-dir",
            str(tmp_path / "out")] + (["--decoder-repo", str(release[decoder])] if decoder else [])
    if not ok:
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        return str(e.value.code)
    sample.main(argv)
    [path] = (tmp_path / "out").glob("*_manifest*.json")
    return json.loads(path.read_text()), capsys.readouterr().out


@pytest.mark.parametrize("model,decoder", [("siglip", "siglip_decoder"), ("siglip_fp32", "siglip_decoder"),
                                           ("dino", "dino_decoder")])
def test_text_to_image_needs_only_the_model_and_decoder_folders(model, decoder, release, tmp_path, capsys):
    """No encoder file anywhere (empty cache, offline): the decoder's width comes from its model.pt and its
    de-normalization from the table of released encoders. Every on-disk layout gives the same model."""
    m, out = run(capsys, tmp_path, release, "t2i", "--prompt", "Can you generate a cat?", "--save-latent",
                 model=model, decoder=decoder)
    assert len(m["images"]) == 1 and m["encoder"] == (SIGLIP if "siglip" in model else DINO) and m["mode"] == "t2i"
    from PIL import Image
    assert Image.open(m["images"][0]).size == (224, 224)
    from safetensors.torch import load_file
    assert load_file(m["latents"][0])["latent"].shape == (256, 1024 if model == "dino" else 1152)


def test_layouts_load_as_written(release):
    """Sharded with an index, bf16 or fp32 on disk, tied (no lm_head.weight in the files) or untied: every tensor
    arrives as the file holds it, in float32."""
    from safetensors.torch import load_file
    for name, shards, tied in [("siglip", 3, True), ("dino", 2, False), ("siglip_fp32", 1, False)]:
        files = sorted(release[name].glob("model*.safetensors"))
        on_disk = {k: v for f in files for k, v in load_file(f).items()}
        loaded = ScaleRAE.from_pretrained(release[name]).state_dict()
        assert len(files) == shards and set(on_disk) == set(loaded) and ("lm_head.weight" in loaded) != tied
        assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()) for k, v in on_disk.items())


def test_each_tensor_is_converted_as_it_is_read(release, monkeypatch):
    """Loading fp32 files into bfloat16 never keeps the file's copies: each tensor is converted as it is read (while
    its shard is mapped), so no earlier file tensor is alive when the next one is read."""
    import weakref

    import model
    alive, real = [], model.caster

    def tracking(module, dtype=None, device="cpu"):
        cast = real(module, dtype, device)

        def track(name, tensor):
            assert not [r for r in alive if r() is not None], "a file tensor outlived its conversion"
            converted = cast(name, tensor)
            if converted is not tensor:  # the fp32 tables (positions, RoPE) are kept as read
                alive.append(weakref.ref(tensor))
            return converted
        return track
    monkeypatch.setattr(model, "caster", tracking)
    loaded = ScaleRAE.from_pretrained(release["siglip_fp32"], dtype=torch.bfloat16)
    assert len(alive) > 0.9 * len(loaded.state_dict()) and loaded.lm_head.weight.dtype == torch.bfloat16


def test_reading_an_image_without_the_encoder_names_what_to_download(release, tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "g.png")
    message = run(capsys, tmp_path, release, "img", "--image", str(tmp_path / "g.png"), "--prompt", "What is it?",
                  model="chat", ok=False)
    assert message.count("\n") == 0 and f"huggingface-cli download {SIGLIP}" in message and "needs the encoder" in message
    assert not (tmp_path / "out").exists()


def test_an_encoder_that_does_not_match_the_decoders_statistics_is_refused(release):
    """The table's statistics are checked against the encoder's preprocessor_config.json when it loads."""
    from rae import RAE, load_decoder
    rae = RAE(load_decoder(release["siglip_decoder"], *RELEASED_ENCODERS[SIGLIP][1:]),
              encoder_args=dict(path_or_repo=release["dino_encoder"]))
    with pytest.raises(WeightsError, match=r"normalizes pixels with mean, std = \(\(0.485"):
        rae.encoder
    assert RAE(None, encoder_args=dict(path_or_repo=release["dino_encoder"])).encoder.hidden_size == 1024


@pytest.mark.parametrize("model,encoder", [("chat", "siglip_encoder"), ("dino", "dino_encoder")])
def test_img_reads_an_image_with_a_local_encoder(model, encoder, release, tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "g.png")
    m, out = run(capsys, tmp_path, release, "img", "--image", str(tmp_path / "g.png"), "--prompt", "What is it?",
                 "--encoder-path", str(release[encoder]), "--max-new-tokens", "3", model=model,
                 decoder="dino_decoder" if model == "dino" else "siglip_decoder")
    [r] = m["results"]
    assert m["mode"] == "img" and m["encoder"] == str(release[encoder])
    assert r["token_ids"] == [IM_START] if model == "dino" else len(r["token_ids"]) == 3  # dino draws an image
    assert len(m["images"]) == (1 if model == "dino" else 0)


def test_latent_commands_read_official_pt_latents_and_skip_the_decoder(release, tmp_path, capsys, monkeypatch):
    torch.save(torch.randn(256, 1152), tmp_path / "x_latent.pt")  # the official CLI's torch.save(image_embeds)
    m, _ = run(capsys, tmp_path, release, "latent", "--latent", str(tmp_path / "x_latent.pt"), "--action", "decode")
    assert m["mode"] == "latent-decode" and len(m["images"]) == 1 and m["results"][0]["image_produced"] is False
    import rae
    monkeypatch.setattr(rae, "load_decoder", None)  # qa and --skip-decoder never load a decoder
    (tmp_path / "out").rename(tmp_path / "decode")
    m, _ = run(capsys, tmp_path, release, "latent", "--latent", str(tmp_path / "x_latent.pt"), "--action", "qa",
               "--prompt", "Describe it.", "--max-new-tokens-qa", "4", model="chat")
    assert m["mode"] == "latent-qa" and len(m["results"][0]["token_ids"]) == 4 and m["decoder_repo"] is None
    (tmp_path / "out").rename(tmp_path / "qa")
    m, _ = run(capsys, tmp_path, release, "--prompt", "a cat", "--skip-decoder")
    assert m["images"] == [] and len(m["latents"]) == 1  # --skip-decoder keeps the latents


def test_pt_latents_with_code_or_a_wrong_shape_are_refused(release, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_pipeline", None)
    torch.save({"latent": torch.randn(256, 1152), "f": print}, tmp_path / "code.pt")  # a pickle that names a function
    torch.save(torch.randn(2, 256, 1152), tmp_path / "two.pt")
    for name, message in [("code.pt", "not a latent file (UnpicklingError"), ("two.pt", "(tokens, channels)")]:
        with pytest.raises(SystemExit):
            sample.main(["latent", "--latent", str(tmp_path / name), "--action", "decode"])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["latent", "image"])
def test_post_qa_asks_the_model_about_each_image_it_drew(mode, release, tmp_path, capsys):
    template = tmp_path / "qa_prompt_template.txt"
    template.write_text("Does the image match the prompt? Answer yes or no.")
    m, out = run(capsys, tmp_path, release, "t2i", "--prompt", "a cat", "--num-images", "2", "--post-qa-template-path",
                 str(template), "--post-qa-mode", mode, "--post-qa-max-new-tokens", "3", "--encoder-path",
                 str(release["siglip_encoder"]))
    [r] = m["results"]
    assert m["post_qa"] == dict(mode=mode, prompt=template.read_text()) and len(r["post_qa"]) == 2
    assert out.count("post-QA: ") == 2 and len(m["images"]) == 2


@pytest.mark.parametrize("args,message", [
    (["img", "--prompt", "x"], "img needs --image and --prompt"),
    (["t2i", "--latent", "x.pt"], "t2i needs --prompt"),
    (["latent", "--prompt", "x"], "latent needs --latent"),
    (["--prompt", "x", "--action", "qa"], "--action needs --latent"),
    (["--latent", "x.safetensors", "--prompt", "x", "--action", "decode"], "--action decode takes no --prompt"),
    (["--prompt", "x", "--post-qa-prompt", "ok?", "--post-qa-mode", "image", "--skip-decoder"], "drop --skip-decoder"),
    (["--prompt", "x", "--post-qa-prompt", "a", "--post-qa-template-path", "t.txt"], "are exclusive"),
    (["--prompt", "x", "--post-qa-template-path", "/nonexistent.txt"], "/nonexistent.txt"),
    (["--prompt", "x", "--official", "--dtype", "bfloat16"], "--official runs in float32"),
])
def test_bad_command_lines_fail_before_loading(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sample, "load_pipeline", None)
    monkeypatch.setattr(sample, "read_latent", lambda path: torch.zeros(256, 1152))
    with pytest.raises(SystemExit) as e:
        sample.main(args + ["--output-dir", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- official numerics

def test_official_encoder_roundings(release):
    """--official: pixels rounded to bf16 before SigLIP, its LayerNorm run on the bf16 last-layer output (official
    siglip_encoder.py); DINO's features rounded to bf16 (dino_encoder.py). Against transformers on the same input."""
    pixels = torch.randn(2, 3, 224, 224)
    siglip = load_encoder(release["siglip_encoder"])
    hf = transformers.SiglipVisionModel.from_pretrained(release["siglip_encoder"], attn_implementation="eager").eval()
    with torch.no_grad():
        last = hf(pixels.bfloat16().float(), output_hidden_states=True).hidden_states[-1]
        ref = F.layer_norm(last.bfloat16(), (1152,), eps=1e-6)
        got = siglip.encode(pixels, official=True)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)  # eager attention as official: not one bf16 step off
    with torch.no_grad():
        plain = siglip.encode(pixels)
    assert (plain - got.float()).abs().max() > 1e-3  # the switch changes the numbers
    dino = load_encoder(release["dino_encoder"])
    with torch.no_grad():
        assert torch.equal(dino.encode(pixels, official=True), dino.encode(pixels.bfloat16().float()).bfloat16())


def official_loop(model, x, steps, image_start):
    """The official greedy loop (scale_rae_qwen2.py greedy_decode, no cache): step 1 reads the bf16 prompt embedding,
    later steps recompute the whole sequence on cat(bf16 prefix, fp32 tokens), which promotes it to fp32."""
    ids, seq = [], x.bfloat16()
    for _ in range(steps):
        token = model.logits(model(inputs_embeds=seq)[:, -1]).argmax(-1)
        ids.append(int(token))
        if ids[-1] == image_start:
            queries = model.model.latent_queries[None]
            h = model(inputs_embeds=torch.cat([seq.float(), model.model.embed_tokens(token[:, None]), queries], 1))
            return ids, model.diff_head_projector(h[:, -256:])[0]
        seq = torch.cat([seq, model.model.embed_tokens(token[:, None])], 1)
    return ids, None


def test_official_generation_equals_the_official_loop(release, tok):
    """generate(official=True) gives the official no-cache loop's tokens and image condition exactly: its first step
    reads the bf16 prompt (layer 0's RMSNorm rounds), later steps the same values promoted to fp32 by the new tokens.
    The model's first token stands in for <im_start> to make it draw from a plain prompt."""
    m = ScaleRAE.from_pretrained(release["chat"])
    features = torch.randn(1, 256, 1152)
    prompt = tok.encode_with_image("<|im_start|>user\n<im_start><image><im_end>\nDescribe it.<|im_end|>\n"
                                   "<|im_start|>assistant\n", 256)
    with torch.no_grad():
        x = m.embed(torch.tensor([prompt]), features, None)
        ref_ids, _ = official_loop(m, x, 6, None)
        [(ids, _)] = m.generate([prompt], set(), -1, features, 6, official=True)
        start = ref_ids[0]
        _, ref_cond = official_loop(m, x, 1, start)
        [(_, cond)] = m.generate([prompt], set(), start, features, 6, official=True)
        [(_, plain)] = m.generate([prompt], set(), start, features, 6)
    assert ids == ref_ids and torch.equal(cond, ref_cond)  # no cache, as official: the same arithmetic
    assert (plain - ref_cond).abs().max() > 3e-6  # without the roundings it differs (measured 1.1e-5)


def test_official_sample_py_is_float32_and_ignores_guidance(release, tmp_path, capsys):
    m, out = run(capsys, tmp_path, release, "--prompt", "a cat", "--official", "--guidance-level", "3")
    assert m["official"] and m["dtype"] == "float32" and m["guidance_level"] == 1.0 and "guidance set to 1.0" in out
    (tmp_path / "out").rename(tmp_path / "first")
    m, _ = run(capsys, tmp_path, release, "--prompt", "hello", "--official", "--max-new-tokens", "3", model="chat")
    assert len(m["results"][0]["token_ids"]) == 4  # the official loop stops after max_new_tokens + 1 tokens


# ---------------------------------------------------------------- configs and encoders of every released variant

@pytest.mark.parametrize("over,message", [
    (dict(model_type="llama"), "model_type='llama' (supported: 'qwen2' or 'cambrian_qwen')"),
    (dict(mm_vision_select_layer=-2), "mm_vision_select_layer=-2 (supported: -1)"),
    (dict(mm_vision_select_feature="cls_patch"), "mm_vision_select_feature='cls_patch' (supported: 'patch')"),
    (dict(mm_use_im_start_end=False), "mm_use_im_start_end=False (supported: True)"),
    (dict(use_sliding_window=True), "use_sliding_window=True (supported: False)"),
    (dict(tokenizer_model_max_length="512"), "tokenizer_model_max_length='512' (a positive integer)"),
])
def test_config_fields_the_official_code_reads_are_checked(over, message):
    with pytest.raises(WeightsError) as e:
        ScaleRAEConfig.from_official(official_config(SIGLIP, **over))
    assert message in str(e.value)


def test_released_config_variants_parse():
    cfg = official_config(SIGLIP, model_type="cambrian_qwen")  # what an export through the official class writes
    del cfg["diffusion_class_dropout_prob"]
    assert ScaleRAEConfig.from_official(cfg).dit.class_dropout_prob == 0.0  # the official fallback
    dino = ScaleRAEConfig.from_official(official_config(f"{DINO}-res448", mm_vision_select_layer=-2))  # DINO: ignored
    assert (dino.encoder, dino.encoder_image_size) == (DINO, 448)
    assert dino.to_official()["mm_vision_tower_aux_list"] == [f"{DINO}-res448"]
    assert ScaleRAEConfig.from_official(official_config(SIGLIP)).encoder_image_size is None


def hf_437_positions(self, embeddings, height, width):
    """transformers 4.37's Dinov2Embeddings.interpolate_pos_encoding (the official pin), for the oracle."""
    import math
    n, table = embeddings.shape[1] - 1, self.position_embeddings
    side = int(math.sqrt(table.shape[1] - 1))
    if n == table.shape[1] - 1 and height == width:
        return table
    h, w = height // self.config.patch_size + 0.1, width // self.config.patch_size + 0.1
    patch = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), scale_factor=(h / side, w / side), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, table.shape[-1])], 1)


@pytest.mark.parametrize("tiny_dino_dir", [0], indirect=True)  # the official tower is a plain Dinov2Model
def test_dino_resolution_override_and_token_grid_resize(tiny_dino_dir, monkeypatch):
    """`...-res448-interp256`: DINOv2 at 448 px (32 x 32 patches, the position table resized as transformers 4.37)
    and its tokens resized bilinearly to 16 x 16, as the official tower; never cut to the first 256."""
    from transformers.models.dinov2 import modeling_dinov2
    monkeypatch.setattr(modeling_dinov2.Dinov2Embeddings, "interpolate_pos_encoding", hf_437_positions)
    ours = load_encoder(tiny_dino_dir, image_size=448, tokens=256)
    hf = transformers.Dinov2Model.from_pretrained(tiny_dino_dir).eval()
    pixels = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        native = hf(pixels).last_hidden_state[:, 1:]  # (2, 1024, 32)
        grid = native.reshape(2, 32, 32, -1).permute(0, 3, 1, 2)
        ref = F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
        got = ours.encode(pixels)
    assert ours.image_size == 448 and ours.processing.size == 448 and got.shape == (2, 256, 32)
    assert (got - ref).abs().max() < 1e-4
    model = ScaleRAE(ScaleRAEConfig.from_official(official_config(DINO, mm_hidden_size=32)))
    with pytest.raises(ValueError, match="1024 image tokens; the model reads 256"):
        model.embed(torch.full((1, 256), -200), native, None)
