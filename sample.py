"""Sample images (and text) from a Scale-RAE checkpoint. The GPU sampling script; it also runs on a CPU.

    python sample.py --prompt "Can you generate a photo of a cat on a windowsill?"
    python sample.py --prompts-file prompts.jsonl --num-images 4 --guidance-level 3.0
    python sample.py --image photo.jpg --prompt "What is in this image?"         # understanding
    python sample.py --latent outputs/sample_..._00_latent.safetensors           # decode a saved latent

Pipeline: model.load_pipeline -> ScaleRAE.chat (Qwen2.5 with a KV cache; <im_start> + 256 latent queries -> DiT
condition) -> ScaleRAE.sample_latents (rectified flow) -> RAE decoder -> PNG. Defaults follow the official CLI
(greedy, the official 49-evaluation schedule, guidance 1.0 = off); `--guidance-level > 1` is real classifier-free
guidance (the official one is a no-op). Every output gets a new name: nothing is ever overwritten.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dit import official_timesteps
from encoders import load_image
from model import at_least, available_device, load_pipeline
from weights import WeightsError, check_writable, write_atomic

DEFAULT_MODEL = "nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="text prompt (request-style works best: 'Can you generate a photo of ...?')")
    p.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--model-path", default=DEFAULT_MODEL, help="Hub id or local folder of a Scale-RAE checkpoint")
    p.add_argument("--decoder-repo", help="Hub id or local folder of the RAE decoder (default: the one released "
                                          "for the model's encoder, or the checkpoint's own decoder/)")
    p.add_argument("--seed", type=at_least(0, hi=2**63 - 1), default=42, help="image i uses seed + i (default 42)")
    p.add_argument("--num-images", type=at_least(1, hi=10_000), default=1, help="images per prompt")
    p.add_argument("--guidance-level", "--cfg", dest="guidance_level", type=at_least(0, float), default=1.0,
                   help="classifier-free guidance scale; 1.0 = off (official default), > 1 = real CFG")
    p.add_argument("--cfg-interval", type=at_least(0, float, hi=1), nargs=2, metavar=("LO", "HI"),
                   help="apply guidance only for t in [LO, HI] (t = 1 is noise)")
    p.add_argument("--steps", type=at_least(1), help="Euler steps (default: the official 49-evaluation schedule)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=512)
    p.add_argument("--batch-size", type=at_least(1), default=8, help="prompts per LLM batch and images per DiT batch")
    p.add_argument("--device", type=available_device, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--save-latent", action="store_true", help="also save each latent (safetensors, key 'latent')")
    p.add_argument("--image", help="understanding: answer --prompt about this image")
    p.add_argument("--latent", help="decode this saved latent, or answer --prompt about it")
    args = p.parse_args(argv)

    # Bad input is reported here, before any model is loaded.
    args.prompts = ([args.prompt] if args.prompt is not None else []) + (
        read_prompts(p, args.prompts_file) if args.prompts_file else [])
    if any(not s.strip() for s in args.prompts):
        p.error("empty prompt")
    if not args.prompts and not args.latent:
        p.error("give --prompt or --prompts-file (or --latent to decode a saved latent)")
    if args.image and args.latent:
        p.error("--image and --latent are exclusive")
    if (args.image or args.latent) and len(args.prompts) > 1:
        p.error("--image/--latent take a single --prompt")
    if args.cfg_interval and args.cfg_interval[0] > args.cfg_interval[1]:
        p.error(f"--cfg-interval LO HI needs LO <= HI, got {args.cfg_interval}")
    try:
        check_writable(args.output_dir)
        args.input_image = load_image(args.image) if args.image else None
        args.input_latent = read_latent(args.latent) if args.latent else None
    except (OSError, ValueError) as e:
        p.error(str(e))
    return args


def read_prompts(parser, path):
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--prompts-file {path}: {e}")
    prompts = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                prompts.append(json.loads(line)["prompt"] if path.endswith(".jsonl") else line)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                parser.error(f"--prompts-file {path}, line {n}: not a JSON object with a 'prompt' field ({e!r})")
            if not isinstance(prompts[-1], str):
                parser.error(f"--prompts-file {path}, line {n}: the prompt must be a string, got {prompts[-1]!r}")
    return prompts


def read_latent(path):
    try:
        latent = load_file(path)["latent"]
    except (OSError, SafetensorError, KeyError) as e:
        raise ValueError(f"--latent {path} is not a latent file written by --save-latent ({e!r})") from None
    if latent.ndim != 2 or not latent.float().isfinite().all():
        raise ValueError(f"--latent {path} holds a {tuple(latent.shape)} tensor that is not (tokens, channels) of "
                         f"finite numbers")
    return latent.float()


def write_new(folder, stem, suffix, write):
    """Write a new file (stem, stem-1, stem-2, ... + suffix) and return its path: the name is taken exclusively, so
    concurrent runs never collide and nothing is overwritten, and a failed write leaves no file behind."""
    for i in range(10_000):
        path = folder / f"{stem}{f'-{i}' if i else ''}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        try:
            write_atomic(path, write)
            return str(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    raise RuntimeError(f"no free file name for {stem}{suffix} in {folder}")


def progress(total, label):
    """A progress callback that draws a bar on stderr when it is a terminal (and does nothing otherwise)."""
    done = [0]

    def update():
        done[0] += 1
        if sys.stderr.isatty():
            bar = "#" * (30 * done[0] // total)
            sys.stderr.write(f"\r{label} [{bar:.<30}] {done[0]}/{total}" + ("\n" if done[0] == total else ""))
    return update


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        model, tokenizer, rae = load_pipeline(args.model_path, args.decoder_repo, args.dtype, args.device)
    except WeightsError as e:
        sys.exit(f"error: {e}")
    device, dtype = model.model.norm.weight.device, model.model.norm.weight.dtype
    print(f"loaded {args.model_path} in {time.perf_counter() - t0:.1f}s ({device}, {str(dtype).split('.')[-1]})")
    expected = (model.config.image_tokens, model.config.dit.in_channels)  # (256, 1152) for the released models
    if args.input_latent is not None and tuple(args.input_latent.shape) != expected:
        sys.exit(f"error: --latent {args.latent} holds shape {tuple(args.input_latent.shape)}; this model's latents "
                 f"are {expected}")

    features = None
    if not args.prompts:  # decode only
        results = [dict(prompt=None, text="", token_ids=[], latents=args.input_latent[None], seeds=[None])]
    else:
        features = args.input_latent[None].to(device) if args.input_latent is not None else None
        if args.input_image is not None:
            try:
                features = rae.encode([args.input_image])  # (1, 256, C); the encoder loads on first use
            except WeightsError as e:
                sys.exit(f"error: {e}")
        t1 = time.perf_counter()
        answers = model.chat(tokenizer, args.prompts, features, args.max_new_tokens, args.batch_size)
        print(f"LLM: {len(args.prompts)} prompt(s) in {time.perf_counter() - t1:.2f}s")
        results = [dict(prompt=p, text=tokenizer.decode(ids), token_ids=ids, cond=cond, seeds=[], latents=[])
                   for p, (ids, cond) in zip(args.prompts, answers)]
        # The DiT draws every image of every prompt; image i of the run uses seed + i.
        drawn = [r for r in results if r["cond"] is not None for _ in range(args.num_images)]
        for i, r in enumerate(drawn):
            r["seeds"].append(args.seed + i)
        if drawn:
            t1 = time.perf_counter()
            steps = args.steps or len(official_timesteps()[0])
            latents = model.sample_latents(torch.stack([r["cond"] for r in drawn]), [args.seed + i for i in range(len(drawn))],
                                           args.steps, args.guidance_level, args.cfg_interval,
                                           progress(steps * -(-len(drawn) // args.batch_size), "DiT"), args.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"DiT: {len(drawn)} image(s) in {time.perf_counter() - t1:.2f}s")
            for r, x in zip(drawn, latents):
                r["latents"].append(x)

    # Decode batch_size images at a time; a non-finite latent or image ends the run before any file is written.
    jobs = [(r, x, seed) for r in results for x, seed in zip(r["latents"], r["seeds"])]
    n = args.batch_size
    pixels = [p for i in range(0, len(jobs), n) for p in rae.decode(torch.stack([x for _, x, _ in jobs[i:i + n]]).to(device))]
    for (r, x, seed), p in zip(jobs, pixels):
        if not (x.isfinite().all() and p.isfinite().all()):
            sys.exit(f"error: the image of {r['prompt']!r} (seed {seed}) is not finite (NaN or inf); nothing was written")
    stamp, out_dir = time.strftime("%Y%m%d-%H%M%S"), Path(args.output_dir)
    for r in results:
        r["images"], r["latent_files"] = [], []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for k, ((r, x, _), pil) in enumerate(zip(jobs, rae.to_pil(torch.stack(pixels)) if jobs else [])):
            r["images"].append(write_new(out_dir, f"sample_{stamp}_{k:02d}", ".png", lambda tmp: pil.save(tmp, format="PNG")))
            if args.save_latent:
                r["latent_files"].append(write_new(out_dir, f"sample_{stamp}_{k:02d}_latent", ".safetensors",
                                                   lambda tmp: save_file({"latent": x.float().cpu().contiguous()}, str(tmp))))
        images, latent_files = [f for r in results for f in r["images"]], [f for r in results for f in r["latent_files"]]
        manifest = dict(
            images=images, latents=latent_files, seed=args.seed, model_path=args.model_path,
            decoder_repo=rae.decoder_path, encoder=rae.encoder_path, guidance_level=args.guidance_level,
            cfg_interval=args.cfg_interval, steps=args.steps or "official", dtype=str(dtype).split(".")[-1],
            device=str(device), input_image=args.image, input_latent=args.latent,
            results=[dict(prompt=r["prompt"], text=r["text"], token_ids=r["token_ids"], images=r["images"],
                          latents=r["latent_files"], seeds=[s for s in r["seeds"] if s is not None],
                          image_produced=bool(r["images"])) for r in results])
        path = write_new(out_dir, f"sample_{stamp}_manifest", ".json",
                         lambda tmp: tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False)))
    except OSError as e:
        sys.exit(f"error: cannot write the outputs in {out_dir}: {e}")
    for r in results:
        if r["text"]:
            print(f"text: {r['text']}")
        if r["prompt"] is not None and features is None and not r["images"]:
            print(f"no image produced for {r['prompt']!r} (the model did not emit <im_start>)")
    for f in images + latent_files + [path]:
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
