"""train_tpu.py end to end, as a user runs it (a subprocess per run), on tiny models, offline, on the CPU.

Plain PyTorch: stage 1 and stage 2 overfit a tiny synthetic set, the decoder stage lowers the reconstruction
error, the exports load back, a killed run resumes to the same losses as an uninterrupted one, a diverging run
stops and leaves its last good checkpoint intact.
torch_xla SPMD (PJRT_DEVICE=CPU, 8 virtual devices; skipped without torch_xla): the sharded run gives the same
losses as the single-device one, the step compiles once, a truncated checkpoint is skipped for the previous one,
and stage 2 and the decoder stage run too.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import write_shapes
from shapes import write_shapes_dataset
from encoders import ImageProcessing, SigLIP2Encoder, SiglipVisionConfig
from tokenizer import Tokenizer, chat_prompt, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HAS_XLA = importlib.util.find_spec("torch_xla") is not None
needs_xla = pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed (the SPMD tests use its CPU runtime)")
SEQ_LEN = 352  # the longest tiny sample: 256 image slots + ~86 text tokens

# Tiny sizes, registered before train_tpu.py runs (setdefault: presets of the same name in the repo win).
RUNNER = """
import runpy, sys
import dit, model, rae
model.QWEN_PRESETS.setdefault("tiny", model.QwenConfig(vocab_size=350, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0))
dit.DIT_PRESETS.setdefault("tiny", dit.DiTConfig(hidden_size=32, depth=1, num_heads=2, in_channels=32, z_channels=32))
rae.DECODER_PRESETS.setdefault("tiny", rae.DecoderConfig(32, 1, 2, 64, patch_size=2, image_size=32))
sys.argv = ["train_tpu.py"] + sys.argv[1:]
runpy.run_path("train_tpu.py", run_name="__main__")
"""
# LLVM's optimization passes dominate XLA's CPU compile time; without them a tiny step compiles ~5x faster.
XLA_ENV = dict(PJRT_DEVICE="CPU",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """8 synthetic samples (32 px, generation and understanding mixed; JSONL for stage 1, WebDataset tars for the
    decoder), 8 other generation samples for stage 2, a BPE tokenizer trained on them, and a frozen random tiny
    SigLIP encoder (32 px in patches of 2 -> 256 tokens of 32 channels)."""
    root = tmp_path_factory.mktemp("assets")
    paths = write_shapes(root / "shapes", 8, seed=0, image_size=32, samples_per_tar=4)
    jsonl = paths["jsonl"]
    jsonl2 = write_shapes_dataset(root / "shapes2", 8, seed=1, image_size=32, understanding_fraction=0.0)
    texts = [c["value"] for f in (jsonl, jsonl2) for line in open(f) for c in json.loads(line)["conversations"]]
    (root / "tokenizer").mkdir()
    train_tokenizer(texts + [chat_prompt("")], 350).save(root / "tokenizer")
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=2)
    SigLIP2Encoder(cfg, ImageProcessing((32, 32), (0.5,) * 3, (0.5,) * 3, resample=2)).save_pretrained(root / "encoder")
    return dict(data=str(jsonl), wds=str(paths["wds"]), data2=str(jsonl2), tokenizer=str(root / "tokenizer"),
                encoder=str(root / "encoder"))


def command(assets, out, stage="1", steps=6, *extra):
    args = ["--stage", stage, "--out", str(out), "--steps", str(steps), "--encoder",
            assets["encoder"], "--batch-size", "8", "--seq-len", str(SEQ_LEN), "--log-every", "1"]
    args += ["--data", {"1": assets["data"], "2": assets["data2"], "decoder": assets["wds"]}[stage]]
    if stage == "1":
        args += ["--llm", "tiny", "--dit", "tiny", "--tokenizer", assets["tokenizer"]]
    if stage == "decoder":
        args += ["--decoder", "tiny"]
    return [sys.executable, "-c", RUNNER, *args, *map(str, extra)]


def environment(devices=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES", "XLA_FLAGS")}
    if devices:
        env.update(XLA_ENV, CPU_NUM_DEVICES=str(devices))
    else:  # one thread: tiny matmuls gain nothing from two, and spinning OpenMP threads crawl on a busy machine
        env.update(OMP_NUM_THREADS="1")
    return env


def start(assets, out, stage="1", steps=6, *extra, devices=None):
    """Start train_tpu.py: through torch_xla SPMD on `devices` CPU devices, else plain PyTorch."""
    cmd = command(assets, out, stage, steps, "--backend", "xla" if devices else "torch", *extra)
    return subprocess.Popen(cmd, cwd=ROOT, env=environment(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc, check=True):
    stdout, stderr = proc.communicate(timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"train_tpu.py failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def train(*args, check=True, **kwargs):
    return finish(start(*args, **kwargs), check)


def losses(out, key="loss"):
    """{step: value} from log.jsonl; a step logged twice (before a crash and after the resume) keeps its last value."""
    return {r["step"]: r[key] for r in map(json.loads, open(Path(out) / "log.jsonl"))}


def mean(values):
    values = list(values)
    return sum(values) / len(values)


# ---- plain PyTorch ----------------------------------------------------------------------------------------------

FAST = ("--no-grad-ckpt",)  # long runs keep their activations; the kill test and the SPMD runs recompute them

@pytest.fixture(scope="module")
def stage1(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "stage1"
    train(assets, out, "1", 200, *FAST, "--lr", "3e-3", "--save-every", "100")
    return out


def test_stage1_overfits_and_exports(stage1):
    ce, diff = losses(stage1, "ce"), losses(stage1, "diff")
    assert mean(ce[s] for s in range(181, 201)) < 0.1 * mean(ce[s] for s in range(1, 21))
    # The DiT's rectified-flow loss has an irreducible noise part; memorizing 8 latents still lowers it clearly.
    assert mean(diff[s] for s in range(151, 201)) < 0.7 * mean(diff[s] for s in range(1, 51))
    from model import ScaleRAE
    model = ScaleRAE.from_pretrained(stage1 / "export")
    assert model.config.vocab_size == len(Tokenizer.from_dir(stage1 / "export"))
    assert sorted(p.name for p in stage1.glob("ckpt-*")) == ["ckpt-100", "ckpt-200"]


def test_stage2_overfits_new_images_from_the_stage1_export(assets, stage1, tmp_path):
    """With the official K-tiling on (2 timesteps per image), as toy.py trains."""
    train(assets, tmp_path / "stage2", "2", 100, *FAST, "--init", stage1 / "export", "--lr", "3e-3",
          "--diffusion-timesteps-per-sample", 2)
    loss = losses(tmp_path / "stage2")
    assert mean(loss[s] for s in range(81, 101)) < 0.7 * mean(loss[s] for s in range(1, 21))


def test_stage2_refuses_an_encoder_its_model_was_not_trained_on(assets, stage1, tmp_path):
    cfg = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=2)
    SigLIP2Encoder(cfg, ImageProcessing((32, 32), (0.5,) * 3, (0.5,) * 3)).save_pretrained(tmp_path / "encoder16")
    run = train(dict(assets, encoder=str(tmp_path / "encoder16")), tmp_path / "stage2", "2", 10, "--init",
                stage1 / "export", check=False)
    assert run.returncode == 2 and "256 tokens of 16 channels" in run.stderr and "256 of 32" in run.stderr, run.stderr
    assert not (tmp_path / "stage2").exists()  # refused before the run folder is made (a fixed rerun is not blocked)


def test_bad_k_tiling_is_refused_before_any_work(assets, tmp_path):
    run = train(assets, tmp_path / "run", "1", 10, "--diffusion-timesteps-per-sample", 0, check=False)
    assert run.returncode == 2 and "--diffusion-timesteps-per-sample must be >= 1, got 0" in run.stderr, run.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def decoder(assets, tmp_path_factory):  # reads the WebDataset tars
    out = tmp_path_factory.mktemp("runs") / "decoder"
    train(assets, out, "decoder", 150, *FAST, "--lr", "2e-3")
    return out


def test_decoder_stage_reduces_reconstruction_error(decoder):
    l1, mse = losses(decoder, "l1"), losses(decoder, "mse")
    assert mean(l1[s] for s in range(131, 151)) < 0.7 * mean(l1[s] for s in range(1, 21))
    assert mean(mse[s] for s in range(131, 151)) < 0.7 * mean(mse[s] for s in range(1, 21))
    from rae import load_decoder
    model = load_decoder(decoder / "export", 32, (0.5,) * 3, (0.5,) * 3)
    assert model(torch.zeros(1, 256, 32)).shape == (1, 3, 32, 32)


def test_exports_sample_an_image_with_sample_py(assets, stage1, decoder, tmp_path):
    """The stage-1 export and a decoder-stage export, as a user would pass them to sample.py: a training prompt
    (the model overfits them) gives an image, a latent and a manifest."""
    record = next(r for r in map(json.loads, open(assets["data"])) if r["metadata"]["task"] == "generation")
    prompt = record["conversations"][0]["value"]
    p = subprocess.run([sys.executable, "sample.py", "--model-path", str(stage1 / "export"), "--decoder-repo",
                        str(decoder / "export"), "--prompt", prompt, "--steps", "2", "--save-latent",
                        "--output-dir", str(tmp_path / "out")], cwd=ROOT, env=environment(), capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    [manifest] = (tmp_path / "out").glob("*manifest*.json")
    m = json.loads(manifest.read_text())
    assert len(m["images"]) == 1 and len(m["latents"]) == 1, m


def test_killed_run_resumes_to_the_same_losses(assets, tmp_path):
    """The reference keeps its activations (--no-grad-ckpt): recomputing them must not change a thing either."""
    train(assets, tmp_path / "reference", "1", 20, "--save-every", "5", "--keep", "2", "--no-grad-ckpt")
    out = tmp_path / "killed"
    proc = start(assets, out, "1", 20, "--save-every", "5", "--keep", "2")
    deadline = time.time() + 300
    while not (out / "ckpt-10").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # wherever it is: between steps, or in the middle of writing a checkpoint
    finish(proc, check=False)
    assert not (out / "export").exists(), "the run finished before it could be killed"
    run = train(assets, out, "1", 20, "--save-every", "5", "--keep", "2", "--resume")
    assert int(run.stdout.split("resumed from")[1].split("at step ")[1].split()[0]) >= 10
    ref, got = losses(tmp_path / "reference"), losses(out)
    assert set(got) == set(range(1, 21))
    for step in range(1, 21):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    assert sorted(p.name for p in out.iterdir() if "ckpt" in p.name) == ["ckpt-15", "ckpt-20"]  # the last --keep


def test_existing_run_is_never_overwritten(assets, stage1):
    run = train(assets, stage1, "1", 200, *FAST, "--lr", "3e-3", "--save-every", "100", check=False)
    assert run.returncode != 0 and "--resume" in run.stderr
    run = train(assets, stage1, "1", 200, *FAST, "--lr", "1e-3", "--save-every", "100", "--resume", check=False)
    assert run.returncode != 0 and "other arguments" in run.stderr
    run = train(assets, stage1, "1", 200, *FAST, "--lr", "3e-3", "--save-every", "100", "--resume")
    assert "nothing to do" in run.stdout


def test_divergence_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "nan"
    run = train(assets, out, "1", 12, "--lr", "1e30", "--save-every", "2", check=False)
    assert run.returncode != 0 and "non-finite" in run.stderr
    kept = sorted(out.glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
    assert kept and not (out / "export").exists()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(kept[-1], tmp_path / "last.pt")
    weights = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


# ---- torch_xla SPMD on CPU devices ------------------------------------------------------------------------------

class Background:
    """Runs started now and waited for when a test needs them: XLA compiles on one core while the plain-PyTorch
    tests use the other."""

    def __init__(self, root, procs):
        self.root, self.procs, self.done = root, procs, False

    def wait(self):
        if not self.done:
            for proc in self.procs:
                finish(proc)
            self.done = True
        return self.root


@pytest.fixture(scope="module", autouse=True)
def spmd(assets, tmp_path_factory):
    """The same 6 steps on 8 devices (FSDP-sharded parameters, batch over 8) and on 1 device, checkpoints at 3 and
    6, and a step of the decoder stage; started before the first test of this file."""
    if not HAS_XLA:
        yield None
        return
    root = tmp_path_factory.mktemp("spmd")
    runs = Background(root, [start(assets, root / f"devices{n}", "1", 6, "--save-every", "3", devices=n)
                             for n in (8, 1)] + [start(assets, root / "decoder", "decoder", 1, devices=8)])
    yield runs
    for proc in runs.procs:
        proc.kill()


@pytest.fixture(scope="module")
def spmd_more(assets, spmd):
    """From the 8-device run, at once: a resume after its last checkpoint is cut short (as by a crash during a save
    or a bad copy), and stage 2 from its export."""
    root = spmd.wait()
    out = root / "resumed"
    shutil.copytree(root / "devices8", out)
    shutil.rmtree(out / "export")
    shard = next((out / "ckpt-6").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    runs = [start(assets, out, "1", 6, "--save-every", "3", "--resume", devices=8),
            start(assets, root / "stage2", "2", 1, "--init", root / "devices8" / "export", devices=8)]
    return root, [finish(run) for run in runs]


@needs_xla
def test_sharded_step_equals_single_device_and_compiles_once(spmd):
    root = spmd.wait()
    for key in ("loss", "ce", "diff", "grad_norm"):
        sharded, single = losses(root / "devices8", key), losses(root / "devices1", key)
        assert set(sharded) == set(single) == set(range(1, 7))
        for step in range(1, 7):
            assert abs(sharded[step] - single[step]) <= 1e-5 * max(1.0, abs(single[step])), (step, key)
    compiles = losses(root / "devices8", "compiles")
    assert compiles[2] == compiles[6], compiles  # step 1 has its own graph, then one (checkpointing included)


@needs_xla
def test_truncated_checkpoint_is_skipped_and_resume_is_exact(spmd_more):
    root, (run, _) = spmd_more
    assert "skipping checkpoint" in run.stdout and "ckpt-6" in run.stdout
    assert "resumed from" in run.stdout and "at step 3" in run.stdout
    ref, got = losses(root / "devices8"), losses(root / "resumed")
    for step in (4, 5, 6):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    from model import ScaleRAE
    ScaleRAE.from_pretrained(root / "resumed" / "export")


@needs_xla
def test_stage2_and_decoder_run_on_spmd(spmd_more):
    root, _ = spmd_more
    assert list(losses(root / "stage2")) == list(losses(root / "decoder")) == [1]
    assert (root / "stage2" / "export" / "model.safetensors").is_file()
    assert (root / "decoder" / "export" / "model.pt").is_file()
