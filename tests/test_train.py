"""train_tpu.py end to end, as a user runs it (a subprocess per training run), on tiny models, offline, on the CPU.

Plain PyTorch: stage 1 and stage 2 overfit a tiny synthetic set, the decoder stage lowers the reconstruction
error, the exports load back, a preempted run (SIGTERM) saves its step and resumes to an uninterrupted run's losses,
a diverging run stops and leaves its last good checkpoint intact. Runs refused before any training run in this
interpreter.
torch_xla SPMD (PJRT_DEVICE=CPU, 8 virtual devices; skipped without torch_xla): the sharded run gives the same
losses as the single-device one, the step compiles once, a truncated checkpoint is skipped for the previous one,
and stage 2 and the decoder stage run too. torchrun (FSDP2 over gloo): 2 processes train as 1 does, and a run
resumes in another number of processes. These runs start with the test session, in the background
(conftest.background, start_background below), and the tests at the end of this file wait for them.
"""

import contextlib
import importlib.util
import io
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_shapes
from shapes import save_siglip, train_tokenizer, write_shapes_dataset
from encoders import ImageProcessing, SigLIP2Encoder, SiglipVisionConfig
from tokenizer import Tokenizer, chat_prompt

ROOT = Path(__file__).resolve().parents[1]
HAS_XLA = importlib.util.find_spec("torch_xla") is not None
needs_xla = pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed (the SPMD tests use its CPU runtime)")
SEQ_LEN = 160  # the longest tiny sample: 64 image slots + ~87 text tokens

# Tiny sizes, registered before train_tpu.py runs (setdefault: presets of the same name in the repo win).
RUNNER = """
import os, runpy, sys, time
import checkpoint, dit, model, rae
if "WRITER_DELAY" in os.environ:  # the checkpoint writer starts late (a slow disk): the next steps run meanwhile
    save = checkpoint.dcp.save
    checkpoint.dcp.save = lambda *a, **k: time.sleep(float(os.environ["WRITER_DELAY"])) or save(*a, **k)
model.QWEN_PRESETS.setdefault("tiny", model.QwenConfig(vocab_size=350, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0))
dit.DIT_PRESETS.setdefault("tiny", dit.DiTConfig(hidden_size=32, depth=1, num_heads=2, in_channels=32, z_channels=32))
rae.DECODER_PRESETS.setdefault("tiny", rae.DecoderConfig(32, 1, 2, 64, patch_size=4, image_size=32))
sys.argv = ["train_tpu.py"] + sys.argv[1:]
runpy.run_path("train_tpu.py", run_name="__main__")
"""
# LLVM's optimization passes dominate XLA's CPU compile time; without them a tiny step compiles ~5x faster. The
# MLIR fusion emitters take a third of what is left (a tiny 8-device run: 42 -> 28 CPU seconds without them).
XLA_ENV = dict(PJRT_DEVICE="CPU", XLA_FLAGS="--xla_backend_optimization_level=0 "
               "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false")


def make_assets(root):
    """8 synthetic samples (32 px, generation and understanding mixed; JSONL for stage 1, WebDataset tars for the
    decoder), 8 other generation samples for stage 2, a BPE tokenizer trained on them, and a frozen random tiny
    SigLIP encoder (32 px in patches of 4 -> 8 x 8 = 64 tokens of 32 channels, the toy model's grid)."""
    paths = write_shapes(root / "shapes", 8, seed=0, image_size=32, samples_per_tar=4)
    jsonl = paths["jsonl"]
    jsonl2 = write_shapes_dataset(root / "shapes2", 8, seed=1, image_size=32, understanding_fraction=0.0)
    texts = [c["value"] for f in (jsonl, jsonl2) for line in open(f) for c in json.loads(line)["conversations"]]
    (root / "tokenizer").mkdir()
    train_tokenizer(texts + [chat_prompt("")], 350).save(root / "tokenizer")
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=4)
    save_siglip(SigLIP2Encoder(cfg, ImageProcessing((32, 32), (0.5,) * 3, (0.5,) * 3, resample=2)), root / "encoder")
    return dict(data=str(jsonl), wds=str(paths["wds"]), data2=str(jsonl2), tokenizer=str(root / "tokenizer"),
                encoder=str(root / "encoder"))


@pytest.fixture(scope="module")
def assets(background, tmp_path_factory):
    """The assets of the background runs when they were started (which from now on use a second thread), else new
    ones (read-only for every test)."""
    runs = background.get(__name__)
    if runs is None:
        return make_assets(tmp_path_factory.mktemp("assets"))
    runs.add_worker()
    return runs.assets


def arguments(assets, out, stage="1", steps=6, *extra):
    args = ["--stage", stage, "--out", str(out), "--steps", str(steps), "--encoder",
            assets["encoder"], "--batch-size", "8", "--seq-len", str(SEQ_LEN), "--log-every", "1"]
    args += ["--data", {"1": assets["data"], "2": assets["data2"], "decoder": assets["wds"]}[stage]]
    if stage == "1":
        args += ["--llm", "tiny", "--dit", "tiny", "--tokenizer", assets["tokenizer"]]
    if stage == "decoder":
        args += ["--decoder", "tiny"]
    return [*args, *map(str, extra)]


def command(*args):
    return [sys.executable, "-c", RUNNER, *arguments(*args)]


def environment(devices=None, hlo=None):
    """hlo: a folder where XLA writes the compiled graphs, as text."""
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES", "XLA_FLAGS")}
    if devices:
        env.update(XLA_ENV, CPU_NUM_DEVICES=str(devices))
        env["XLA_FLAGS"] += f" --xla_dump_to={hlo} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE" if hlo else ""
    else:  # one thread: tiny matmuls gain nothing from two, and spinning OpenMP threads crawl on a busy machine
        env.update(OMP_NUM_THREADS="1")
    return env


def start(assets, out, stage="1", steps=6, *extra, devices=None, processes=None, nice=0, hlo=None, writer_delay=None):
    """Start train_tpu.py: through torch_xla SPMD on `devices` CPU devices, or under torchrun in `processes` processes
    (FSDP2 over gloo), else plain PyTorch; `nice` lowers its CPU priority (a background run)."""
    cmd = command(assets, out, stage, steps, "--backend", "xla" if devices else "torch", *extra)
    if processes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "--no-python", *cmd]
    env = environment(devices, hlo) | ({"WRITER_DELAY": str(writer_delay)} if writer_delay else {})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if nice:  # at once, while it starts: the threads it makes later inherit it (no preexec_fn: threads run here)
        os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
    return proc


def finish(proc, check=True):
    stdout, stderr = proc.communicate(timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"train_tpu.py failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def train(*args, check=True, **kwargs):
    return finish(start(*args, **kwargs), check)


def refused(*args):
    """train_tpu.py in this interpreter, for a run that stops before it trains (no interpreter start-up):
    what a subprocess would give (return code; stdout; stderr, with the message of a SystemExit)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["train_tpu.py", "--backend", "torch", *arguments(*args)]  # a later flag wins
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(str(ROOT / "train_tpu.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        torch.set_default_device(None)  # --plan builds its model on the meta device, by setting the default
    if isinstance(code, str):
        stderr.write(code + "\n")
    returncode = 0 if code is None else code if isinstance(code, int) else 1
    return subprocess.CompletedProcess(args, returncode, stdout.getvalue(), stderr.getvalue())


def losses(out, key="loss"):
    """{step: value} from log.jsonl; a step logged twice (before a crash and after the resume) keeps its last value."""
    return {r["step"]: r[key] for r in map(json.loads, open(Path(out) / "log.jsonl"))}


def mean(values):
    values = list(values)
    return sum(values) / len(values)


# ---- plain PyTorch ----------------------------------------------------------------------------------------------

FAST = ("--no-grad-ckpt",)  # long runs keep their activations; the kill test and the SPMD runs recompute them
# 80 steps: the LLM at 1e-2, the DiT at 3e-2, 4 timesteps per image (K-tiling: 4 DiT passes per LLM pass, for a
# DiT that learns in few steps and a less noisy loss). Measured: CE 4.7 -> 0.08, diffusion 1.65 -> 0.89.
STAGE1 = (*FAST, "--lr", "1e-2", "--diff-head-lr-scale", "3", "--diffusion-timesteps-per-sample", "4",
          "--save-every", "40")


@pytest.fixture(scope="module")
def stage1(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "stage1"
    train(assets, out, "1", 80, *STAGE1)
    return out


def test_stage1_overfits_and_exports(stage1):
    ce, diff = losses(stage1, "ce"), losses(stage1, "diff")
    assert mean(ce[s] for s in range(73, 81)) < 0.1 * mean(ce[s] for s in range(1, 9))
    # The DiT's rectified-flow loss has an irreducible noise part; memorizing 8 latents still lowers it clearly.
    assert mean(diff[s] for s in range(61, 81)) < 0.7 * mean(diff[s] for s in range(1, 21))
    from model import ScaleRAE
    model = ScaleRAE.from_pretrained(stage1 / "export")
    assert model.config.vocab_size == len(Tokenizer.from_dir(stage1 / "export"))
    assert sorted(p.name for p in stage1.glob("ckpt-*")) == ["ckpt-40", "ckpt-80"]


def test_stage2_overfits_new_images_from_the_stage1_export(assets, stage1, tmp_path):
    """With the official K-tiling on (2 timesteps per image), as toy.py trains."""
    train(assets, tmp_path / "stage2", "2", 50, *FAST, "--init", stage1 / "export", "--lr", "3e-3",
          "--diffusion-timesteps-per-sample", 2)
    loss = losses(tmp_path / "stage2")  # measured: 4.45 -> 2.21
    assert mean(loss[s] for s in range(41, 51)) < 0.7 * mean(loss[s] for s in range(1, 11))


def test_stage2_refuses_an_encoder_its_model_was_not_trained_on(assets, stage1, tmp_path):
    cfg = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=4)
    save_siglip(SigLIP2Encoder(cfg, ImageProcessing((32, 32), (0.5,) * 3, (0.5,) * 3)), tmp_path / "encoder16")
    run = refused(dict(assets, encoder=str(tmp_path / "encoder16")), tmp_path / "stage2", "2", 10, "--init",
                  stage1 / "export")
    assert run.returncode == 2 and "64 tokens of 16 channels" in run.stderr and "64 of 32" in run.stderr, run.stderr
    assert not (tmp_path / "stage2").exists()  # refused before the run folder is made (a fixed rerun is not blocked)


def test_memory_is_planned_and_a_run_that_cannot_fit_is_refused(assets, tmp_path):
    """--plan prints the memory per chip of a run on a slice and exits; a run whose estimate exceeds the memory of its
    device (here the CPU's RAM) is refused before the run folder is made. (The repository's toy presets: this
    interpreter has no "tiny" ones.)"""
    toy = ("--llm", "toy", "--dit", "toy")
    run = refused(assets, tmp_path / "run", "1", 10, *toy, "--plan", "v6e-64", "--batch-size", 2048)
    assert run.returncode == 0 and "per chip at 32 samples" in run.stdout and "of 29.8 GiB (v6e)" in run.stdout, run
    run = refused(assets, tmp_path / "run", "1", 10, *toy, "--plan", "4xH100", "--data-parallel", 2)
    parts = dict(p.rsplit(" ", 1) for p in run.stdout.split("on paper: ")[1].split(" = ")[0].split(" + "))
    trained = float(run.stdout.split("stage 1: ")[1].split("M trainable")[0]) * 1e6
    assert float(parts["adamw"]) * 2 ** 30 == pytest.approx(8 * trained / 2, rel=0.02)  # sharded over fsdp = 2
    run = refused(assets, tmp_path / "run", "1", 10, *toy, "--batch-size", 2 ** 22)
    assert run.returncode != 0 and "GiB per chip, more than its" in run.stderr, run.stderr
    assert not (tmp_path / "run").exists()
    run = refused(assets, tmp_path / "run", "1", 10, "--plan", "v9-8")
    assert run.returncode == 2 and "--plan v9-8: name a slice of known chips" in run.stderr


def test_bad_k_tiling_is_refused_before_any_work(assets, tmp_path):
    run = refused(assets, tmp_path / "run", "1", 10, "--diffusion-timesteps-per-sample", 0)
    assert run.returncode == 2 and "--diffusion-timesteps-per-sample: must be >= 1, got 0" in run.stderr, run.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def decoder(assets, tmp_path_factory):  # reads the WebDataset tars
    out = tmp_path_factory.mktemp("runs") / "decoder"
    train(assets, out, "decoder", 60, *FAST, "--lr", "2e-3")
    return out


def test_decoder_stage_reduces_reconstruction_error(decoder):
    l1, mse = losses(decoder, "l1"), losses(decoder, "mse")
    assert mean(l1[s] for s in range(53, 61)) < 0.7 * mean(l1[s] for s in range(1, 9))  # measured: 0.19 x
    assert mean(mse[s] for s in range(53, 61)) < 0.7 * mean(mse[s] for s in range(1, 9))  # 0.12 x
    from rae import load_decoder
    model = load_decoder(decoder / "export", (0.5,) * 3, (0.5,) * 3)
    assert model(torch.zeros(1, 64, 32)).shape == (1, 3, 32, 32)


def test_exports_sample_an_image_with_sample_py(assets, stage1, decoder, tmp_path):
    """The stage-1 export and a decoder-stage export, as a user would pass them to sample.py: a training prompt
    (the model overfits them) gives an image, a latent and a manifest."""
    record = next(r for r in map(json.loads, open(assets["data"])) if r["metadata"]["task"] == "generation")
    prompt = record["conversations"][0]["value"]
    import sample
    sample.main(["--model-path", str(stage1 / "export"), "--decoder-repo", str(decoder / "export"), "--prompt", prompt,
                 "--steps", "2", "--save-latent", "--output-dir", str(tmp_path / "out")])
    [manifest] = (tmp_path / "out").glob("*manifest*.json")
    m = json.loads(manifest.read_text())
    assert len(m["images"]) == 1 and len(m["latents"]) == 1, m


def test_preempted_run_saves_its_step_and_resumes_to_the_same_losses(assets, tmp_path):
    """SIGTERM (a preemption notice) once ckpt-6 is written: the run ends its step, saves it and exits with 143. The
    resume removes a save that a crash interrupted (no manifest) and matches the uninterrupted reference, which keeps
    its activations (--no-grad-ckpt: recomputing them must not change a thing) while the resume decodes in 2 worker
    processes. (A resume from an older checkpoint, as after a hard crash: test_train_safety.py.)"""
    reference = start(assets, tmp_path / "reference", "1", 9, "--save-every", "3", "--keep", "2", "--no-grad-ckpt")
    out = tmp_path / "preempted"
    proc = start(assets, out, "1", 9, "--save-every", "3", "--keep", "2")
    deadline = time.time() + 300
    while not (out / "ckpt-6" / "manifest.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stopped = finish(proc, check=False)
    step = int(stopped.stdout.split("SIGTERM: stopped at step ")[1].split(",")[0])
    assert stopped.returncode == 143 and 6 <= step <= 9 and (out / f"ckpt-{step}" / "manifest.json").exists()
    assert not (out / "export").exists()
    finish(reference)
    shutil.copytree(out / f"ckpt-{step}", out / "ckpt-10")  # as a save that a crash interrupts: no manifest yet
    (out / "ckpt-10" / "manifest.json").unlink()
    shutil.copytree(out / "ckpt-6", out / "ckpt-6.bak")  # the user's copy: not the run's to use or remove
    run = train(assets, out, "1", 9, "--save-every", "3", "--keep", "2", "--resume", "--data-workers", "2")
    assert f"resumed from {out / f'ckpt-{step}'} at step {step}" in run.stdout
    ref, got = losses(tmp_path / "reference"), losses(out)
    assert set(got) == set(range(1, 10))
    for s in range(1, 10):
        assert abs(got[s] - ref[s]) <= 1e-5, (s, got[s], ref[s])
    kept = {f"ckpt-{step if step < 9 else 6}", "ckpt-9", "ckpt-6.bak"}  # the last --keep, and the user's copy
    assert {p.name for p in out.iterdir() if "ckpt" in p.name} == kept


def test_existing_run_is_never_overwritten(assets, stage1):
    run = refused(assets, stage1, "1", 80, *STAGE1)
    assert run.returncode != 0 and "--resume" in run.stderr
    run = refused(assets, stage1, "1", 80, *STAGE1, "--lr", "1e-3", "--resume")  # the last --lr wins
    assert run.returncode != 0 and "other arguments" in run.stderr
    run = refused(assets, stage1, "1", 80, *STAGE1, "--resume")
    assert run.returncode == 0 and "nothing to do" in run.stdout


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
    """Runs queued for background threads, at a lower CPU priority, each after the run it needs: they use the core
    that the tests, which run one at a time and mostly on one core, leave idle. One thread starts with the session,
    a second one when this file's tests begin (add_worker). wait() returns their results or raises their first
    error."""

    def __init__(self, root, assets):
        self.root, self.assets, self.results, self.errors, self.procs = root, assets, {}, [], []
        self.queue, self.done, self.workers = [], {}, 0
        self.lock, self.stopped = threading.Lock(), False

    def add(self, name, job, after=None):
        self.queue.append((name, job, after))
        self.done[name] = threading.Event()

    def add_worker(self):
        def work():
            while True:
                with self.lock:
                    if not self.queue or self.stopped:
                        return
                    name, job, after = self.queue.pop(0)
                try:
                    if after:
                        self.done[after].wait()
                    self.results[name] = job()
                except BaseException as e:  # raised again by wait(), in the test that needs the results
                    self.errors.append(e)
                finally:
                    self.done[name].set()
        with self.lock:
            if self.queue and self.workers < 2:
                self.workers += 1
                threading.Thread(target=work, daemon=True).start()

    def train(self, *args, **kwargs):
        with self.lock:
            if self.stopped:
                raise RuntimeError("the test session is over")
            proc = start(*args, nice=10, **kwargs)
            self.procs.append(proc)
        return finish(proc)

    def wait(self):
        for done in self.done.values():
            done.wait()
        if self.errors:
            raise self.errors[0]
        return self.root, self.results

    def stop(self):
        with self.lock:
            self.stopped = True
            for proc in self.procs:
                proc.kill()
        for name, _, _ in self.queue:  # never started: wait() must not block on them
            self.done[name].set()


def start_background(tmp_path_factory, selected):
    """Called by conftest.background when a test of this file is selected: the assets, then (with torch_xla, when an
    SPMD test is selected) the SPMD runs:
    1. 4 steps on 8 devices (FSDP-sharded parameters, batch over 8), checkpoints at 2 and 4 (each written 2 s late,
       while the next steps update the weights and AdamW's step counts), compiled graphs dumped;
    2. the same 4 steps on 1 device;
    3. from 1, a resume of a copy whose last checkpoint is cut short (as by a crash during a save or a bad copy),
       its images decoded in 2 worker processes;
    4. from 2, a step of stage 2 from its export, in bfloat16; 5. a step of the decoder stage.
    When the torchrun test is selected: 4 steps in 1 process, resumed in 2 from step 2 (its step 3 corrupted), and in 1
    from their step 3."""
    root = tmp_path_factory.mktemp("spmd")
    runs = Background(root, make_assets(tmp_path_factory.mktemp("assets")))
    assets, wanted = runs.assets, {name for item in selected for name in getattr(item, "fixturenames", ())}

    def unfinished(src, dst):  # a copy of a finished run without its export, to resume
        shutil.copytree(root / src, root / dst)
        shutil.rmtree(root / dst / "export")
        return root / dst

    def preempted(src, dst, step):  # as a preemption after checkpoint `step` leaves it
        for ckpt in unfinished(src, dst).glob("ckpt-*"):
            if int(ckpt.name.split("-")[1]) > step:
                shutil.rmtree(ckpt)
        if dst == "fsdp2":  # corrupted, in a file that the second process hashes: both must skip the checkpoint
            name = sorted(json.loads((root / dst / f"ckpt-{step}" / "manifest.json").read_text())["files"])[1]
            with open(root / dst / f"ckpt-{step}" / name, "r+b") as f:
                f.seek(f.seek(0, 2) // 2)
                f.write(b"\0" * 16)
        return runs.train(assets, root / dst, "1", 4, *TORCHRUN, "--resume", processes=2 if dst == "fsdp2" else None)

    def resume():
        out = unfinished("devices8", "resumed")
        shard = next((out / "ckpt-4").glob("*.distcp"))
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        return runs.train(assets, out, "1", 4, "--save-every", "2", "--resume", "--data-workers", "2", devices=8)

    if HAS_XLA and "spmd" in wanted:
        runs.add("devices8", lambda: runs.train(assets, root / "devices8", "1", 4, "--save-every", "2", devices=8,
                                                hlo=root / "hlo", writer_delay=2))
        runs.add("devices1", lambda: runs.train(assets, root / "devices1", "1", 4, "--save-every", "2", devices=1))
        runs.add("resumed", resume, after="devices8")
        runs.add("stage2", lambda: runs.train(assets, root / "stage2", "2", 1, "--init", root / "devices1" / "export",
                                              "--precision", "bf16", devices=8), after="devices1")
        runs.add("decoder", lambda: runs.train(assets, root / "decoder", "decoder", 1, devices=8))
    if "fsdp2" in wanted:  # 1 process, then torchrun's 2 from its step 2, then 1 again from their step 3
        runs.add("one", lambda: runs.train(assets, root / "one", "1", 4, *TORCHRUN))
        runs.add("fsdp2", lambda: preempted("one", "fsdp2", 3), after="one")
        runs.add("back", lambda: preempted("fsdp2", "back", 3), after="fsdp2")
    runs.add_worker()
    return runs


@pytest.fixture(scope="module")
def spmd(background):
    runs = background[__name__]
    runs.add_worker()  # for the runs still queued, if this file's other tests were not selected
    return runs


def same_weights(a, b):  # the same names and shapes, and values to float rounding (the runs' are within 4e-8)
    return a.keys() == b.keys() and all(v.shape == b[k].shape and torch.allclose(v, b[k], rtol=0, atol=1e-6)
                                        for k, v in a.items())


fsdp2 = spmd  # the torchrun runs, in the same queue
TORCHRUN = ("--vision-coef", 0, "--save-every", 1)  # the loss without diffusion noise: each process draws its own


@needs_xla
def test_sharded_step_equals_single_device_and_compiles_once(spmd):
    """The same losses, one graph per step kind, no tensor the partitioner must gather in full (involuntary
    rematerialization: block outputs are constrained to the batch axes), and the LM head gathered once per step."""
    root, runs = spmd.wait()
    assert "Involuntary full rematerialization" not in runs["devices8"].stderr
    for key in ("loss", "ce", "diff", "grad_norm"):
        sharded, single = losses(root / "devices8", key), losses(root / "devices1", key)
        assert set(sharded) == set(single) == set(range(1, 5))
        for step in range(1, 5):
            assert abs(sharded[step] - single[step]) <= 1e-5 * max(1.0, abs(single[step])), (step, key)
    compiles = losses(root / "devices8", "compiles")
    assert compiles[2] == compiles[4], compiles  # step 1 has its own graph, then one (checkpointing included)
    # The LM head (352 rows padded to 2048, sharded on them) is gathered whole once per step for the chunked CE, not
    # in parts, or transposed, for each chunk. The step graph is the largest compiled module.
    step = max((root / "hlo").glob("*after_optimizations.txt"), key=lambda p: p.stat().st_size).read_text()
    gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", step)
    assert [s for s in gathered if {"2048", "1024", "352", "350"} & set(s.split(","))] == ["2048,32"], gathered
    # Its export, gathered from 8 devices a tensor at a time (the padding rows cut), has the 1-device run's weights
    exports = [load_file(root / run / "export" / "model.safetensors") for run in ("devices8", "devices1")]
    assert same_weights(*exports)


@needs_xla
def test_truncated_checkpoint_is_skipped_and_resume_is_exact(spmd):
    root, runs = spmd.wait()
    run = runs["resumed"]
    assert "skipping checkpoint" in run.stdout and "ckpt-4" in run.stdout
    assert "resumed from" in run.stdout and "at step 2" in run.stdout
    ref, got = losses(root / "devices8"), losses(root / "resumed")
    for step in (3, 4):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    from model import ScaleRAE
    ScaleRAE.from_pretrained(root / "resumed" / "export")


@needs_xla
def test_stage2_and_decoder_run_on_spmd(spmd):
    root, runs = spmd.wait()
    assert ", bf16; per chip" in runs["stage2"].stdout and ", fp32; per chip" in runs["decoder"].stdout
    assert list(losses(root / "stage2")) == list(losses(root / "decoder")) == [1]
    assert (root / "stage2" / "export" / "model.safetensors").is_file()
    assert (root / "decoder" / "export" / "model.pt").is_file()


def test_torchrun_processes_train_as_one_and_resume_on_another_count(fsdp2):
    """FSDP2 under torchrun (gloo): a run in 1 process, its checkpoint at step 2 resumed in 2 processes (its step 3 is
    corrupted in a file the second process checks: both skip it), and theirs at step 3 in 1 process again. Each batch
    is the whole (8-sample) data set, so a step's samples do not depend on how the processes split them: the losses
    and gradient norms agree to float rounding."""
    root, runs = fsdp2.wait()
    assert "at step 2" in runs["fsdp2"].stdout and "at step 3" in runs["back"].stdout
    assert "skipping checkpoint" in runs["fsdp2"].stdout and "does not match its checksum" in runs["fsdp2"].stdout
    ckpt = root / "fsdp2" / "ckpt-4"  # hashed by the 2 processes, a share each: the manifest lists every file
    assert set(json.loads((ckpt / "manifest.json").read_text())["files"]) == {p.name for p in ckpt.iterdir()} - {
        "manifest.json"}
    for key in ("loss", "grad_norm"):
        ref = losses(root / "one", key)
        for name, steps in (("fsdp2", (3, 4)), ("back", (4,))):
            got = losses(root / name, key)
            for step in steps:
                assert abs(got[step] - ref[step]) <= 1e-5 * max(1.0, abs(ref[step])), (name, key, step)
    from model import ScaleRAE
    ScaleRAE.from_pretrained(root / "fsdp2" / "export")  # gathered from the 2 processes' shards, a tensor at a time
    assert same_weights(*(load_file(root / run / "export" / "model.safetensors") for run in ("fsdp2", "one")))
