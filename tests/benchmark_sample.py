"""Speed and memory of text-to-image sampling (issue 5): prompt -> latent -> image, timed per stage and per image.

A script, not a test (pytest collects only test_*.py, and nothing here is named test_*). It builds the real
Scale-RAE-Qwen1.5B_DiT2.4B architecture (SCALE_RAE_PRESETS["qwen1.5b-dit2.4b"]) and a ViT-XL RAE decoder for SigLIP-2
latents (1152 channels, 16x16 tokens, patch 16 -> 256 px) with random weights, directly on the device, so nothing is
downloaded, and times exactly what sample.py runs for one t2i call:

    LLM      ScaleRAE.generate: prefill of a 32-token chat prompt with the KV cache, the first token, then <im_start>
             + the 256 latent queries in one block, and the diff_head_projector
    DiT      ScaleRAE.sample_latents: the official 49-evaluation schedule (or --steps N), guidance 1 = no uncond pass
    decoder  RAE.decode and the conversion to uint8 images on the host (no PNG encoding)

With random weights the greedy LLM emits some arbitrary first token; the benchmark asks for it once and passes it as
`image_start_id`, so every timed call takes the image path after one token, like a real t2i prompt (whose first token
is <im_start>, official greedy_decode). A batch of B is B prompts in one LLM pass and one DiT batch of B.

An "official-style" baseline emulates those costs of the official inference (cli.py, scale_rae_qwen2.py) that are cheap
to emulate: everything in float32, no KV cache (the full sequence re-run for each token: P, then P + 257 positions), vocabulary
logits at every position, the unused mm_projector feedback, and a doubled DiT batch when --guidance > 1 (our real
CFG costs what the official no-op CFG costs). It runs at batch 1 only, as the official loop (.item() on every token)
does. Not emulated: model loading (the fp32 checkpoint, SigLIP's text tower, the per-call decoder rebuild) and the
per-step host syncs; t2i does not run SigLIP.

    python tests/benchmark_sample.py                          # CUDA if available: the real sizes in bfloat16
    python tests/benchmark_sample.py --device cpu --threads 1 # CPU: a reduced config in float32, a few minutes
    python tests/benchmark_sample.py --batch-sizes 1 8 16 --repeats 10 --json bench.json
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from dit import dit_flops, official_timesteps  # noqa: E402
from model import SCALE_RAE_PRESETS, ScaleRAE  # noqa: E402
from rae import DECODER_PRESETS, RAE, RAEDecoder  # noqa: E402
from weights import load_strict  # noqa: E402

PRESET = "qwen1.5b-dit2.4b"
PROMPT_LEN = 32  # chat_prompt("Can you generate a photo of a cat on a windowsill?") in Qwen2.5 tokens
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # the decoder de-normalizes with its encoder's statistics
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def configs(reduced):
    """(ScaleRAEConfig, DecoderConfig). Reduced: 2 layers of width 256 everywhere, for a CPU run of a few minutes; the
    interfaces stay real (151667-token vocabulary, 256 latent tokens of 1152 channels, 256 px images)."""
    cfg, dec = SCALE_RAE_PRESETS[PRESET], DECODER_PRESETS["vit-xl"]
    if reduced:
        dit = replace(cfg.dit, hidden_size=256, depth=2, num_heads=4, z_channels=256)
        cfg = replace(cfg, hidden_size=256, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, dit=dit)
        dec = replace(dec, decoder_hidden_size=256, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                      decoder_intermediate_size=1024)
    return cfg, dec


def cast(module, dtype):
    """Cast like the checkpoint loaders do (weights.load_strict): every state-dict tensor to dtype; the tables that
    are not in a checkpoint (Qwen's RoPE frequencies, the DiT's Fourier frequencies) stay float32."""
    return load_strict(module, module.state_dict(), "random weights", dtype=dtype).eval()


def build(cfg, dec_cfg, device, dtype):
    """The model and the RAE with random weights, built on the device (tables made on the CPU are moved after)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = ScaleRAE(cfg)
        decoder = RAEDecoder(dec_cfg, cfg.mm_hidden_size, SIGLIP_MEAN, SIGLIP_STD)
    with torch.no_grad():
        for p in list(model.parameters()) + list(decoder.parameters()):
            if p.dim() > 1 and not p.any():  # adaLN-Zero layers: all-zero operands would not cost what real ones do
                p.normal_(0.0, 0.02)
    return cast(model.to(device), dtype), RAE(cast(decoder.to(device), dtype))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_token(model, prompt, batch):
    """The token the random LLM emits first for this prompt at this batch size (batch numerics may change it)."""
    gen = model.generate([prompt] * batch, stop_ids=set(), image_start_id=-1, max_new_tokens=1)
    tokens = {ids[0] for ids, _ in gen}
    if len(tokens) != 1:
        raise RuntimeError(f"identical prompts gave different first tokens {sorted(tokens)} at batch {batch}")
    return tokens.pop()


def run_ours(model, rae, prompt, token, batch, args):
    """One t2i call as sample.py makes it; seconds per stage for the whole batch."""
    device = args.device
    sync(device)
    t0 = time.perf_counter()
    gen = model.generate([prompt] * batch, stop_ids=set(), image_start_id=token, max_new_tokens=512)
    if any(cond is None for _, cond in gen):
        raise RuntimeError("a row did not take the image path")
    cond = torch.stack([cond for _, cond in gen])  # (B, 256, Z)
    sync(device)
    t1 = time.perf_counter()
    latents = model.sample_latents(cond, list(range(batch)), steps=args.steps, cfg_scale=args.guidance)  # (B, 256, C)
    sync(device)
    t2 = time.perf_counter()
    # The sampler returns float32; a bfloat16 decoder needs its own dtype (RAE.decode does not cast).
    RAE.to_pil(rae.decode(latents.to(rae.decoder.decoder_embed.weight.dtype)))  # the host copy synchronizes
    t3 = time.perf_counter()
    return {"llm": t1 - t0, "dit": t2 - t1, "decoder": t3 - t2}


def run_official_style(model, rae, prompt, token, args):
    """One batch-1 t2i call with the official loop's costs (official greedy_decode and its image step)."""
    device, embed = args.device, model.model.embed_tokens
    sync(device)
    t0 = time.perf_counter()
    x = embed(torch.tensor([prompt], device=device))  # (1, P, H)
    h = model(inputs_embeds=x)  # no KV cache
    nxt = model.logits(h).argmax(-1)[:, -1:]  # vocabulary logits at every position, float32
    if nxt.item() != token:  # one host sync per token, as official
        raise RuntimeError("the official-style loop did not take the image path")
    queries = model.model.latent_queries.to(x.dtype)[None]
    x = torch.cat([x, embed(nxt), queries], 1)  # (1, P + 257, H)
    h = model(inputs_embeds=x)  # the whole sequence again
    embed(model.logits(h)[:, -model.config.image_tokens:].argmax(-1))  # official: logits and a gather at the queries, unused
    cond = model.diff_head_projector(h[:, -model.config.image_tokens:])  # (1, 256, Z)
    sync(device)
    t1 = time.perf_counter()
    # guidance > 1 doubles the batch, as the official no-op CFG does (ours is real CFG at the same cost)
    latents = model.sample_latents(cond, [0], steps=args.steps, cfg_scale=args.guidance)
    model.model.mm_projector(latents.to(x.dtype))  # official: the feedback into the sequence, then discarded
    sync(device)
    t2 = time.perf_counter()
    RAE.to_pil(rae.decode(latents))
    t3 = time.perf_counter()
    return {"llm": t1 - t0, "dit": t2 - t1, "decoder": t3 - t2}


def peak_memory_gib(device):
    """GPU: the peak of allocated tensors since the last reset. CPU: the process's peak RSS so far (KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(name, run, batch, args, dit_flop_per_call):
    """Warm-up, then the median over repeats of each stage and of the total; per-image numbers divide by batch."""
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    for _ in range(args.warmup):
        run()
    runs = [run() for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total = statistics.median(sum(r.values()) for r in runs)
    return {"run": name, "batch": batch, **{f"{k}_s": v for k, v in med.items()}, "total_s": total,
            "ms_per_image": {k: 1e3 * v / batch for k, v in {**med, "total": total}.items()},
            "images_per_s": batch / total, "peak_gib": peak_memory_gib(args.device),
            "dit_tflops": dit_flop_per_call / med["dit"] / 1e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, help="timed runs per setting, median reported (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--steps", type=int, help="Euler steps (default: the official 49-evaluation schedule)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale; > 1 doubles the DiT batch (default 1)")
    p.add_argument("--reduced", action=argparse.BooleanOptionalAction,
                   help="the reduced config (default on CPU; --no-reduced for the real sizes)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the official-style baseline at batch 1 (default on)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default torch's choice). On a "
                                              "shared machine 1 avoids threads waiting for each other in every op")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    if args.device.type not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device}")
    on_gpu = args.device.type == "cuda"
    args.dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    args.repeats = args.repeats or (5 if on_gpu else 3)
    args.reduced = (not on_gpu) if args.reduced is None else args.reduced
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 1:
        p.error("--batch-sizes, --repeats and --warmup must be >= 1 (at least one untimed warm-up run)")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.guidance < 0:
        p.error(f"--guidance must be >= 0, got {args.guidance}")
    return args


def print_table(header, rows):
    print(header)
    cols = ["run", "batch", "LLM ms/img", "DiT ms/img", "decoder ms/img", "total ms/img", "img/s", "peak GiB",
            "DiT TFLOP/s"]
    print(f"{cols[0]:<15}" + "".join(f"{c:>{len(c) + 2}}" for c in cols[1:]))
    for r in rows:
        ms = r["ms_per_image"]
        cells = [r["batch"], f"{ms['llm']:.1f}", f"{ms['dit']:.1f}", f"{ms['decoder']:.1f}", f"{ms['total']:.1f}",
                 f"{r['images_per_s']:.2f}", f"{r['peak_gib']:.2f}", f"{r['dit_tflops']:.3g}"]
        print(f"{r['run']:<15}" + "".join(f"{v:>{len(c) + 2}}" for c, v in zip(cols[1:], cells)))


def main(argv=None):
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, dec_cfg = configs(args.reduced)
    if not args.reduced and args.device.type == "cpu":
        print("warning: the real sizes on a CPU take minutes per image", file=sys.stderr)
    t0 = time.perf_counter()
    model, rae = build(cfg, dec_cfg, args.device, args.dtype)
    sync(args.device)
    weights_gib = (torch.cuda.memory_allocated(args.device) / 2**30 if args.device.type == "cuda"
                   else peak_memory_gib(args.device))
    build_s = time.perf_counter() - t0
    nfe = len(official_timesteps()[0]) if args.steps is None else args.steps
    nfe_cost = nfe * (2 if args.guidance != 1.0 else 1)  # image-evaluations per image: CFG runs cond + uncond
    flop = dit_flops(cfg.dit)  # per image and evaluation
    prompt = torch.randint(0, 151643, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()

    rows = []
    for batch in args.batch_sizes:
        token = first_token(model, prompt, batch)
        rows.append(measure("ours", lambda: run_ours(model, rae, prompt, token, batch, args), batch, args,
                            flop * nfe_cost * batch))
    skipped = None
    if args.baseline:
        if args.dtype != torch.float32:  # the official code runs in float32; these weights are random anyway
            model, rae = cast(model, torch.float32), RAE(cast(rae.decoder, torch.float32))
        token = first_token(model, prompt, 1)
        rows.append(measure("official-style", lambda: run_official_style(model, rae, prompt, token, args), 1, args,
                            flop * nfe_cost))
    else:
        skipped = "official-style baseline skipped (--no-baseline)"

    dtype = str(args.dtype).split(".")[-1]
    size = "real sizes"
    if args.reduced:
        size = (f"reduced: Qwen {cfg.num_hidden_layers}x{cfg.hidden_size}, DiT {cfg.dit.depth}x{cfg.dit.hidden_size}, "
                f"decoder {dec_cfg.decoder_num_hidden_layers}x{dec_cfg.decoder_hidden_size}")
    device_name = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
                   else f"cpu ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()})")
    header = (f"{PRESET} ({size}) + RAE decoder {dec_cfg.image_size}px, random weights\n"
              f"{device_name}, ours in {dtype}, official-style in float32, {nfe} NFE, guidance {args.guidance}, "
              f"prompt {PROMPT_LEN} tokens, median of {args.repeats} after {args.warmup} warm-up\n"
              f"weights {weights_gib:.2f} GiB{' (process RSS)' if args.device.type == 'cpu' else ''}, "
              f"built in {build_s:.1f}s; DiT {flop / 1e12:.4g} TFLOP per image-evaluation; "
              f"peak = {'max allocated per row' if args.device.type == 'cuda' else 'process peak RSS so far'}")
    print_table(header, rows)
    if skipped:
        print(skipped)
    if args.json:
        result = {"preset": PRESET, "reduced": args.reduced, "config": asdict(cfg), "decoder": asdict(dec_cfg),
                  "device": device_name, "dtype": dtype, "nfe": nfe, "guidance": args.guidance,
                  "prompt_tokens": PROMPT_LEN, "repeats": args.repeats, "warmup": args.warmup,
                  "weights_gib": weights_gib, "build_s": build_s, "dit_flop_per_image_step": flop, "rows": rows,
                  "skipped": skipped, "torch": torch.__version__}
        path = Path(args.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)  # atomic
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
