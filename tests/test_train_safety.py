"""train_tpu.py refuses nonsense before it writes anything, never runs code from a checkpoint, detects corrupted
checkpoints and falls back to an intact one, and recovers from a killed export. Flag checks run the script
in-process (they end before any work); the checkpoint test trains 4 tiny steps and resumes once, in subprocesses."""

import hashlib
import json
import os
import pickle
import threading

import pytest
import torch

import checkpoint
from checkpoint import Checkpoints, sha256
from test_train import assets, losses, refused, train  # noqa: F401  (assets is a fixture)


@pytest.mark.parametrize("extra,message", [
    (["--keep", "-1"], "--keep: must be >= 1"),
    (["--keep", "0"], "--keep: must be >= 1"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--steps", "-5"], "--steps: must be >= 1"),
    (["--save-every", "0"], "--save-every: must be >= 1"),
    (["--log-every", "0"], "--log-every: must be >= 1"),
    (["--lr", "nan"], "--lr: must be >= 0"),
    (["--warmup-ratio", "2"], "--warmup-ratio: must be >= 0 and <= 1"),
    (["--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl not found"),
    (["--data", "{garbage}"], "its first record cannot be read"),
    (["--llm", "", "--init", "/nonexistent/qwen"], "/nonexistent/qwen"),
    (["--tokenizer", "/nonexistent/tokenizer"], "/nonexistent/tokenizer"),
    (["--data-parallel", "2"], "--data-parallel 2 must divide the 1 devices"),
])
def test_bad_arguments_are_refused_before_anything_is_written(assets, tmp_path, extra, message):
    if "{garbage}" in extra:
        (tmp_path / "bad.jsonl").write_text("{not json\n")
        extra = [str(tmp_path / "bad.jsonl") if a == "{garbage}" else a for a in extra]
    run = refused(assets, tmp_path / "run", "1", 6, *extra)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert not (tmp_path / "run").exists()  # so the same --out still starts once the typo is fixed


def test_checkpoints_never_run_code_and_corruption_falls_back_to_an_intact_one(assets, tmp_path):
    """4 steps with a checkpoint each, then: ckpt-4's host state becomes a same-size pickle that would run code (its
    checksum updated, so only weights_only stops it), ckpt-3's largest tensor file gets flipped bytes (same size),
    ckpt-2's .metadata is garbage (checksum updated: DCP raises a BaseException), a killed export left export.tmp.
    The resume skips all three with a reason, continues from ckpt-1 and exports; nothing ran."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    old = os.umask(0o022)
    try:
        train(assets, out, "1", 4, "--save-every", "1", "--no-grad-ckpt")
    finally:
        os.umask(old)
    assert os.stat(out / "export" / "model.safetensors").st_mode & 0o777 == 0o644  # the user's umask, not 0600
    first = losses(out)

    def resign(ckpt, name):  # what an attacker who can write the folder can do: keep the manifest consistent
        manifest = json.loads((ckpt / "manifest.json").read_text())
        path = ckpt / name
        manifest["files"][name] = [path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()]
        (ckpt / "manifest.json").write_text(json.dumps(manifest))

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    host = out / "ckpt-4" / "host0.pt"
    payload = pickle.dumps(Evil())
    host.write_bytes(payload + b" " * (host.stat().st_size - len(payload)))  # same size as the original
    resign(out / "ckpt-4", "host0.pt")
    largest = max((out / "ckpt-3").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    largest.write_bytes(bytes(data))
    (out / "ckpt-2" / ".metadata").write_bytes(b"garbage")
    resign(out / "ckpt-2", ".metadata")
    os.rename(out / "export", out / "export.tmp")  # a killed export

    p = train(assets, out, "1", 4, "--save-every", "1", "--no-grad-ckpt", "--resume")
    assert not marker.exists()
    assert "skipping checkpoint" in p.stdout and "ckpt-4: UnpicklingError" in p.stdout, p.stdout
    assert "ckpt-3" in p.stdout and "does not match its checksum" in p.stdout
    assert "ckpt-2: CheckpointException" in p.stdout and f"resumed from {out / 'ckpt-1'} at step 1" in p.stdout
    assert (out / "export" / "model.safetensors").is_file() and not (out / "export.tmp").exists()
    assert losses(out) == pytest.approx(first, rel=1e-5)  # the same steps again, from ckpt-1

    run = refused(assets, out, "1", 4, "--resume", "--backend", "xla")  # another backend: refused before any work
    assert run.returncode == 2 and "trained with --backend torch" in run.stderr, run.stderr


def test_a_save_is_written_in_the_background_from_a_copy_and_its_failure_is_raised(tmp_path, monkeypatch):
    """Checkpoints.save returns once the state is copied: the weights change meanwhile, yet the checkpoint holds them
    as they were; its manifest appears only when the writer is done. A failed write raises at the next wait() and
    leaves a folder without a manifest, which the next run removes."""
    release = threading.Event()
    monkeypatch.setattr(checkpoint, "sha256", lambda path: release.wait(30) and sha256(path))  # the writer stalls
    ckpts = Checkpoints(tmp_path, keep=2)
    model = torch.nn.Linear(4, 3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts.save(1, dict(model=model.state_dict()), host=dict(step=1, data=[5]))
    with torch.no_grad():
        model.weight.add_(1.0)  # the next step, while the checkpoint is written
    assert not (tmp_path / "ckpt-1" / "manifest.json").exists() and ckpts.list() == []
    release.set()
    ckpts.wait()
    assert ckpts.list() == [tmp_path / "ckpt-1"] and ckpts.check(tmp_path / "ckpt-1") is None
    state = dict(model=torch.nn.Linear(4, 3).state_dict())
    assert ckpts.load(tmp_path / "ckpt-1", state) == [dict(step=1, data=[5])]
    assert all(torch.equal(state["model"][k], v) for k, v in saved.items())

    def full_disk(path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "sha256", full_disk)
    ckpts.save(2, dict(model=model.state_dict()), host=dict(step=2, data=[6]))
    with pytest.raises(OSError, match="No space left"):
        ckpts.wait()
    assert ckpts.list() == [tmp_path / "ckpt-1"] and (tmp_path / "ckpt-2").is_dir()
    Checkpoints(tmp_path, keep=2).remove_interrupted()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1"]
