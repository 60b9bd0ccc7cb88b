"""The toy Scale-RAE (issue 7): every stage of the real recipe, at a size that trains on 2 CPU cores in minutes.

    python toy.py --out runs/toy                  # build, train (decoder, stage 1, stage 2) and evaluate
    python toy.py --out runs/toy --ship toy       # ... then copy the trained model into the repository's toy/

Same code paths as the real model, only sizes differ (the `toy` presets of model.py, dit.py, rae.py, encoders.py):
  1. data       synthetic captioned shapes (data.py) at 64 px on the encoder's 8 x 8 token grid (a small shape
                fills one token, a large one 2 x 2), in the official JSONL format: generation samples
                ("Can you generate X?" -> "Here is X:\\n<image>", data.generation_answer) mixed with understanding
                samples (image + question -> one word), as stage 1 mixes both tasks. The (color, shape) pairs of
                data.TOY_HOLDOUT are never shown, so the evaluation can measure compositional generalization.
  2. tokenizer  a byte-level BPE trained on the captions (tokenizer.train_tokenizer), with the real special tokens
  3. encoder    the frozen representation encoder: a SigLIP-architecture ViT (64 px, patches of 8 -> 8 x 8 = 64
                tokens of 96 channels, a quarter of the real 256) at SigLIP's random initialization. A random ViT
                keeps the pixels recoverable (the decoder learns to invert it) and gives a fixed latent space for the
                DiT. (Pretraining it to classify the shapes' attributes made the DiT learn color and position faster,
                but not shape, and the decoder reconstructed shapes worse: measured, not kept.)
  4. decoder    train_tpu.py --stage decoder: the RAE pixel decoder on the frozen latents
  5. stage 1    train_tpu.py --stage 1: LLM + latent queries + projectors + DiT from scratch, CE + 2 x diffusion loss
  6. stage 2    train_tpu.py --stage 2: finetuning from the stage-1 export on a generation-only set
  7. evaluate   evaluate.py: attribute accuracy of generated images on held-out prompts, understanding accuracy
Each train_tpu.py stage also runs through torch_xla's CPU runtime: pass --xla (slower on 2 cores).
Tests run a budgeted recipe: --size tiny (a smaller LLM, DiT and decoder, defined here) and --in-process (the stages
and the evaluation in this interpreter, as runpy and evaluate.main, instead of one interpreter each).
"""

import argparse
import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import dit
import model
import rae
from data import encode_conversation
from encoders import ENCODER_PRESETS, ImageProcessing, SigLIP2Encoder
from shapes import TOY_HOLDOUT, write_shapes_dataset
from tokenizer import chat_prompt, train_tokenizer

ROOT = Path(__file__).parent
# --size tiny: the toy presets' shapes at a fraction of their width and depth (same encoder, so the same latents)
TINY = dict(llm=model.QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0,
                                 initializer_range=64 ** -0.5),
            dit=dit.DiTConfig(hidden_size=64, depth=2, num_heads=2, in_channels=96, z_channels=64, input_size=8),
            decoder=rae.DecoderConfig(64, 1, 2, 128, patch_size=8, image_size=64))

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", required=True, help="run folder (created; an existing one is refused)")
parser.add_argument("--ship", help="copy the final model (model, tokenizer, encoder/, decoder/) into this folder")
parser.add_argument("--samples", type=int, default=20000, help="stage-1 samples (half generation, half understanding)")
parser.add_argument("--stage2-samples", type=int, default=10000, help="stage-2 samples (generation only)")
parser.add_argument("--vocab", type=int, default=460, help="toy tokenizer size (about the most merges the captions "
                    "support: short sequences train faster and leave the prompt fewer tokens to hide in)")
parser.add_argument("--decoder-steps", type=int, default=1500)
parser.add_argument("--decoder-lr", type=float, default=3e-3, help="measured at 1000 steps: reconstructed shapes "
                    "read back right 69%% of the time at 1e-3, 88%% at 3e-3")
parser.add_argument("--noise-tau", type=float, default=0.1, help="decoder latent noise (RAE's 0.8 erased the colors of "
                    "64-channel toy latents: reconstructions agreed on 2 of 8 colors after 600 steps, 8 of 8 at 0.1)")
parser.add_argument("--stage1-steps", type=int, default=2000)
parser.add_argument("--stage2-steps", type=int, default=1000, help="generation only: each step trains the DiT on twice "
                    "the images of a stage-1 step")
parser.add_argument("--diffusion-timesteps-per-sample", type=int, default=2, help="stages 1 and 2: official K-tiling, "
                    "K DiT passes per LLM pass (K=2: twice the DiT training, 17%% more time per stage-1 step)")
parser.add_argument("--batch-size", type=int, default=16, help="stages 1 and 2 (the decoder uses 32)")
parser.add_argument("--seq-len", type=int, help="default: the longest toy sample (prompt + 66 image slots), rounded up "
                    "to a multiple of 64 (128 at the default vocabulary)")
parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every part (from scratch, the official "
                    "10x higher DiT rate is not needed)")
parser.add_argument("--stage2-lr", type=float, help="default: --lr / 2")
parser.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts (and questions) to evaluate")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--xla", action="store_true", help="train through torch_xla's CPU runtime (8 virtual devices)")
parser.add_argument("--size", choices=["toy", "tiny"], default="toy", help="toy: the repository's toy presets (the "
                    "shipped model); tiny: a 2-layer LLM of width 64, a 2-block DiT and a 1-layer decoder (TINY, for "
                    "tests; needs --in-process)")
parser.add_argument("--in-process", action="store_true", help="run train_tpu.py and evaluate.py in this interpreter "
                    "(runpy, evaluate.main) instead of a subprocess each: no start-up per stage (tests)")
parser.add_argument("--log-every", type=int, default=50, help="training log interval in steps")
args = parser.parse_args()
if args.size != "toy" and not args.in_process:
    parser.error(f"--size {args.size} needs --in-process (its presets are registered in this interpreter)")
if args.xla and args.in_process:
    parser.error("--xla runs each stage in its own interpreter (torch_xla reads its environment at start): drop "
                 "--in-process")

out = Path(args.out)
if out.exists():
    parser.error(f"{out} exists; choose a new --out")
if args.ship and Path(args.ship).exists():
    parser.error(f"--ship {args.ship} exists; remove it first (the shipped model is never silently overwritten)")
out.mkdir(parents=True)
t0 = time.time()


def run_here(script, argv):
    """Run a script's __main__ in this interpreter, as `python script *argv` would (--in-process)."""
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"{script.name} failed: {e.code}") from None
    finally:
        sys.argv = saved


if args.size != "toy":  # the tiny presets, under names train_tpu.py's --llm, --dit and --decoder look up
    name = f"toy-{args.size}"
    model.QWEN_PRESETS[name], dit.DIT_PRESETS[name] = TINY["llm"], TINY["dit"]
    rae.DECODER_PRESETS[name] = TINY["decoder"]
    sizes = {"1": ["--llm", name, "--dit", name], "2": [], "decoder": ["--decoder", name]}
else:
    sizes = {"1": [], "2": [], "decoder": []}


def train(stage, run, batch_size, *extra):
    """One train_tpu.py stage, in a subprocess (as a user would run it), or in this interpreter (--in-process)."""
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="8") if args.xla else dict(os.environ)
    argv = ["--preset", "toy", *sizes[stage], "--stage", stage, "--out", str(out / run),
            "--backend", "xla" if args.xla else "torch", "--batch-size", str(batch_size), "--seed", str(args.seed),
            "--save-every", "100000", "--no-grad-ckpt", *map(str, extra)]  # toy activations are small
    cmd = [sys.executable, str(ROOT / "train_tpu.py"), *argv]
    print("$", " ".join(cmd), flush=True)
    if args.in_process:
        run_here(ROOT / "train_tpu.py", argv)
    else:
        subprocess.run(cmd, env=env, check=True)
    print(f"  {stage} done at {time.time() - t0:.0f}s", flush=True)
    return out / run / "export"


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
encoder = SigLIP2Encoder(ENCODER_PRESETS["toy"], ImageProcessing((64, 64), (0.5,) * 3, (0.5,) * 3, resample=2))
encoder.init_weights()  # SigLIP's init: image content, not the position embedding, dominates the tokens
encoder.save_pretrained(out / "encoder")
if args.seq_len is None:  # a smaller vocabulary means longer prompts; a sample longer than L would be skipped
    records = [json.loads(line) for p in (jsonl, jsonl2) for line in open(p)]
    longest = max(len(encode_conversation(tokenizer, r["conversations"], True, 1 << 30, encoder.num_tokens)[0])
                  for r in records)
    args.seq_len = -(-longest // 64) * 64
print(f"data, tokenizer ({len(tokenizer)} tokens; sequence length {args.seq_len}) and encoder ready at "
      f"{time.time() - t0:.0f}s", flush=True)

common = ["--encoder", str(out / "encoder"), "--seq-len", str(args.seq_len), "--log-every", str(args.log_every)]
llm_dit = ["--diff-head-lr-scale", "1", "--diffusion-timesteps-per-sample", str(args.diffusion_timesteps_per_sample)]
# 4-6. the three training stages
decoder = train("decoder", "decoder", 32, "--data", jsonl, "--steps", str(args.decoder_steps),
                "--lr", str(args.decoder_lr), "--noise-tau", str(args.noise_tau), *common)
stage1 = train("1", "stage1", args.batch_size, "--data", jsonl, "--steps", str(args.stage1_steps),
               "--lr", str(args.lr), "--tokenizer", str(out / "tokenizer"), *llm_dit, *common)
stage2_lr = args.lr / 2 if args.stage2_lr is None else args.stage2_lr  # --stage2-lr 0 is 0 (a broken stage)
stage2 = train("2", "stage2", args.batch_size, "--init", str(stage1), "--data", jsonl2,
               "--steps", str(args.stage2_steps), "--lr", str(stage2_lr), *llm_dit, *common)
# 7. evaluate
evaluation = ["--model-path", str(stage2), "--decoder-repo", str(decoder), "--num-prompts", str(args.eval_prompts),
              "--json", str(out / "eval.json"), "--grid", str(out / "grid.png")]
if args.in_process:
    import evaluate
    evaluate.main(evaluation)
else:
    subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *evaluation], check=True)
print(f"toy recipe done in {time.time() - t0:.0f}s", flush=True)

if args.ship:
    ship = Path(args.ship)
    shutil.copytree(stage2, ship)
    shutil.copytree(out / "encoder", ship / "encoder")
    shutil.copytree(decoder, ship / "decoder")
    cfg = json.loads((ship / "config.json").read_text())
    cfg["mm_vision_tower_aux_list"] = ["encoder"]  # relative to the model folder: the checkpoint ships its encoder
    (ship / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"shipped to {ship}")
