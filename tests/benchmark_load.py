"""Peak host memory (RSS) of loading an official-format Scale-RAE checkpoint: a ~2.1 GB fp32 checkpoint in 3 shards
(Qwen2.5-1.5B width, 6 layers, the full 151,667-row vocabulary, a small DiT; random weights, no download), loaded by
ScaleRAE.from_pretrained into each dtype, each load in a fresh process.

    python tests/benchmark_load.py                      # CPU; --device cuda:0 to load onto a GPU
    python tests/benchmark_load.py --layers 28          # the real depth (~6 GB)
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
from model import ScaleRAE
t = time.perf_counter()
ScaleRAE.from_pretrained({folder!r}, dtype=getattr(torch, {dtype!r}), device={device!r})
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 2 ** 20  # GiB; ru_maxrss would count
print(peak, time.perf_counter() - t)                                                  # the parent's, from before exec
"""


def write_checkpoint(folder, layers, shards=3):
    import torch
    from safetensors.torch import save_file

    from dit import DiTConfig
    from model import QWEN_PRESETS, ScaleRAE, ScaleRAEConfig
    cfg = ScaleRAEConfig(**vars(QWEN_PRESETS["qwen2.5-1.5b"]) | dict(vocab_size=151667, num_hidden_layers=layers),
                         dit=DiTConfig(hidden_size=512, depth=2, num_heads=8, in_channels=1152, z_channels=512))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ScaleRAE(cfg).state_dict().items() if k != "lm_head.weight"}  # tied
    names, weight_map = list(shapes), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: torch.randn(shapes[k]) * 0.02 for k in names[s::shards]}, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names[s::shards], file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg.to_official()))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        size = write_checkpoint(Path(tmp), args.layers)
        print(f"checkpoint: {size / 1e9:.2f} GB fp32 in 3 shards; loading onto {args.device}")
        for dtype in ("bfloat16", "float32"):
            code = CHILD.format(root=str(ROOT), folder=tmp, dtype=dtype, device=args.device)
            peak, seconds = map(float, subprocess.check_output([sys.executable, "-c", code], text=True).split())
            print(f"{dtype:>9}: peak RSS {peak:.2f} GiB, {seconds:.1f} s")


if __name__ == "__main__":
    main()
