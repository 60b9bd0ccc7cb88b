"""The checkpoints of a training run (train_tpu.py): `ckpt-N/` folders of torch.distributed.checkpoint (DCP), written in
the background while training goes on, and checked before a resume reads them.

A save copies this process's shards of the model and the optimizer to host memory (the only pause of the training
loop), then a thread writes them, with the process's own state (step, data position, RNG) in `host{rank}.pt`, while
the next steps run; one save is in flight at a time. The folder is written in place and its `manifest.json` last,
with every file's size and SHA-256: an object-store mount (gcsfuse) makes no folder rename atomic, so a folder without
a manifest is a save that a crash interrupted. Each process hashes a share of the files, and checks a share on resume.
"""

import hashlib
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.utils._pytree import tree_map

from weights import write_atomic


def sha256(path):  # ~0.8 s per GB on one core
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_digests(folder, digests):
    """None if every file of `digests` {name: (size, sha256)} (a manifest's) is in `folder` with that size and
    checksum, else what is wrong with the first that is not."""
    for name, (size, digest) in digests.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if sha256(path) != digest:
            return f"{name} does not match its checksum (corrupted)"


class Checkpoints:
    def __init__(self, out, keep, xla=False):
        self.out, self.keep, self.xla = Path(out), keep, xla
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # The writer thread's collectives (DCP's plan, barriers, digests) run on a CPU group of their own, beside
        # the training's (NCCL under torchrun): every process calls new_group here, at the same point.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        cuda = torch.cuda.is_available() and not xla  # pinned host buffers, reused by every save
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                   use_async_staging=False, use_non_blocking_copy=cuda))
        self.save_planner = self.load_planner = lambda: None
        if xla:  # tensors sharded over this host's devices
            from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner, SPMDSavePlanner
            self.save_planner, self.load_planner = SPMDSavePlanner, SPMDLoadPlanner
        self.writer, self.pending = ThreadPoolExecutor(1), None

    def list(self, complete=True):
        """The run's ckpt-N folders, oldest first; complete: only those with their manifest."""
        found = [p for p in self.out.glob("ckpt-*") if re.fullmatch(r"ckpt-\d+", p.name) and p.is_dir()]
        found = [p for p in found if not complete or (p / "manifest.json").exists()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def remove_interrupted(self):  # at start: folders without a manifest
        if self.rank == 0:
            for stale in set(self.list(complete=False)) - set(self.list()):
                shutil.rmtree(stale)

    def save(self, step, state, host):
        """Checkpoint `step`: `state` (model and optimizer state dicts) is copied to host memory now and written in
        the background, with `host` (this process's step, data position, RNG: plain types and tensors)."""
        self.wait()
        path, error = self.out / f"ckpt-{step}", None
        if self.rank == 0:
            try:
                shutil.rmtree(path, ignore_errors=True)  # a broken checkpoint of this step, skipped when resuming
                path.mkdir()
            except OSError as e:
                error = e
        self.agree(error)  # the folder exists for every process
        if self.xla:  # the local shards of every device (torch_xla's own async checkpointing does the same)
            import torch_xla.core.xla_model as xm
            from torch_xla.experimental.distributed_checkpoint._helpers import _sharded_cpu_state_dict
            xm.wait_device_ops()  # the step that wrote them has run
            staged = _sharded_cpu_state_dict(state)  # it passes CPU tensors (AdamW's step counts) through: copied
            staged = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t,
                              staged)
        else:
            staged = self.stager.stage(state)
        self.pending = self.writer.submit(self._write, path, step, staged, host)

    def _write(self, path, step, state, host):
        # per_thread_copy_ahead=0: the data is in host memory already (and this thread's CUDA device would be GPU 0)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, per_thread_copy_ahead=0),
                 planner=self.save_planner(), process_group=self.group)
        torch.save(host, path / f"host{self.rank}.pt")
        self.barrier()
        names = sorted(f.name for f in path.iterdir())[self.rank::self.world]  # each process hashes a share (TBs)
        files = self.gathered({n: ((path / n).stat().st_size, sha256(path / n)) for n in names})
        if self.rank == 0:  # a file of another size or checksum than the manifest's: not a checkpoint
            manifest = dict(step=step, files=dict(sorted(files.items())))
            write_atomic(path / "manifest.json", json.dumps(manifest).encode())
            for old in self.list()[:-self.keep]:
                shutil.rmtree(old)
            print(f"saved {path}", flush=True)

    def wait(self):
        """The save in flight, finished on every process; the error of any that failed, raised by all of them."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.agree(pending.exception())

    def agree(self, error):  # collective: each process's error or None; raises on all of them if any failed
        others = [e for e in self.gathered({self.rank: error and f"{type(error).__name__}: {error}"}).values() if e]
        if error is not None:
            raise error
        if others:
            raise RuntimeError(f"a checkpoint save failed on another process: {others[0]}")

    def check(self, path):
        """None if every file has the size and checksum of the manifest, else what is wrong with the checkpoint. Each
        process checks a share of the files, and all of them learn the verdict."""
        try:
            files = sorted(json.loads((path / "manifest.json").read_text())["files"].items())
            problem = check_digests(path, dict(files[self.rank::self.world]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"no readable manifest ({type(e).__name__}: {e})"
        return next(filter(None, self.gathered({self.rank: problem}).values()), None)

    def load(self, path, state):
        """Read checkpoint `path` into `state` (DCP restores into its tensors, in place); the states of the hosts
        that saved it, in rank order (this run may have another number of them)."""
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=self.load_planner(),
                 process_group=self.group)
        n = len(list(path.glob("host*.pt")))
        return [torch.load(path / f"host{r}.pt", weights_only=True) for r in range(n)]  # nothing read may run code

    def gathered(self, mine):  # every process's dict, merged
        if self.group is None:
            return mine
        every = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        return {k: v for d in every for k, v in d.items()}

    def barrier(self):
        if self.group is not None:
            dist.barrier(group=self.group)
