"""The toy Scale-RAE: every stage of the real recipe, through the same code, at a size that trains on 2 CPU cores.

    python toy.py --out runs/toy                  # data, tokenizer, encoder, decoder, stage 1, stage 2, evaluation
    python toy.py --out runs/toy --ship toy       # ... then copy the trained model into the repository's toy/

Shapes data (shapes.py), a BPE trained on its captions, a frozen SigLIP-architecture encoder at SigLIP's random
init, then train_tpu.py --stage decoder, 1 and 2 and evaluate.py, run in this interpreter. README, "Toy recipe".
"""

import argparse
import json
import runpy
import shutil
import sys
import time
from pathlib import Path

import torch

from data import encode_conversation
from encoders import ImageProcessing, SigLIP2Encoder
from shapes import TOY_ENCODER, TOY_HOLDOUT, init_siglip, save_siglip, train_tokenizer, write_shapes_dataset
from tokenizer import chat_prompt

ROOT = Path(__file__).parent

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", required=True, help="run folder (created; an existing one is refused)")
parser.add_argument("--ship", help="copy the final model (model, tokenizer, encoder/, decoder/) into this folder")
parser.add_argument("--samples", type=int, default=20000, help="stage-1 samples (half generation, half understanding)")
parser.add_argument("--stage2-samples", type=int, default=10000, help="stage-2 samples (generation only)")
parser.add_argument("--vocab", type=int, default=460, help="toy tokenizer size (about the most the captions support)")
parser.add_argument("--decoder-steps", type=int, default=1500)
parser.add_argument("--decoder-lr", type=float, default=3e-3)
parser.add_argument("--noise-tau", type=float, default=0.1, help="decoder latent noise (RAE's 0.8 erases toy colors)")
parser.add_argument("--stage1-steps", type=int, default=2000)
parser.add_argument("--stage2-steps", type=int, default=1000)
parser.add_argument("--diffusion-timesteps-per-sample", type=int, default=2, help="official K-tiling (stages 1, 2)")
parser.add_argument("--batch-size", type=int, default=16, help="stages 1 and 2 (the decoder uses 32)")
parser.add_argument("--seq-len", type=int, help="default: the longest sample, rounded up to a multiple of 64")
parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every part (the DiT's too)")
parser.add_argument("--stage2-lr", type=float, help="default: --lr / 2")
parser.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts (and questions) to evaluate")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--presets", default="toy", help="the LLM, DiT and decoder presets (the tests register smaller ones)")
parser.add_argument("--log-every", type=int, default=50, help="training log interval in steps")
args = parser.parse_args()

out = Path(args.out)
if out.exists():
    parser.error(f"{out} exists; choose a new --out")
if args.ship and Path(args.ship).exists():
    parser.error(f"--ship {args.ship} exists; remove it first (the shipped model is never silently overwritten)")
out.mkdir(parents=True)
t0 = time.time()


def run(script, *argv):
    """`python script argv`, in this interpreter."""
    print("$ python", script, *argv, flush=True)
    saved, sys.argv = sys.argv, [script, *map(str, argv)]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"{script} failed: {e.code}") from None
    finally:
        sys.argv = saved


def train(stage, run_name, batch_size, *extra):
    """One train_tpu.py stage; toy activations are small, so nothing is recomputed."""
    presets = {"1": ("--llm", args.presets, "--dit", args.presets), "decoder": ("--decoder", args.presets)}
    run("train_tpu.py", "--preset", "toy", *presets.get(stage, ()), "--stage", stage, "--out", out / run_name,
        "--backend", "torch", "--batch-size", batch_size, "--seed", args.seed, "--save-every", 100000, "--no-grad-ckpt",
        *extra, "--encoder", out / "encoder", "--seq-len", args.seq_len, "--log-every", args.log_every)
    print(f"  {stage} done at {time.time() - t0:.0f}s", flush=True)
    return out / run_name / "export"


# 1. data
jsonl = write_shapes_dataset(out / "shapes", args.samples, seed=args.seed, image_size=64, holdout=TOY_HOLDOUT)
jsonl2 = write_shapes_dataset(out / "shapes2", args.stage2_samples, seed=args.seed + 1, image_size=64,
                              understanding_fraction=0.0, holdout=TOY_HOLDOUT)
# 2. tokenizer
texts = [c["value"] for line in open(jsonl) for c in json.loads(line)["conversations"]]
tokenizer = train_tokenizer(texts + [chat_prompt("")], args.vocab)
(out / "tokenizer").mkdir()
tokenizer.save(out / "tokenizer")
# 3. encoder: random, frozen
torch.manual_seed(args.seed)
encoder = init_siglip(SigLIP2Encoder(TOY_ENCODER, ImageProcessing((64, 64), (0.5,) * 3, (0.5,) * 3, resample=2)))
save_siglip(encoder, out / "encoder")
if args.seq_len is None:  # a smaller vocabulary means longer prompts; a sample longer than L would be skipped
    conversations = [json.loads(line)["conversations"] for p in (jsonl, jsonl2) for line in open(p)]
    longest = max(len(encode_conversation(tokenizer, c, True, 1 << 30, encoder.num_tokens)[0]) for c in conversations)
    args.seq_len = -(-longest // 64) * 64
print(f"data, {len(tokenizer)}-token tokenizer, encoder ready at {time.time() - t0:.0f}s; L = {args.seq_len}", flush=True)

llm_dit = ["--diff-head-lr-scale", 1, "--diffusion-timesteps-per-sample", args.diffusion_timesteps_per_sample]
# 4-6. the three training stages
decoder = train("decoder", "decoder", 32, "--data", jsonl, "--steps", args.decoder_steps,
                "--lr", args.decoder_lr, "--noise-tau", args.noise_tau)
stage1 = train("1", "stage1", args.batch_size, "--data", jsonl, "--steps", args.stage1_steps,
               "--lr", args.lr, "--tokenizer", out / "tokenizer", *llm_dit)
stage2_lr = args.lr / 2 if args.stage2_lr is None else args.stage2_lr  # --stage2-lr 0 is 0 (a broken stage)
stage2 = train("2", "stage2", args.batch_size, "--init", stage1, "--data", jsonl2,
               "--steps", args.stage2_steps, "--lr", stage2_lr, *llm_dit)
# 7. evaluate
run("evaluate.py", "--model-path", stage2, "--decoder-repo", decoder, "--num-prompts", args.eval_prompts,
    "--json", out / "eval.json", "--grid", out / "grid.png")
print(f"toy recipe done in {time.time() - t0:.0f}s", flush=True)

if args.ship:
    ship = Path(args.ship)
    for src, dst in ((stage2, ship), (out / "encoder", ship / "encoder"), (decoder, ship / "decoder")):
        shutil.copytree(src, dst)
    cfg = json.loads((ship / "config.json").read_text())
    cfg["mm_vision_tower_aux_list"] = ["encoder"]  # relative to the model folder: the checkpoint ships its encoder
    (ship / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"shipped to {ship}")
