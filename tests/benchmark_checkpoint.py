"""What a checkpoint save and the export cost the training loop and the host, on a CPU.

  python tests/benchmark_checkpoint.py

1. checkpoint.Checkpoints.save of a 512 MB state (16 float32 tensors of 2048 x 4096): the time until save() returns
   (the copy to host memory: the training loop's pause) and until the checkpoint is complete (DCP files, host state,
   SHA-256 manifest), median of 5 saves.
2. The export of a 1 GB model sharded over 8 emulated XLA devices (16 tensors of 4096 x 4096, FSDP on rows), each way
   in a fresh process: the whole model gathered first (`model.to("cpu")`, as train_tpu.py did) or a tensor at a time
   (weights.save_safetensors). Peak host memory over the process's memory before the export (VmHWM after resetting
   it). On emulated devices `.cpu()` also replicates the tensor on all 8 "devices", i.e. in host memory: a TPU keeps
   those replicas in its HBM.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPORT = """
import sys, numpy as np, torch, torch_xla, torch_xla.runtime as xr, torch_xla.distributed.spmd as xs
from safetensors.torch import save_file
from weights import save_safetensors
xr.use_spmd()
mesh = xs.Mesh(np.arange(8), (1, 8), ("data", "fsdp"))
model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(16)]).to(torch_xla.device())
for p in model.parameters():
    xs.mark_sharding(p, mesh, ("fsdp", None))
torch_xla.sync()
status = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))  # kB
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
if sys.argv[1] == "whole":
    save_file({k: v.float().contiguous() for k, v in model.to("cpu").state_dict().items()}, sys.argv[2])
else:
    save_safetensors(model.state_dict(), sys.argv[2], dtype=torch.float32, full=lambda t: t.cpu())
print((status("VmHWM") - before) / 1024)
"""


def main():
    from checkpoint import Checkpoints
    state = dict(model={f"w{i}": torch.randn(2048, 4096) for i in range(16)})
    with tempfile.TemporaryDirectory() as tmp:
        ckpts, pause, total = Checkpoints(tmp, keep=2), [], []
        for step in range(1, 6):
            t0 = time.perf_counter()
            ckpts.save(step, state, host=dict(step=step))
            pause.append(time.perf_counter() - t0)
            ckpts.wait()
            total.append(time.perf_counter() - t0)
        print(f"save of 512 MB: the loop pauses {statistics.median(pause):.2f} s, the checkpoint is complete after "
              f"{statistics.median(total):.2f} s")
        env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="8", PYTHONPATH=str(ROOT))
        for way in ("whole", "streamed"):
            peaks = [float(subprocess.run([sys.executable, "-c", EXPORT, way, f"{tmp}/{way}.safetensors"], env=env,
                                          capture_output=True, text=True, check=True).stdout.split()[-1])
                     for _ in range(3)]
            print(f"export of 1 GB ({way}): peak host memory +{statistics.median(peaks):.0f} MB (median of 3)")


if __name__ == "__main__":
    main()
