"""Host cost of the training input (train_tpu.py --data-workers): what the training loop waits for per batch.

A script, not a test (pytest collects only test_*.py). It writes JPEGs of real-photo size (512x512, smooth content,
quality 90) and a JSONL of generation samples, then reads host batches as train_tpu.py does (data.SampleStream ->
data.batches; SigLIP-2 preprocessing to 224 px; the shipped toy tokenizer), with 0 and N worker processes. Between
batches it sleeps --step seconds: a device busy with the step, as XLA's asynchronous execution leaves the host. It
reports the median time the loop spends getting a batch (after --warmup batches), i.e. what decoding costs a step.

    python tests/benchmark_data.py                              # 128 per batch (the official per host), 2 s step
    python tests/benchmark_data.py --workers 0 2 8 --step 1.0 --batch-size 64
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import SampleStream, batches, open_source  # noqa: E402
from encoders import ImageProcessing  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--step", type=float, default=2.0, help="seconds the device is busy between batches")
parser.add_argument("--batches", type=int, default=6, help="timed batches per setting")
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--images", type=int, default=64, help="distinct JPEGs (records cycle through them)")
args = parser.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    root, rng = Path(tmp), np.random.default_rng(0)
    for i in range(args.images):  # smooth random content: a JPEG of photo-like size, not a flat color
        noise = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
        noise.resize((512, 512), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2)).save(root / f"{i}.jpg", quality=90)
    turns = [{"from": "human", "value": "Can you generate a photo?"}, {"from": "gpt", "value": "<image>"}]
    n = args.batch_size * (args.batches + args.warmup + 1)
    (root / "data.jsonl").write_text("".join(json.dumps(dict(image=f"{i % args.images}.jpg", conversations=turns))
                                             + "\n" for i in range(n)))
    tokenizer = Tokenizer.from_dir(Path(__file__).resolve().parent.parent / "toy", add_image_markers=True)
    siglip2 = ImageProcessing((224, 224), (0.5,) * 3, (0.5,) * 3, resample=2)  # SigLIP-2 So400M/14 at 224 px
    for workers in args.workers:
        stream = SampleStream(open_source(root / "data.jsonl"), tokenizer, 512, preprocess=siglip2, workers=workers)
        it, waits = batches(stream, args.batch_size, 224), []
        for i in range(args.warmup + args.batches):
            start = time.perf_counter()
            next(it)
            waits.append(time.perf_counter() - start)
            time.sleep(args.step)
        it.close()
        print(f"workers {workers}: {statistics.median(waits[args.warmup:]):.3f} s per batch of {args.batch_size} "
              f"(min {min(waits[args.warmup:]):.3f}), {args.step} s steps", flush=True)
