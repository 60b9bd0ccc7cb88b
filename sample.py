"""Sample images (and text) from a Scale-RAE checkpoint. The GPU sampling script; it also runs on a CPU.

    python sample.py --prompt "Can you generate a photo of a cat on a windowsill?"       # or: sample.py t2i --prompt
    python sample.py --prompts-file prompts.jsonl --num-images 4 --guidance-level 3.0
    python sample.py img --image photo.jpg --prompt "What is in this image?"            # understanding
    python sample.py latent --latent x_latent.pt --action qa --prompt "Describe it."    # or --action decode/continue
    python sample.py --prompt "..." --post-qa-prompt "Does the image match the prompt?" # the model checks its image
    python sample.py --prompts-file geneval.jsonl --n-samples 4 --scaling-rounds 2 --metric answer_conf  # best 4 of 8

Pipeline: model.load_pipeline -> ScaleRAE.chat (Qwen2.5, KV cache; <im_start> + 256 latent queries -> DiT condition)
-> sample_latents (rectified flow) -> RAE decoder -> PNG. The official CLI's commands; deliberate differences: README.
"""

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from encoders import load_image
from model import at_least, available_device, load_pipeline
from verify import ALIGN_QUESTION, METRICS, official_checks, select, verify
from weights import WeightsError, check_writable, write_atomic, write_folder

DEFAULT_MODEL = "nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B"
COMMANDS = ("t2i", "img", "latent")  # the official CLI's subcommands: another spelling of the flags below


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else None
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="text prompt (request-style works best: 'Can you generate a photo of ...?')")
    p.add_argument("--prompts-file", "--metadata-file", "--metadata_file", help="a prompt a line, or JSONL")
    p.add_argument("--model-path", default=DEFAULT_MODEL, help="Hub id or local folder of a Scale-RAE checkpoint")
    p.add_argument("--decoder-repo", help="RAE decoder (default: the checkpoint's decoder/, or its encoder's release)")
    p.add_argument("--encoder-path", help="encoder, read for --image and --post-qa-mode image (default: the model's)")
    p.add_argument("--seed", type=at_least(0, hi=2**63 - 1), default=42, help="image i uses seed + i (default 42)")
    p.add_argument("--num-images", "--n-samples", type=at_least(1, hi=10_000), default=1, help="images per prompt")
    p.add_argument("--guidance-level", "--cfg", dest="guidance_level", type=at_least(0, float), default=1.0, help="1 = off")
    p.add_argument("--cfg-interval", type=at_least(0, float, hi=1), nargs=2, metavar=("LO", "HI"), help="t = 1 is noise")
    p.add_argument("--steps", type=at_least(1), help="Euler steps (default: the official 49-evaluation schedule)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=512)
    p.add_argument("--batch-size", type=at_least(1), default=8, help="prompts per LLM batch and images per DiT batch")
    p.add_argument("--device", type=available_device, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--official", action="store_true", help="the official numerics (float32, bf16 roundings; README)")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--save-latent", action="store_true", help="also save each latent (safetensors, key 'latent')")
    p.add_argument("--skip-decoder", action="store_true", help="no decoder, no PNG: save the latents instead")
    p.add_argument("--image", help="understanding: answer --prompt about this image")
    p.add_argument("--latent", help="a saved latent (.safetensors, or an official .pt) to decode or ask about")
    p.add_argument("--action", choices=["decode", "qa", "continue"], help="for --latent (default: qa with a --prompt)")
    p.add_argument("--max-new-tokens-qa", type=at_least(1), default=64, help="answer length of --action qa/continue")
    p.add_argument("--post-qa-prompt", help="after text-to-image, ask the model this about each image it drew")
    p.add_argument("--post-qa-template-path", help="a file holding the post-QA prompt (official qa_prompt_template.txt)")
    p.add_argument("--post-qa-mode", choices=["latent", "image"], default="latent", help="what post-QA reads")
    p.add_argument("--post-qa-max-new-tokens", type=at_least(1), default=64)
    p.add_argument("--scaling-rounds", type=at_least(1), default=1, help="test-time scaling: draw n-samples x this "
                   "per prompt, keep the n-samples best (README)")
    p.add_argument("--metric", choices=METRICS, help="how test-time scaling ranks (default answer_conf)")
    p.add_argument("--qa-dict", help="JSON {prompt: [yes/no questions]} for test-time scaling (official format)")
    args = p.parse_args(argv)

    # Bad input is reported here, before any model is loaded.
    records = ([dict(prompt=args.prompt)] if args.prompt is not None else []) + (
        read_prompts(p, args.prompts_file) if args.prompts_file else [])  # the prompts' JSON objects
    args.records = [dict(index=k) | m for k, m in enumerate(records)]  # a prompt's index: its own, else its place
    args.prompts, scaling = [m["prompt"] for m in args.records], args.scaling_rounds > 1
    args.action = args.action or (None if not args.latent else "qa" if args.prompts else "decode")
    a, action, post_qa = args, args.action, args.post_qa_prompt is not None or args.post_qa_template_path
    for bad, message in [  # each rule: (the input breaks it, what to tell the user)
        (command == "t2i" and (not a.prompts or a.image or a.latent), "t2i needs --prompt (and no --image/--latent)"),
        (command == "img" and not (a.image and a.prompts), "img needs --image and --prompt"),
        (command == "latent" and not a.latent, "latent needs --latent"),
        (any(not s.strip() for s in a.prompts), "empty prompt"),
        (not a.prompts and not a.latent, "give --prompt or --prompts-file (or --latent to decode a saved latent)"),
        (a.image and a.latent, "--image and --latent are exclusive"),
        ((a.image or a.latent) and len(a.prompts) > 1, "--image/--latent take a single --prompt"),
        (action and not a.latent, "--action needs --latent"),
        (action == "decode" and a.prompts, "--action decode takes no --prompt"),
        (action in ("qa", "continue") and not a.prompts, f"--action {action} needs a --prompt"),
        (action == "decode" and a.skip_decoder, "--action decode with --skip-decoder has nothing to do"),
        (a.cfg_interval and a.cfg_interval[0] > a.cfg_interval[1], f"--cfg-interval needs LO <= HI, got {a.cfg_interval}"),
        (a.official and a.dtype == "bfloat16", "--official runs in float32, as the official CLI: drop --dtype bfloat16"),
        (a.post_qa_prompt is not None and a.post_qa_template_path, "--post-qa-prompt and --post-qa-template-path are exclusive"),
        (post_qa and (a.image or a.latent), "post-QA follows text-to-image (not --image/--latent)"),
        (post_qa and a.post_qa_mode == "image" and a.skip_decoder, "--post-qa-mode image reads the decoded image: drop "
                                                                  "--skip-decoder, or use --post-qa-mode latent"),
        ((a.metric or a.qa_dict) and not scaling, "--metric and --qa-dict rank candidates: add --scaling-rounds > 1"),
        (scaling and (a.image or a.latent or a.skip_decoder or a.save_latent),
         "--scaling-rounds writes PNGs: no --image, --latent, --skip-decoder or --save-latent"),
        (len({m["index"] for m in a.records}) < len(a.records), "two prompts have one index"),
    ]:
        if bad:
            p.error(message)
    try:
        check_writable(args.output_dir)
        args.input_image = load_image(args.image) if args.image else None
        args.input_latent = read_latent(args.latent) if args.latent else None
        if args.post_qa_template_path:
            args.post_qa_prompt = Path(args.post_qa_template_path).read_text(encoding="utf-8")
        args.qa_dict = args.qa_dict and json.loads(Path(args.qa_dict).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        p.error(str(e))
    missing = [q for q in args.prompts if args.qa_dict and not isinstance(args.qa_dict.get(q), list)]
    if missing:
        p.error(f"--qa-dict has no list of questions for the prompt {missing[0]!r}")
    if post_qa and not args.post_qa_prompt.strip():
        p.error("empty post-QA prompt")
    if args.official and args.guidance_level != 1.0:
        print("--official: guidance set to 1.0, as the official guidance has no effect")
        args.guidance_level = 1.0
    args.save_latent |= args.skip_decoder
    if scaling:  # this process's share of the prompts (torchrun's RANK, WORLD_SIZE), less those done by an earlier run
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        args.records = [m for k, m in enumerate(args.records) if k % world == rank and not Path(
            args.output_dir, "candidates", f"{m['index']:05d}").exists()]
        args.prompts, args.metric = [m["prompt"] for m in args.records], args.metric or "answer_conf"
        if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            args.device = args.device or f"cuda:{os.environ['LOCAL_RANK']}"
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
                prompts.append(json.loads(line) if path.endswith(".jsonl") else dict(prompt=line))
                prompt, index = prompts[-1]["prompt"], prompts[-1].get("index", 0)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                parser.error(f"--prompts-file {path}, line {n}: not a JSON object with a 'prompt' field ({e!r})")
            if not isinstance(prompt, str) or not isinstance(index, int) or index < 0:
                parser.error(f"--prompts-file {path}, line {n}: needs a string prompt (and an int index >= 0), got "
                             f"{prompts[-1]!r}")
    return prompts


def read_latent(path):
    """A latent written by --save-latent (safetensors) or by the official CLI (torch.save, read without pickle code)."""
    try:
        latent = torch.load(path, "cpu", weights_only=True) if path.endswith(".pt") else load_file(path)["latent"]
    except Exception as e:  # OSError, SafetensorError, KeyError, an UnpicklingError of a file with code in it, ...
        raise ValueError(f"--latent {path} is not a latent file ({type(e).__name__}: {e})") from None
    latent = latent[0] if isinstance(latent, torch.Tensor) and latent.ndim == 3 and len(latent) == 1 else latent
    if not isinstance(latent, torch.Tensor) or latent.ndim != 2 or not latent.float().isfinite().all():
        raise ValueError(f"--latent {path} does not hold a (tokens, channels) tensor of finite numbers")
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


def main(argv=None):
    args = parse_args(argv)
    if args.scaling_rounds > 1 and not args.prompts:
        return print(f"nothing to do: every prompt of this process has its folder in {args.output_dir}/candidates")
    torch.backends.cudnn.deterministic = args.official  # as the official CLI's set_seed (PyTorch's default is False)
    t0 = time.perf_counter()
    try:  # the decoder is loaded only for the paths that decode
        model, tokenizer, rae = load_pipeline(args.model_path, False if args.skip_decoder or args.action == "qa" else
                                              args.decoder_repo, args.dtype, args.device, args.encoder_path, args.official)
    except WeightsError as e:
        sys.exit(f"error: {e}")
    device, dtype = model.model.norm.weight.device, model.model.norm.weight.dtype
    print(f"loaded {args.model_path} in {time.perf_counter() - t0:.1f}s ({device}, {str(dtype).split('.')[-1]})")
    expected = (model.config.image_tokens, model.config.dit.in_channels)  # (256, 1152) for the released models
    if args.input_latent is not None and tuple(args.input_latent.shape) != expected:
        sys.exit(f"error: --latent {args.latent} holds shape {tuple(args.input_latent.shape)}; this model's latents "
                 f"are {expected}")

    def ask(prompts, features, max_new_tokens):  # -> results; --official: its loop's max_new_tokens + 1 tokens
        answers = model.chat(tokenizer, prompts, features, max_new_tokens + args.official, args.batch_size, args.official)
        return [dict(prompt=p, text=tokenizer.decode(ids), token_ids=ids, cond=cond, seeds=[], latents=[])
                for p, (ids, cond) in zip(prompts, answers)]

    try:
        features = rae.encode([args.input_image], args.official) if args.input_image is not None else None
        if args.post_qa_prompt and args.post_qa_mode == "image":
            rae.encoder  # loads it now: a missing encoder is reported before any generation
    except WeightsError as e:
        sys.exit(f"error: {e}")
    features = args.input_latent[None].to(device) if args.input_latent is not None else features  # (1, 256, C)
    t1 = time.perf_counter()
    if args.action == "decode":
        results = [dict(prompt=None, text="", token_ids=[], cond=None, latents=args.input_latent[None], seeds=[None])]
    else:
        results = ask(args.prompts, features, args.max_new_tokens_qa if args.latent else args.max_new_tokens)
        for r, record in zip(results, args.records):
            r["record"] = record  # the prompt's line of --prompts-file
        print(f"LLM: {len(args.prompts)} prompt(s) in {time.perf_counter() - t1:.2f}s")
    # The DiT draws every image of every prompt (not after --action qa); image i of the run uses seed + i, candidate
    # k of the prompt with index i (test-time scaling) seed + i * per + k, whatever the process and the run.
    per = args.num_images * args.scaling_rounds
    drawn = [r for r in results if r["cond"] is not None and args.action != "qa" for _ in range(per)]
    if drawn:
        t1 = time.perf_counter()
        seeds = [args.seed + (m["index"] * per + i % per if args.scaling_rounds > 1 else i)
                 for i, m in enumerate(r["record"] for r in drawn)]
        latents = model.sample_latents(torch.stack([r["cond"] for r in drawn]), seeds, args.steps, args.guidance_level,
                                       args.cfg_interval, args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"DiT: {len(drawn)} image(s) in {time.perf_counter() - t1:.2f}s")
        for r, x, seed in zip(drawn, latents, seeds):
            r["latents"].append(x)
            r["seeds"].append(seed)

    # Decode batch_size images at a time; a non-finite latent or image ends the run before any file is written.
    jobs = [(r, x, seed) for r in results for x, seed in zip(r["latents"], r["seeds"])]
    n, pixels = args.batch_size, []
    if not args.skip_decoder:
        pixels = [p for i in range(0, len(jobs), n) for p in rae.decode(torch.stack([x for _, x, _ in jobs[i:i + n]]).to(device))]
    for k, (r, x, seed) in enumerate(jobs):
        if not (x.isfinite().all() and (args.skip_decoder or pixels[k].isfinite().all())):
            sys.exit(f"error: the image of {r['prompt']!r} (seed {seed}) is not finite (NaN or inf); nothing was written")
    pils = rae.to_pil(torch.stack(pixels)) if pixels else []
    if (args.post_qa_prompt or args.scaling_rounds > 1) and jobs:  # the model answers questions about its images
        t1 = time.perf_counter()
        seen = torch.stack([x for _, x, _ in jobs]).to(device) if args.post_qa_mode == "latent" else torch.cat(
            [rae.encode(pils[i:i + n], args.official) for i in range(0, len(pils), n)])  # the PNG's pixels, re-encoded
    if args.scaling_rounds > 1:  # (a prompt that opened no image gets empty folders: they say so)
        return keep_best(args, model, tokenizer, results, jobs, seen if jobs else None, pils)
    if args.post_qa_prompt and jobs:
        for (r, _, _), qa in zip(jobs, ask([args.post_qa_prompt] * len(jobs), seen, args.post_qa_max_new_tokens)):
            r.setdefault("post_qa", []).append(qa["text"])
        print(f"post-QA ({args.post_qa_mode}): {len(jobs)} answer(s) in {time.perf_counter() - t1:.2f}s")
    stamp, out_dir = time.strftime("%Y%m%d-%H%M%S"), Path(args.output_dir)
    for r in results:
        r["images"], r["latent_files"] = [], []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for k, (r, x, _) in enumerate(jobs):
            if pils:
                r["images"].append(write_new(out_dir, f"sample_{stamp}_{k:02d}", ".png",
                                             lambda tmp: pils[k].save(tmp, format="PNG")))
            if args.save_latent:
                r["latent_files"].append(write_new(out_dir, f"sample_{stamp}_{k:02d}_latent", ".safetensors",
                                                   lambda tmp: save_file({"latent": x.float().cpu().contiguous()}, str(tmp))))
        images, latent_files = [f for r in results for f in r["images"]], [f for r in results for f in r["latent_files"]]
        manifest = dict(
            mode=("latent-" + args.action) if args.latent else "img" if args.image else "t2i",
            images=images, latents=latent_files, seed=args.seed, model_path=args.model_path,
            decoder_repo=rae.decoder_path, encoder=rae.encoder_path, guidance_level=args.guidance_level,
            cfg_interval=args.cfg_interval, steps=args.steps or "official", dtype=str(dtype).split(".")[-1],
            device=str(device), official=args.official, input_image=args.image, input_latent=args.latent,
            post_qa=args.post_qa_prompt and dict(mode=args.post_qa_mode, prompt=args.post_qa_prompt),
            results=[dict(prompt=r["prompt"], text=r["text"], token_ids=r["token_ids"], images=r["images"],
                          latents=r["latent_files"], seeds=[s for s in r["seeds"] if s is not None],
                          image_produced=r["cond"] is not None and args.action != "qa",
                          **({"post_qa": r["post_qa"]} if "post_qa" in r else {})) for r in results])
        path = write_new(out_dir, f"sample_{stamp}_manifest", ".json",
                         lambda tmp: tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False)))
    except OSError as e:
        sys.exit(f"error: cannot write the outputs in {out_dir}: {e}")
    for r in results:
        if r["text"]:
            print(f"text: {r['text']}")
        for answer in r.get("post_qa", []):
            print(f"post-QA: {answer}")
        if r["prompt"] is not None and features is None and not r["latents"]:
            print(f"no image produced for {r['prompt']!r} (the model did not emit <im_start>)")
    for f in images + latent_files + [path]:
        print(f"wrote {f}")


def keep_best(args, model, tokenizer, results, jobs, seen, pils):
    """Test-time scaling: the model verifies every candidate (verify.py) and the --n-samples best of each prompt by
    --metric are kept, in GenEval's layout: OUT/<metric>/<index>/ the kept ones, best first, then
    OUT/candidates/<index>/ every candidate with its seed and scores (its existence marks the prompt done)."""
    t0 = time.perf_counter()
    checks = [official_checks(r["prompt"], args.post_qa_prompt or ALIGN_QUESTION, args.qa_dict and
                              args.qa_dict[r["prompt"]]) for r, _, _ in jobs]
    scores = verify(model, tokenizer, seen, *zip(*checks), args.post_qa_max_new_tokens, args.batch_size) if jobs else []
    print(f"verification ({args.post_qa_mode}): {len(jobs)} candidates in {time.perf_counter() - t0:.2f}s")
    for r in results:
        ks = [k for k, job in enumerate(jobs) if job[0] is r]  # none when the model opened no image
        candidates = [dict(seed=jobs[k][2], **scores[k]) for k in ks]
        best = select(candidates, args.metric, args.num_images)
        meta = dict(r["record"], model_path=args.model_path, guidance_level=args.guidance_level, steps=args.steps or
                    "official", post_qa_mode=args.post_qa_mode, metric=args.metric, selected=best)
        kept = Path(args.output_dir) / args.metric / f"{r['record']['index']:05d}"
        for folder, chosen in ((kept, best), (Path(args.output_dir, "candidates", kept.name), range(len(ks)))):
            if not folder.exists():  # the kept folder may be there from a run stopped before it wrote the candidates
                write_folder(folder, partial(write_prompt, [pils[ks[j]] for j in chosen], dict(
                    meta, n_samples_generated=len(chosen), text_responses={str(i): candidates[j] for i, j in
                                                                          enumerate(chosen)})))
        print(f"prompt {r['record']['index']}: kept candidates {best} of {len(ks)} in {kept}")


def write_prompt(images, meta, folder):
    """One prompt in GenEval's layout: samples/00000.png, ... and metadata.jsonl (one JSON object)."""
    (folder / "samples").mkdir()
    for k, image in enumerate(images):
        image.save(folder / "samples" / f"{k:05d}.png")
    (folder / "metadata.jsonl").write_text(json.dumps(meta, ensure_ascii=False))


if __name__ == "__main__":
    main()
