"""Sample images (and text) from a Scale-RAE checkpoint. The GPU sampling script; it also runs on a CPU.

    python sample.py --prompt "Can you generate a photo of a cat on a windowsill?"
    python sample.py --prompts-file prompts.jsonl --num-images 4 --guidance-level 3.0
    python sample.py --image photo.jpg --prompt "What is in this image?"         # understanding
    python sample.py --latent outputs/sample_..._00.safetensors                 # decode a saved latent

Pipeline (README, "The method, file by file"): tokenizer.chat_prompt -> ScaleRAE.generate (Qwen2.5 with a KV cache;
<im_start> + 256 latent queries -> condition) -> ScaleRAE.sample_latents (DiT, rectified flow) -> RAE decoder ->
PNG. Defaults reproduce the official CLI (greedy decoding, the official 49-evaluation schedule, guidance 1.0 = off);
`--guidance-level > 1` is real classifier-free guidance (the official CLI's guidance is a no-op, see dit.py), and
`--steps N` switches to a plain N-step Euler sampler. Every output gets a new name: nothing is ever overwritten.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="text prompt (request-style works best: 'Can you generate a photo of ...?')")
    p.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--model-path", default=DEFAULT_MODEL, help="Hub id or local folder of a Scale-RAE checkpoint")
    p.add_argument("--decoder-repo", help="Hub id or local folder of the RAE decoder (default: the one released "
                                          "for the model's encoder, or the checkpoint's own decoder/)")
    p.add_argument("--seed", type=int, default=42, help="image i of the run uses seed + i (default 42, as official)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--guidance-level", "--cfg", dest="guidance_level", type=float, default=1.0,
                   help="classifier-free guidance scale; 1.0 = off (official default), > 1 = real CFG")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="apply guidance only for t in [LO, HI] (t = 1 is noise)")
    p.add_argument("--steps", type=int, help="Euler steps (default: the official 50-step, 49-evaluation schedule)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per LLM batch and images per DiT batch")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--save-latent", action="store_true", help="also save each latent (safetensors, key 'latent')")
    p.add_argument("--image", help="understanding: answer --prompt about this image")
    p.add_argument("--latent", help="decode this saved latent, or answer --prompt about it")
    args = p.parse_args(argv)

    # Bad input is reported here, before any model is loaded.
    prompts = []
    if args.prompt is not None:
        prompts.append(args.prompt)
    if args.prompts_file:
        prompts += read_prompts(p, args.prompts_file)
    if any(not s.strip() for s in prompts):
        p.error("empty prompt")
    if not prompts and not args.latent:
        p.error("give --prompt or --prompts-file (or --latent to decode a saved latent)")
    if args.image and args.latent:
        p.error("--image and --latent are exclusive")
    if (args.image or args.latent) and len(prompts) > 1:
        p.error("--image/--latent take a single --prompt")
    if args.num_images < 1:
        p.error(f"--num-images must be >= 1, got {args.num_images}")
    check_sampling_args(p, args)
    args.prompts = prompts
    try:
        args.input_image = load_image(args.image) if args.image else None
        args.input_latent = read_latent(args.latent) if args.latent else None
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return args


def check_sampling_args(p, args):
    """The checks sample.py and evaluate.py share, made before any model is loaded."""
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.guidance_level < 0:
        p.error(f"--guidance-level must be >= 0, got {args.guidance_level}")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--max-new-tokens and --batch-size must be >= 1")


def read_prompts(parser, path):
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"cannot read --prompts-file {path}: {e}")
    if not lines:
        parser.error(f"--prompts-file {path} has no prompts")
    if path.endswith(".jsonl"):
        try:
            return [json.loads(line)["prompt"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            parser.error(f"--prompts-file {path}: every line must be a JSON object with a 'prompt' field ({e!r})")
    return lines


def load_image(path):
    from encoders import load_image as load
    return load(path)


def read_latent(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        latent = load_file(path)["latent"]
    except (OSError, SafetensorError, KeyError) as e:
        raise ValueError(f"--latent {path} is not a latent file written by --save-latent ({e!r})") from None
    if latent.ndim != 2:
        raise ValueError(f"--latent {path} holds shape {tuple(latent.shape)}; expected (tokens, channels)")
    return latent.float()


def reserve(folder, stem, suffix):
    """A new file name (stem, stem-1, stem-2, ...) created exclusively, so concurrent runs never collide."""
    for i in range(10_000):
        path = folder / f"{stem}{'' if i == 0 else f'-{i}'}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free file name for {stem}{suffix} in {folder}")


class Progress:
    """A minimal progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total, label):
        self.total, self.label, self.n = total, label, 0
        self.enabled = sys.stderr.isatty()

    def __call__(self, *_):
        self.n += 1
        if self.enabled:
            done = int(30 * self.n / self.total)
            sys.stderr.write(f"\r{self.label} [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total}")
            if self.n == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def load(args):
    """(model, tokenizer, rae, device, dtype) for --model-path/--decoder-repo/--device/--dtype; a missing or
    mismatched checkpoint ends the program with one clear line (no traceback)."""
    import torch

    from model import load_pipeline
    from weights import WeightsError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    t0 = time.perf_counter()
    try:
        model, tokenizer, rae = load_pipeline(args.model_path, args.decoder_repo, dtype=dtype, device=device)
    except (WeightsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"loaded {args.model_path} in {time.perf_counter() - t0:.1f}s ({device}, {str(dtype).split('.')[-1]})")
    return model, tokenizer, rae, device, dtype


def main(argv=None):
    args = parse_args(argv)
    import torch
    from safetensors.torch import save_file

    from dit import official_timesteps
    from weights import WeightsError, write_atomic

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, rae, device, dtype = load(args)
    expected = (model.config.image_tokens, model.config.dit.in_channels)  # (256, 1152) for the released SigLIP-2 models
    if args.input_latent is not None and tuple(args.input_latent.shape) != expected:
        sys.exit(f"error: --latent {args.latent} holds shape {tuple(args.input_latent.shape)}; this model's latents "
                 f"are {expected}")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    steps = args.steps if args.steps is not None else len(official_timesteps()[0])
    results = []
    if args.latent and not args.prompts:  # decode only
        results.append(dict(prompt=None, text="", token_ids=[], latents=[args.input_latent]))
    else:
        features = None
        if args.input_image is not None:
            try:
                features = rae.encode([args.input_image])  # (1, 256, C), loads the encoder on first use
            except (WeightsError, FileNotFoundError) as e:
                sys.exit(f"error: {e}")
        elif args.input_latent is not None:
            features = args.input_latent[None].to(device)
        for i in range(0, len(args.prompts), args.batch_size):
            chunk = args.prompts[i:i + args.batch_size]
            t1 = time.perf_counter()
            gen = model.chat(tokenizer, chunk, None if features is None else features.expand(len(chunk), -1, -1),
                             max_new_tokens=args.max_new_tokens)
            print(f"LLM: {len(chunk)} prompt(s) in {time.perf_counter() - t1:.2f}s")
            for p, (token_ids, cond) in zip(chunk, gen):
                results.append(dict(prompt=p, text=tokenizer.decode(token_ids), token_ids=token_ids, cond=cond))
        # DiT: every image of every prompt; image i of the run uses seed + i. One prompt's N images share one LLM pass.
        jobs = [(r, j) for r in results if r["cond"] is not None for j in range(args.num_images)]
        for r in results:
            r["latents"] = []
        for i in range(0, len(jobs), args.batch_size):
            chunk = jobs[i:i + args.batch_size]
            t1 = time.perf_counter()
            cond = torch.stack([r["cond"] for r, _ in chunk])
            seeds = [args.seed + i + k for k in range(len(chunk))]
            lat = model.sample_latents(cond, seeds, steps=args.steps, cfg_scale=args.guidance_level,
                                       cfg_interval=args.cfg_interval, progress=Progress(steps, "DiT"))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            print(f"DiT: {len(chunk)} image(s) in {time.perf_counter() - t1:.2f}s")
            for (r, _), seed, x in zip(chunk, seeds, lat):
                r["latents"].append(x)
                r.setdefault("seeds", []).append(seed)

    images, latent_paths = [], []
    for r in results:
        r["images"], r["latent_files"] = [], []
        if not r["latents"]:
            continue
        pixels = rae.decode(torch.stack(r["latents"]).to(device))  # (N, 3, H, W) in [0, 1]
        for x, pil in zip(r["latents"], rae.to_pil(pixels)):
            png = reserve(out_dir, f"sample_{stamp}_{len(images):02d}", ".png")
            write_atomic(png, lambda tmp: pil.save(tmp, format="PNG"))
            images.append(str(png))
            r["images"].append(str(png))
            if args.save_latent:
                path = reserve(out_dir, f"sample_{stamp}_{len(latent_paths):02d}_latent", ".safetensors")
                write_atomic(path, lambda tmp: save_file({"latent": x.float().cpu().contiguous()}, str(tmp)))
                latent_paths.append(str(path))
                r["latent_files"].append(str(path))

    single = len(results) == 1
    manifest = {
        "prompt": results[0]["prompt"] if single else [r["prompt"] for r in results],
        "text": results[0]["text"] if single else [r["text"] for r in results],
        "token_ids": results[0]["token_ids"] if single else [r["token_ids"] for r in results],
        "images": images, "latents": latent_paths, "seed": args.seed, "model_path": args.model_path,
        "decoder_repo": rae.decoder_path, "encoder": rae.encoder_path,
        "guidance_level": args.guidance_level, "cfg_interval": args.cfg_interval,
        "steps": args.steps if args.steps is not None else "official", "dtype": str(dtype).split(".")[-1],
        "device": device, "input_image": args.image, "input_latent": args.latent,
        "results": [dict(prompt=r["prompt"], text=r["text"], token_ids=r["token_ids"], images=r["images"],
                         latents=r["latent_files"], seeds=r.get("seeds", []),
                         image_produced=bool(r["images"])) for r in results],
    }
    path = reserve(out_dir, f"sample_{stamp}_manifest", ".json")
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False)))
    for r in results:
        if r["prompt"] is not None and r["text"]:
            print(f"text: {r['text']}")
        if r["prompt"] is not None and args.image is None and args.latent is None and not r["images"]:
            print(f"no image produced for {r['prompt']!r} (the model did not emit <im_start>)")
    for p in images + latent_paths + [str(path)]:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
