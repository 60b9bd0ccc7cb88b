"""sample.py end to end, called in-process as `sample.main(argv)`, on tiny random checkpoints in the exact official
on-disk layout: model folder (official config.json field set, model.safetensors, slow-format tokenizer files),
decoder folder (ViT-MAE config.json + model.pt), and a SigLIP encoder folder. (tests/test_toy.py runs the script
itself, as the README's quick start does.)"""

import json
import os
import struct
import zlib
from pathlib import Path

import huggingface_hub
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample
from helpers import opens_an_image_first, random_scale_rae, write_scale_rae_tokenizer
from model import ScaleRAE
from rae import RAE
from weights import save_safetensors, write_atomic
from test_rae import write_decoder

IM_START = 151665


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No Hub: a repo id that is not a local folder fails at once, as on an air-gapped machine."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def official_config(encoder_dir, **over):
    """config.json as the official training writes it, at a tiny size."""
    return {"architectures": ["ScaleRAEQwenForCausalLM"], "model_type": "qwen2", "vocab_size": 151667,
            "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
            "hidden_act": "silu", "max_position_embeddings": 32768, "use_sliding_window": False, "patch_size": 2,
            "rope_scaling": None, "torch_dtype": "float32", "use_cache": True,
            "vision_loss": "diffusion-loss", "vision_loss_mode": "query", "vision_coef": 2.0,
            "diffusion_split_per_token": 256, "diffusion_model_hidden_size": 64, "diffusion_model_channels": 32,
            "diffusion_model_depth": 2, "diffusion_model_heads": 4, "diffusion_model_z_channels": 48,
            "ddt_encoder_depth": 2, "diffusion_class_dropout_prob": 0.1, "dit_cls": "DiT", "diffusion_base_dim": None,
            "diffusion_norm_stats_path": None, "diffusion_timesteps_per_sample": 1, "aux_regression": False,
            "mm_vision_tower_aux_list": [f"{encoder_dir}-interp256"], "mm_vision_tower_aux_token_len_list": [256],
            "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -1,
            "mm_use_im_start_end": True, "image_aspect_ratio": "square", "tokenizer_model_max_length": 512,
            "si_token_len": 729, "miv_token_len": 0, **over}  # the last two: the official code reads them at load


def write_model(folder, encoder_dir, always_image):
    """A tiny random Scale-RAE checkpoint. With `always_image`, the weights make <im_start> the first answer token
    for any prompt (helpers.opens_an_image_first)."""
    write_scale_rae_tokenizer(folder)
    cfg = official_config(encoder_dir)
    (folder / "config.json").write_text(json.dumps(cfg))
    model = random_scale_rae(cfg)
    if always_image:
        opens_an_image_first(model, IM_START)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_siglip_dir):
    root = tmp_path_factory.mktemp("ckpt")
    return dict(t2i=write_model(root / "t2i", tiny_siglip_dir, True), chat=write_model(root / "chat", tiny_siglip_dir, False),
                decoder=write_decoder(root / "decoder"), root=root)


def run(capsys, dirs, *args, model="t2i", ok=True):
    """sample.main on dirs[model]; returns what it printed (stdout, or with ok=False its exit message + stderr)."""
    argv = ["--model-path", str(dirs[model]), "--decoder-repo", str(dirs["decoder"]), "--device", "cpu", *args]
    if ok:
        sample.main(argv)
        return capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    return f"{e.value.code}\n{capsys.readouterr().err}"


def manifest(out):
    [path] = Path(out).glob("*_manifest*.json")
    return json.loads(path.read_text())


def test_text_to_image_writes_pngs_latents_and_manifest(dirs, tmp_path, capsys):
    out = run(capsys, dirs, "--prompt", "Can you generate a red circle?", "--steps", "3", "--save-latent",
            "--output-dir", str(tmp_path))
    m = manifest(tmp_path)
    [r] = m["results"]
    assert len(m["images"]) == 1 and len(m["latents"]) == 1 and r["token_ids"] == [IM_START] and r["seeds"] == [42]
    assert r["prompt"] == "Can you generate a red circle?" and m["seed"] == 42 and m["steps"] == 3
    assert m["guidance_level"] == 1.0 and m["dtype"] == "float32" and m["model_path"] == str(dirs["t2i"])
    from PIL import Image
    assert Image.open(m["images"][0]).size == (224, 224)
    assert load_file(m["latents"][0])["latent"].shape == (256, 32)
    assert all(f"wrote {f}" in out for f in m["images"] + m["latents"])
    # A second run never overwrites the first.
    run(capsys, dirs, "--prompt", "Can you generate a red circle?", "--steps", "3", "--output-dir", str(tmp_path))
    assert len(list(tmp_path.glob("*.png"))) == 2 and len(list(tmp_path.glob("*manifest*.json"))) == 2


def test_batch_image_zero_equals_single_run_and_cfg_changes_the_image(dirs, tmp_path, capsys):
    run(capsys, dirs, "--prompt", "a cat", "--steps", "2", "--save-latent", "--num-images", "3", "--seed", "7",
        "--output-dir", str(tmp_path / "batch"))
    run(capsys, dirs, "--prompt", "a cat", "--steps", "2", "--save-latent", "--seed", "7", "--output-dir", str(tmp_path / "one"))
    run(capsys, dirs, "--prompt", "a cat", "--steps", "2", "--save-latent", "--seed", "8", "--output-dir", str(tmp_path / "two"))
    run(capsys, dirs, "--prompt", "a cat", "--steps", "2", "--save-latent", "--seed", "7", "--cfg", "4.0",
        "--output-dir", str(tmp_path / "cfg"))
    lat = {k: [load_file(f)["latent"] for f in manifest(tmp_path / k)["latents"]] for k in ("batch", "one", "two", "cfg")}
    assert len(lat["batch"]) == 3
    assert (lat["batch"][0] - lat["one"][0]).abs().max() < 1e-5  # image i uses seed + i, batched or not
    assert (lat["batch"][1] - lat["two"][0]).abs().max() < 1e-5
    assert (lat["cfg"][0] - lat["one"][0]).abs().max() > 1e-3  # real guidance, not the official no-op


def test_understanding_from_an_image_and_from_a_latent(dirs, tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    out = run(capsys, dirs, "--image", str(tmp_path / "red.png"), "--prompt", "What color is it?", "--max-new-tokens", "5",
            "--output-dir", str(tmp_path / "img"), model="chat")
    m = manifest(tmp_path / "img")
    assert len(m["results"][0]["token_ids"]) == 5 and m["input_image"].endswith("red.png") and "text:" in out
    save_file({"latent": torch.randn(256, 32)}, tmp_path / "lat.safetensors")
    run(capsys, dirs, "--latent", str(tmp_path / "lat.safetensors"), "--prompt", "Describe it.", "--max-new-tokens-qa",
        "5", "--output-dir", str(tmp_path / "lat"), model="chat")
    assert len(manifest(tmp_path / "lat")["results"][0]["token_ids"]) == 5
    # --latent alone decodes it.
    run(capsys, dirs, "--latent", str(tmp_path / "lat.safetensors"), "--output-dir", str(tmp_path / "dec"))
    assert len(manifest(tmp_path / "dec")["images"]) == 1


def test_no_image_when_the_model_never_opens_one(dirs, tmp_path, capsys):
    out = run(capsys, dirs, "--prompt", "hello", "--max-new-tokens", "3", "--output-dir", str(tmp_path), model="chat")
    m = manifest(tmp_path)
    assert m["images"] == [] and len(m["results"][0]["token_ids"]) == 3 and m["results"][0]["image_produced"] is False
    assert "no image produced" in out


@pytest.mark.parametrize("args,message", [
    (["--prompt", "  "], "empty prompt"),
    (["--prompt", "x", "--seed", "-1"], "--seed: must be >= 0"),
    (["--prompt", "x", "--steps", "0"], "--steps: must be >= 1"),
    (["--prompt", "x", "--steps", "two"], "--steps: invalid int value"),
    (["--prompt", "x", "--guidance-level", "-2"], "--guidance-level/--cfg: must be >= 0"),
    (["--prompt", "x", "--guidance-level", "nan"], "--guidance-level/--cfg: must be >= 0"),
    (["--prompt", "x", "--cfg", "inf"], "--guidance-level/--cfg: must be >= 0"),
    (["--prompt", "x", "--cfg-interval", "0.9", "0.1"], "needs LO <= HI"),
    (["--prompt", "x", "--cfg-interval", "0", "nan"], "--cfg-interval: must be >= 0 and <= 1"),
    (["--prompt", "x", "--seed", str(2**63)], "--seed: must be >= 0 and <= 9223372036854775807"),
    (["--prompt", "x", "--num-images", "10001"], "--num-images/--n-samples: must be >= 1 and <= 10000"),
    (["--prompt", "x", "--device", "tpu9"], "--device: "),
    (["--prompt", "x", "--device", "cpu:notanumber"], "--device: "),
    (["--prompt", "x", "--output-dir", "/proc/outputs"], "cannot write in /proc/outputs"),
    (["--prompt", "x", "--image", "/nonexistent.png"], "/nonexistent.png"),
    (["--latent", "/nonexistent.safetensors"], "not a latent file"),
    ([], "give --prompt"),
])
def test_bad_input_fails_fast_with_a_clear_message(args, message, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_pipeline", None)  # nothing may be loaded
    with pytest.raises(SystemExit) as e:
        sample.main(["--model-path", "/nonexistent/model", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def png_header(width, height):
    """A PNG whose header announces width x height: enough for PIL's decompression-bomb check, which reads no pixel."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("name,content,message", [
    ("bomb.png", png_header(14000, 14000), "not a readable image (DecompressionBombError"),
    ("nan.safetensors", None, "finite numbers"),
    ("prompts.jsonl", b'{"prompt": "a cat"}\n{"prompt": 5}\n', "line 2: needs a string prompt"),
    ("bad.jsonl", b'{"prompt": "a cat"}\n\n{"prompt": \n', "line 3: not a JSON object"),
    ("file", b"", "Not a directory"),
])
def test_bad_files_fail_fast_with_a_clear_message(tmp_path, name, content, message, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_pipeline", None)
    path = tmp_path / name
    if content is None:
        save_file({"latent": torch.full((256, 32), float("nan"))}, path)
    else:
        path.write_bytes(content)
    flag = {".png": ["--prompt", "x", "--image"], ".safetensors": ["--latent"], ".jsonl": ["--prompts-file"],
            "": ["--prompt", "x", "--output-dir"]}[path.suffix]
    with pytest.raises(SystemExit) as e:
        sample.main([*flag, str(path / "sub" if name == "file" else path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_no_output_folder_when_loading_fails(dirs, tmp_path, capsys):
    run(capsys, dirs, "--prompt", "x", "--model-path", str(tmp_path / "none"), "--output-dir", str(tmp_path / "out"),
        ok=False)
    assert not (tmp_path / "out").exists()


def test_non_finite_latents_and_failed_writes_leave_no_file(dirs, tmp_path, capsys, monkeypatch):
    """A NaN latent ends the run naming prompt and seed before any file is written; a write that fails (a full disk)
    is one error line and leaves neither a 0-byte PNG nor a temporary file."""
    real = ScaleRAE.sample_latents
    monkeypatch.setattr(ScaleRAE, "sample_latents", lambda *a, **k: real(*a, **k) * float("nan"))
    out = run(capsys, dirs, "--prompt", "a cat", "--steps", "1", "--output-dir", str(tmp_path / "nan"), ok=False)
    assert "'a cat' (seed 42) is not finite" in out and not (tmp_path / "nan").exists()
    monkeypatch.setattr(ScaleRAE, "sample_latents", real)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full)
    out = run(capsys, dirs, "--prompt", "a cat", "--steps", "1", "--output-dir", str(tmp_path / "full"), ok=False)
    assert out.startswith("error: cannot write the outputs") and "No space left" in out
    assert list((tmp_path / "full").iterdir()) == []


def test_images_decode_in_batches_and_long_prompts_warn(dirs, tmp_path, capsys, monkeypatch):
    sizes = []
    real = RAE.decode
    monkeypatch.setattr(RAE, "decode", lambda self, z: sizes.append(len(z)) or real(self, z))
    run(capsys, dirs, "--prompt", "a cat", "--steps", "1", "--num-images", "3", "--batch-size", "2",
        "--output-dir", str(tmp_path))
    assert sizes == [2, 1] and len(list(tmp_path.glob("*.png"))) == 3
    with pytest.warns(UserWarning, match="longer than the 512 positions"):
        run(capsys, dirs, "--prompt", "cat " * 600, "--max-new-tokens", "1", "--output-dir", str(tmp_path / "long"),
            model="chat")


def test_outputs_get_the_users_umask_and_foreign_temporaries_are_kept(tmp_path):
    old = os.umask(0o022)
    try:
        save_file({"a": torch.zeros(1)}, tmp_path / "plain.safetensors")  # what safetensors does alone: 0600
        save_safetensors({"a": torch.zeros(1)}, tmp_path / "model.safetensors")
        assert os.stat(tmp_path / "model.safetensors").st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    (tmp_path / "x.png.tmp").write_text("someone else's")
    write_atomic(tmp_path / "x.png", b"ours")
    assert (tmp_path / "x.png.tmp").read_text() == "someone else's" and (tmp_path / "x.png").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "plain.safetensors", "x.png", "x.png.tmp"]


def test_safetensors_are_written_a_tensor_at_a_time_and_read_back_exactly(tmp_path):
    """save_safetensors writes the format itself, each tensor when full() has made it whole (a sharded one gathered):
    safetensors reads back every dtype, shape, value and the metadata."""
    sd = dict(w=torch.randn(5, 3), half=torch.randn(4).bfloat16(), ids=torch.arange(7), mask=torch.rand(2, 3) > 0.5,
              scalar=torch.tensor(3.5), empty=torch.zeros(0, 4), view=torch.randn(6, 4)[::2].T)
    made = []
    full = lambda t: made.append(t.shape) or t.clone()  # noqa: E731
    save_safetensors(sd, tmp_path / "a.safetensors", {"format": "pt"}, full=full)
    got = load_file(tmp_path / "a.safetensors")
    assert sorted(got) == sorted(sd) and all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in sd.items())
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert made == [v.shape for v in sd.values()]
    save_safetensors(sd, tmp_path / "f32.safetensors", dtype=torch.float32)  # as exports: every tensor in float32
    got = load_file(tmp_path / "f32.safetensors")
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v.float()) for k, v in sd.items())
    with pytest.raises(ValueError, match=r"w: full\(\) gave shape \(1, 3\), not \(5, 3\)"):
        save_safetensors(sd, tmp_path / "bad.safetensors", full=lambda t: t[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "f32.safetensors"]  # nothing half-written


def test_missing_weights_and_bad_checkpoints_are_one_clear_message(dirs, tmp_path, capsys):
    out = run(capsys, dirs, "--prompt", "x", "--model-path", "nyu-visionx/not-a-real-repo", ok=False)
    assert out.startswith("error:") and "not-a-real-repo" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in dirs["t2i"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(bad / "model.safetensors")
    del sd["diff_head_projector.bias"]
    save_file(sd, bad / "model.safetensors")
    out = run(capsys, dirs, "--prompt", "x", "--model-path", str(bad), ok=False)
    assert out.startswith("error:") and "missing (1): diff_head_projector.bias" in out

