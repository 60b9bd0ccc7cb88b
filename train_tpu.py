"""Training Scale-RAE (arXiv 2601.16208): stage 1, stage 2 and the RAE pixel decoder, in one flat SPMD script.

Defaults are the official trainer's (scale_rae/train/). Stage 1: Qwen2.5-Instruct (+ mean-initialized <im_start>,
<im_end>) with fresh latent queries, projectors and DiT, loss = CE + 2.0 x diffusion loss; stage 2 continues from its
export; the decoder stage trains RAE's pixel decoder on frozen latents (L1 + MSE, latent noise; no LPIPS, GAN or EMA).
torch_xla SPMD when PJRT_DEVICE is set (mesh (data, fsdp), FSDPv2-style sharding, one graph per step), else plain
PyTorch: one device, or one process per device under torchrun (FSDP2). Unlike the official code, a resume restores the
optimizer state, the data position (on any number of hosts) and the RNG.
"""

import argparse
import gc
import json
import math
import os
import re
import signal
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from checkpoint import Checkpoints
from data import SampleStream, batches, open_source
from dit import DIT_PRESETS, dit_flops
from encoders import denormalize, load_encoder, num_tokens, read_encoder_config
from model import (CE_CHUNK, QWEN_PRESETS, ChunkedCrossEntropy, Qwen2ForCausalLM, QwenConfig, ScaleRAE, ScaleRAEConfig,
                   at_least, checkpoint_encoder)
from rae import DECODER_PRESETS, RAEDecoder
from tokenizer import Tokenizer
from weights import WeightsError, read_config, resolve, write_atomic

# ---- Arguments ----
STAGE_DEFAULTS = {  # the official values; the decoder's are RAE's (ViT-XL recipe)
    "1": dict(lr=5.65e-5, warmup_ratio=0.0134, seq_len=512, log_every=100),
    "2": dict(lr=5.66e-5, warmup_ratio=0.03, seq_len=1024, log_every=10),
    "decoder": dict(lr=2e-4, warmup_ratio=1 / 16, seq_len=512, log_every=100),
}

# Peak dense bf16 TFLOP/s and memory (GB) per chip. TPU slice names count TensorCores: two per v4 and v5p chip.
CHIPS = dict(v4=(275, 32, 2), v5e=(197, 16, 1), v5litepod=(197, 16, 1), v5p=(459, 95, 2), v6e=(918, 32, 1),
             A100=(312, 80, 1), H100=(989, 80, 1), H200=(989, 141, 1), B200=(2250, 180, 1))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--stage", required=True, choices=["1", "2", "decoder"])
parser.add_argument("--preset", choices=["toy"], help="toy LLM, DiT and decoder (with toy.py's --encoder, --tokenizer)")
parser.add_argument("--init", help="stage 1: Qwen2.5 weights, folder or Hub id (default Qwen/Qwen2.5-1.5B-Instruct); "
                    "stage 2: a stage-1 export")
parser.add_argument("--llm", help=f"stage 1: a random LLM of this preset instead of --init ({', '.join(QWEN_PRESETS)})")
parser.add_argument("--dit", help=f"stage-1 DiT preset, default dit-2.4b ({', '.join(DIT_PRESETS)})")
parser.add_argument("--decoder", help=f"decoder preset, default vit-xl ({', '.join(DECODER_PRESETS)})")
parser.add_argument("--encoder", help="frozen encoder, folder or Hub id (stage 1 and decoder: default "
                    "google/siglip2-so400m-patch14-224; stage 2: the one named in the stage-1 config)")
parser.add_argument("--tokenizer", help="stages 1 and 2: tokenizer folder (default: the --init folder)")
parser.add_argument("--data", required=True, help="a JSONL file or a wds_manifest.json (data.py)")
parser.add_argument("--image-folder", help="root of relative image paths in a JSONL (default: its folder)")
parser.add_argument("--data-workers", type=at_least(0), help="processes decoding the images (default 8, 0 on a CPU)")
parser.add_argument("--out", required=True, help="run folder; an existing run is only continued with --resume")
parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last good checkpoint")
parser.add_argument("--steps", type=at_least(1), required=True, help="optimizer steps (the schedule's length)")
parser.add_argument("--batch-size", type=at_least(1), help="global batch (default 128 per host, as the official runs)")
parser.add_argument("--seq-len", type=at_least(2), help="fixed sequence length L (default 512 stage 1, 1024 stage 2)")
parser.add_argument("--lr", type=at_least(0, float), help="LLM/decoder lr (default: the stage's official value)")
parser.add_argument("--diff-head-lr-scale", type=at_least(0, float), default=10.0, help="diff_head lr = this x --lr")
parser.add_argument("--warmup-ratio", type=at_least(0, float, hi=1), help="linear warmup for ceil(ratio x steps) steps")
parser.add_argument("--min-lr-ratio", type=at_least(0, float, hi=1), default=0.0, help="the cosine ends at this x lr")
parser.add_argument("--clip", type=at_least(0, float), default=1.0, help="global gradient-norm clipping")
parser.add_argument("--vision-coef", type=at_least(0, float), default=2.0, help="loss = CE + this x diffusion loss")
parser.add_argument("--diffusion-timesteps-per-sample", type=at_least(1), default=1, help="stages 1 and 2: K "
                    "timesteps per image (official K-tiling: K DiT passes per LLM pass; the released runs use 1)")
parser.add_argument("--noise-tau", type=at_least(0, float), default=0.8, help="decoder: latent noise sigma ~ U(0, tau) (RAE)")
parser.add_argument("--no-grad-ckpt", action="store_true", help="keep activations, do not recompute (faster on a CPU)")
parser.add_argument("--precision", choices=["bf16", "fp32"], help="compute dtype (weights, gradients and AdamW stay "
                    "fp32); default bf16 on TPUs and GPUs, fp32 on a CPU")
parser.add_argument("--seed", type=at_least(0, hi=2**63 - 1), default=0)
parser.add_argument("--log-every", type=at_least(1))
parser.add_argument("--save-every", type=at_least(1), default=1000)
parser.add_argument("--keep", type=at_least(1), default=5, help="checkpoints kept (the official max_to_keep)")
parser.add_argument("--peak-tflops", type=at_least(0, float), help="peak TFLOP/s of one chip, for the MFU in the logs "
                    "(default: the chip's, for the chips in CHIPS)")
parser.add_argument("--backend", choices=["auto", "xla", "torch"], default="auto",
                    help="auto: torch_xla SPMD when PJRT_DEVICE is set, else plain PyTorch")
parser.add_argument("--data-parallel", type=at_least(1), help="the mesh's `data` axis size (fsdp: the rest; default 1, "
                    "or the number of TPU slices: data parallel across slices, FSDP within each)")
parser.add_argument("--plan", metavar="SLICE", help="print the parameters and the memory per chip of this run on a "
                    f"slice ({', '.join(CHIPS)}: e.g. v6e-64, v5p-64, 8xH100), then exit; no weights are read")
args = parser.parse_args()

toy = args.preset == "toy"
for k, v in STAGE_DEFAULTS[args.stage].items():
    setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
args.dit = args.dit or ("toy" if toy else "dit-2.4b")
args.decoder = args.decoder or ("toy" if toy else "vit-xl")
if args.stage == "1" and args.init and args.llm:
    parser.error("--stage 1 starts from --init weights or from a random --llm preset, not both")
if args.stage == "1" and not args.init:
    args.llm = args.llm or ("toy" if toy else None)
    args.init = None if args.llm else "Qwen/Qwen2.5-1.5B-Instruct"
if args.stage == "2" and args.init is None:
    parser.error("--stage 2 starts from a stage-1 export: pass --init")
if args.stage == "1" and args.llm and not args.tokenizer:
    parser.error("--llm trains a new LLM: pass the --tokenizer it uses")
if args.stage != "2" and args.encoder is None:
    if toy:
        parser.error("--preset toy needs the toy --encoder folder (toy.py writes one)")
    args.encoder = "google/siglip2-so400m-patch14-224"
encoder_path = args.encoder
try:  # every input is read (configs, the first data record) before anything is written
    if args.stage == "2":
        init_folder = resolve(args.init, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        init_config = ScaleRAEConfig.from_official(read_config(init_folder))
        encoder_path = encoder_path or checkpoint_encoder(init_folder, init_config)  # default: stage 1's
    if args.stage == "1" and args.init:
        llm_config = QwenConfig.from_official(read_config(resolve(args.init, allow_patterns=["*.json"])))
    enc_cls, enc, enc_processing = read_encoder_config(resolve(encoder_path, allow_patterns=["*.json"]))
    tokenizer = None if args.stage == "decoder" else Tokenizer.from_dir(  # the decoder stage reads only images
        resolve(args.tokenizer or args.init, allow_patterns=["*.json", "*.txt"]), add_image_markers=args.stage == "1")
    source = open_source(args.data, args.image_folder)
    first = next(source.read(0), dict(error="empty shard")) if source.num_shards else dict(error="no records")
except (WeightsError, OSError, ValueError) as e:
    parser.error(str(e))
if "error" in first:
    parser.error(f"--data {args.data}: its first record cannot be read ({first['error']})")
if args.stage == "2" and (num_tokens(enc), enc.hidden_size) != (init_config.image_tokens, init_config.mm_hidden_size):
    parser.error(f"the encoder {encoder_path} gives {num_tokens(enc)} tokens of {enc.hidden_size} channels; the model "
                 f"in {args.init} was trained on {init_config.image_tokens} of {init_config.mm_hidden_size}")

# ---- Setup: backend, devices, mesh, run folder ----
USE_XLA = args.backend == "xla" or (args.backend == "auto" and "PJRT_DEVICE" in os.environ)
args.backend = "xla" if USE_XLA else "torch"  # saved resolved: a checkpoint of one backend does not load in the other
out = Path(args.out)
saved_args = json.loads((out / "args.json").read_text()) if args.resume and (out / "args.json").is_file() else {}
if saved_args.get("backend") not in (None, args.backend):
    parser.error(f"the run in {out} was trained with --backend {saved_args['backend']}; resume it with that backend "
                 f"(its checkpoints hold that backend's optimizer state and RNG)")
RAM = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # a CPU's devices share it
slices = 1  # TPU slices: more than one in a multi-slice job
if args.plan:  # a slice we are not on: the model is built on the meta device, nothing is read or allocated
    plan = re.fullmatch(r"(\w+?)-(\d+)|(\d+)x(\w+)", args.plan)
    kind = plan and (plan[1] or plan[4])
    if kind not in CHIPS:
        parser.error(f"--plan {args.plan}: name a slice of known chips, e.g. v6e-64 or 8xH100 ({', '.join(CHIPS)})")
    USE_XLA, device, rank, world = False, torch.device("meta"), 0, 1
    n_devices, memory = int(plan[2]) // CHIPS[kind][2] if plan[1] else int(plan[3]), CHIPS[kind][1] * 1e9
elif USE_XLA:
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met
    import torch_xla.distributed.spmd as xs
    import torch_xla.distributed.xla_backend  # noqa: F401  (registers the xla:// rendezvous)
    import torch_xla.runtime as xr

    xr.use_spmd()
    device, rank, world = torch_xla.device(), xr.process_index(), xr.process_count()
    if world > 1:  # a CPU process group across hosts, for checkpoints and barriers
        dist.init_process_group("gloo", init_method="xla://")
    n_devices = xr.global_runtime_device_count()
    slices = len({d.get("slice_index", 0) for d in xr.global_runtime_device_attributes()})  # > 1: multi-slice TPU
    from torch_xla._internal.tpu import get_tpu_type  # from the VM's metadata: v4, v5litepod, v5p, v6e, ...
    kind = get_tpu_type() if xr.device_type() == "TPU" else None
    # The chip's memory from CHIPS: SPMD's virtual device cannot report it (xm.get_memory_info raises).
    memory = CHIPS[kind][1] * 1e9 if kind in CHIPS else RAM / n_devices if xr.device_type() == "CPU" else None
else:  # one process per device under torchrun (FSDP2 over its processes), else one device
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)  # NCCL's collectives and barriers run on the current device
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n_devices = world
    kind = next((k for k in CHIPS if cuda and k in torch.cuda.get_device_name(device)), None)
    memory = torch.cuda.get_device_properties(device).total_memory if cuda else RAM / world
args.data_parallel = args.data_parallel or slices
if n_devices % args.data_parallel or args.data_parallel % slices:
    parser.error(f"--data-parallel {args.data_parallel} must divide the {n_devices} devices and be a multiple of the "
                 f"{slices} slice(s)")
fsdp = n_devices // args.data_parallel
if USE_XLA and slices > 1:  # the `data` axis across slices (DCN: only the gradients' all-reduce), FSDP within (ICI)
    mesh = xs.HybridMesh(ici_mesh_shape=(args.data_parallel // slices, fsdp), dcn_mesh_shape=(slices, 1),
                         axis_names=("data", "fsdp"))
elif USE_XLA:
    mesh = xs.Mesh(np.arange(n_devices), (args.data_parallel, fsdp), ("data", "fsdp"))
FSDP2 = world > 1 and not USE_XLA  # torchrun: one process per device
if FSDP2:  # FSDP2's mesh: parameters sharded over `fsdp`, replicated over `data` (HSDP)
    mesh = init_device_mesh(device.type, (args.data_parallel, fsdp), mesh_dim_names=("data", "fsdp"))
on_cpu = device.type == "cpu" or USE_XLA and xr.device_type() == "CPU"
args.precision = args.precision or ("fp32" if on_cpu else "bf16")
args.data_workers = (0 if on_cpu else 8) if args.data_workers is None else args.data_workers
# Official: 128 per host. A resumed run keeps its global batch on another number of hosts.
args.batch_size = args.batch_size or saved_args.get("batch_size") or (32 * n_devices if args.plan else 128 * world)
if args.batch_size % n_devices:
    parser.error(f"--batch-size {args.batch_size} must be a multiple of the {n_devices} devices")


def fsdp_spec(p):
    """FSDP: shard a parameter over `fsdp` on its largest dimension that divides evenly (else replicate it)."""
    dims = [d for d in sorted(range(p.dim()), key=lambda d: -p.shape[d]) if p.shape[d] % fsdp == 0]
    return tuple("fsdp" if dims and d == dims[0] else None for d in range(p.dim()))


def to_device(batch):
    """Host batch -> device. Under SPMD each host passes its slice of the global batch, sharded on dim 0."""
    if not USE_XLA:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    spec = lambda t: xs.ShardingSpec(mesh, (("data", "fsdp"),) + (None,) * (t.dim() - 1), minibatch=True)  # noqa: E731
    return {k: xm.send_cpu_data_to_device([t], device, spec(t))[0] for k, t in batch.items()}


def sync():  # end of a step: compile (once) and launch the traced XLA graph; the host does not wait for it
    if USE_XLA:
        torch_xla.sync()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def log(msg):
    if rank == 0:
        print(msg, flush=True)


if out.exists() and any(out.iterdir()) and not args.plan:
    if not args.resume:
        raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if not saved_args:
        raise SystemExit(f"{out} is not empty and is not a train_tpu.py run (no args.json); choose another --out")
free = ("out", "resume", "log_every", "save_every", "keep", "peak_tflops", "data_parallel", "precision", "plan",
        "data_workers")
changed = {k: (saved_args.get(k), v) for k, v in vars(args).items()
           if saved_args and k not in free and saved_args.get(k) != v}
if changed:
    raise SystemExit(f"the run in {out} was started with other arguments (saved, now): {changed}. Resume it with "
                     f"the same ones (or edit {out / 'args.json'} if you know the change is safe).")
if (out / "export").exists():
    print(f"{out} holds a finished run (export/ exists): nothing to do")
    raise SystemExit(0)

torch.manual_seed(args.seed)  # every host builds the same initial weights (data.py seeds its own shuffling)
if USE_XLA:
    xm.set_rng_state(args.seed)

# ---- Model: what is trained, what is frozen, the loss of one batch ----
if args.plan:  # nothing is read: the model and the encoder are built, empty, on the meta device
    torch.set_default_device("meta")
if args.stage == "2":
    model = ScaleRAE(init_config) if args.plan else ScaleRAE.from_pretrained(init_folder)
# Frozen: eval mode, requires_grad False; replicated over the devices.
encoder = enc_cls(enc, enc_processing).requires_grad_(False) if args.plan else load_encoder(encoder_path)

if args.stage == "1":
    if not args.init:  # a toy LLM from scratch: its vocabulary is the tokenizer's
        llm_config = replace(QWEN_PRESETS[args.llm], vocab_size=len(tokenizer))
    # The DiT generates the encoder's tokens: its grid and channels are the encoder's (16 x 16 x 1152 for SigLIP-2).
    dit = replace(DIT_PRESETS[args.dit], in_channels=encoder.hidden_size, input_size=math.isqrt(encoder.num_tokens))
    model = ScaleRAE(ScaleRAEConfig(**vars(llm_config), dit=dit, mm_hidden_size=encoder.hidden_size,
                                    encoder=encoder_path, tokenizer_model_max_length=args.seq_len))
    if args.init and not args.plan:  # Qwen2.5's weights; latent queries, projectors, DiT: fresh (official init)
        llm = Qwen2ForCausalLM.from_pretrained(args.init)
        missing, unexpected = model.load_state_dict(llm.state_dict(), strict=False)
        assert not unexpected and all(k.startswith(("model.latent_queries", "model.mm_projector", "diff_head"))
                                      for k in missing), (missing, unexpected)
    if args.init:
        model.resize_token_embeddings(len(tokenizer))  # + <im_start>, <im_end>, mean-initialized rows (official)

if args.stage == "decoder":
    model = RAEDecoder(DECODER_PRESETS[args.decoder], encoder.hidden_size, encoder.image_mean, encoder.image_std)
    out_size = model.config.image_size

    def compute_loss(batch):
        """L1 + MSE between the decoded noisy latents and the image, in [0, 1] pixels."""
        with torch.no_grad():
            z = encoder.encode(batch["pixel_values"])  # (B, T, C)
            sigma = args.noise_tau * torch.rand(z.shape[0], 1, 1, device=z.device)
            z = z + sigma * torch.randn_like(z)  # RAE's noise augmentation: a decoder robust to imperfect latents
            target = denormalize(batch["pixel_values"], encoder.image_mean, encoder.image_std)
            if target.shape[-1] != out_size:  # e.g. a 256px decoder on a 224px encoder
                target = F.interpolate(target, size=(out_size, out_size), mode="bicubic", align_corners=False)
        err = model(z) - target  # (B, 3, H, W), every row an image: the decoder stage's stream is images-only
        l1, mse = (e.mean((1, 2, 3)).sum() / len(e) for e in (err.abs(), err.pow(2)))
        return l1 + mse, dict(l1=l1, mse=mse)
else:
    def compute_loss(batch):
        with torch.no_grad():
            features = encoder.encode(batch["pixel_values"])  # (B, T, C) frozen latents: input and target
        loss, ce, diff = model.training_loss(batch["input_ids"], batch["labels"], features, batch["image_is_target"],
                                             args.vision_coef, args.diffusion_timesteps_per_sample,
                                             static_shapes=USE_XLA)
        if FSDP2:  # FSDP2 averages the processes' gradients: weigh each one's means by its share of the global
            # batch's labelled tokens and answer images, so the average is the global batch's means, as SPMD has them
            n = torch.stack([(batch["labels"][:, 1:] != -100).sum(), batch["image_is_target"].sum()]).float()
            total = n.clone()
            dist.all_reduce(total)
            ce, diff = (v * world * k / t.clamp(min=1) for v, k, t in zip((ce, diff), n, total))
            loss = ce + args.vision_coef * diff
        return loss, dict(ce=ce, diff=diff)

model.train()  # the DiT's CFG condition dropout is on in training mode
n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)


def memory_per_chip():
    """Bytes per chip, on paper: fp32 weights, gradients and AdamW's two moments sharded over `fsdp`, the frozen encoder
    replicated, and the activations of the batch's share. A transformer block holds s*b*h*(34 + 5*heads*s/h) bytes at
    16 bits (Korthikanti et al. 2022, attention scores materialized as XLA does); with recompute only its input stays,
    plus one block's internals in the backward."""
    b, act = args.batch_size / n_devices, 2 if args.precision == "bf16" else 4

    def stack(n, seqs, s, h, heads):  # n transformer blocks over `seqs` sequences of s tokens of width h
        inner = seqs * s * h * (34 + 5 * heads * s / h) * act / 2
        return n * inner if args.no_grad_ckpt else n * seqs * s * h * act + inner
    c = model.config
    if args.stage == "decoder":
        acts = stack(c.decoder_num_hidden_layers, b, encoder.num_tokens + 1, c.decoder_hidden_size,
                     c.decoder_num_attention_heads)
    else:
        d, K = c.dit, args.diffusion_timesteps_per_sample
        acts = stack(c.num_hidden_layers, b, args.seq_len, c.hidden_size, c.num_attention_heads)
        acts += stack(d.depth, b * K, encoder.num_tokens, d.hidden_size, d.num_heads)
        acts += c.vocab_size * (3 * b * min(args.seq_len, CE_CHUNK) * 4 + c.hidden_size * act)  # CE chunk, LM head
    return dict(weights=4 * n_params / fsdp, gradients=4 * n_params / fsdp, adamw=8 * n_params / fsdp,
                encoder=sum(p.numel() * p.element_size() for p in encoder.parameters()), activations=acts)


need = memory_per_chip()
GiB = 2 ** 30
log(f"stage {args.stage}: {n_params / 1e6:.2f}M trainable parameters, encoder {encoder_path} (frozen), "
    f"{'torch_xla SPMD on ' + str(n_devices) + ' devices, ' + str(world) + ' host(s)' if USE_XLA else device}, "
    f"{args.precision}; per chip at {args.batch_size // n_devices} samples, on paper: "
    + " + ".join(f"{k} {v / GiB:.3g}" for k, v in need.items()) + f" = {sum(need.values()) / GiB:.3g} GiB"
    + (f" of {memory / GiB:.1f} GiB" if memory else "") + (f" ({kind})" if kind else ""))
if memory and sum(need.values()) > memory:
    raise SystemExit(f"this run needs about {sum(need.values()) / GiB:.1f} GiB per chip, more than its "
                     f"{memory / GiB:.1f} GiB: lower --batch-size or --seq-len, add chips, or keep recompute on")
if args.plan:
    raise SystemExit(0)
if rank == 0 and not saved_args:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "args.json", json.dumps(vars(args), indent=1).encode())
barrier()

blocks = model.decoder_layers if args.stage == "decoder" else [*model.model.layers, *model.diff_head.model.dit_blocks]
if not args.no_grad_ckpt:  # recompute blocks in the backward (official FSDPv2); torch_xla's adds optimization barriers
    if USE_XLA:
        from torch_xla.distributed.fsdp import checkpoint_module
    else:
        from torch.utils.checkpoint import checkpoint

        def checkpoint_module(module):
            forward = module.forward
            module.forward = lambda *a, **k: checkpoint(forward, *a, use_reentrant=False, **k)
    for block in blocks:
        checkpoint_module(block)

if USE_XLA and args.stage != "decoder":  # vocabulary rows padded to a multiple of 2048: they shard evenly over any
    # power-of-two fsdp, and a resume on another slice reads the same shapes. Never read (-inf logits), not exported.
    for m in [model.model.embed_tokens] + ([] if model.config.tie_word_embeddings else [model.lm_head]):
        m.weight = torch.nn.Parameter(F.pad(m.weight.detach(), (0, 0, 0, -model.config.vocab_size % 2048)))
model.to(device)
encoder.to(device)
if USE_XLA:  # einsum Linear: keeps the batch sharding through matmuls (pytorch/xla#3811); before the optimizer
    from torch_xla.distributed.spmd.xla_sharding import apply_xla_patch_to_nn_linear
    apply_xla_patch_to_nn_linear(model)
    apply_xla_patch_to_nn_linear(encoder)
    for p in model.parameters():
        xs.mark_sharding(p, mesh, fsdp_spec(p))
    # Block outputs and their gradients sharded on the batch (FSDPv2's shard_output), whatever the parameters' sharding
    batch_axes = (("data", "fsdp"), None, None)  # (B, L, H): the batch over every device
    for block in blocks if args.stage != "decoder" else []:  # (the decoder's blocks need no constraint)
        block.register_forward_hook(lambda module, inputs, h: xs.mark_sharding_with_gradients(h, mesh, batch_axes))
    # The LM head whole once for all the CE's chunks (else each gathers it); w * 1: the parameter keeps its sharding
    ChunkedCrossEntropy.gather = lambda w: xs.mark_sharding_with_gradients(w * 1, mesh, (None, None))
elif FSDP2:  # each block's parameters gathered for its forward and backward, then freed
    for block in blocks:
        fully_shard(block, mesh=mesh)
    # The rest (embeddings, LM head, projectors, the DiT's ends) stays gathered from the forward to the backward: the
    # losses use it after the forward's last block, where FSDP2 would otherwise free it.
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    if args.stage != "decoder":  # the loss is a method, not forward: it gathers the parameters outside the blocks
        register_fsdp_forward_method(model, "training_loss")
    torch.manual_seed(args.seed + rank)  # the same weights on every process, but each its own noise and timesteps

head = [p for n, p in model.named_parameters() if "diff_head" in n and p.requires_grad]
rest = [p for n, p in model.named_parameters() if "diff_head" not in n and p.requires_grad]
groups = [dict(params=rest, lr=args.lr, betas=(0.9, 0.999) if args.stage != "decoder" else (0.9, 0.95))]
if head:
    groups.append(dict(params=head, lr=args.lr * args.diff_head_lr_scale, betas=(0.9, 0.95)))
optimizer = torch.optim.AdamW(groups, eps=1e-8, weight_decay=0.0)
for p in rest + head:  # AdamW's state now: sharded like p, ready to be restored into
    state = optimizer.state[p] = dict(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                      exp_avg_sq=torch.zeros_like(p))
    if USE_XLA:
        for t in (state["exp_avg"], state["exp_avg_sq"]):
            xs.mark_sharding(t, mesh, fsdp_spec(p))
sync()  # materialize it: a checkpoint is restored into device buffers
base_lrs = [g["lr"] for g in optimizer.param_groups]
warmup = math.ceil(args.warmup_ratio * args.steps)


def lr_factor(step):
    """HF's cosine schedule (as patched by the official code), with `step` optimizer steps already taken."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))


def flops_per_sample():
    """Training FLOPs of one sample, for the MFU: 3 x forward (the backward is 2 x forward) of the trained model,
    matmuls (2 x parameters x tokens) and attention scores, plus the frozen encoder's forward."""
    flops = 2 * sum(p.numel() for p in encoder.parameters()) * encoder.num_tokens
    c = model.config
    if args.stage == "decoder":
        T = encoder.num_tokens + 1  # + the cls token
        fwd = 2 * sum(p.numel() for p in model.parameters()) * T
        fwd += 4 * c.decoder_num_hidden_layers * T * T * c.decoder_hidden_size
    else:
        L = args.seq_len  # LLM layers, the LM head (tied to the embedding) and attention, then the DiT K times
        fwd = 2 * L * (sum(p.numel() for p in model.model.layers.parameters()) + c.vocab_size * c.hidden_size)
        fwd += 4 * c.num_hidden_layers * L * L * c.hidden_size + dit_flops(c.dit) * args.diffusion_timesteps_per_sample
    return flops + 3 * fwd


def train_step(batch):
    with torch.autocast("xla" if USE_XLA else device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        loss, parts = compute_loss(batch)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(rest + head, args.clip)
    grad_norm = grad_norm.full_tensor() if FSDP2 else grad_norm  # FSDP2: a DTensor, the global norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss.detach(), **{k: v.detach() for k, v in parts.items()}, grad_norm=grad_norm)


# ---- Data: this host's shard of the stream, fixed-shape batches ----
stream = SampleStream(source, tokenizer, args.seq_len, rank=rank, world=world, seed=args.seed,
                      images_only=args.stage == "decoder", image_tokens=encoder.num_tokens,
                      preprocess=encoder.preprocess, workers=args.data_workers, prefetch=2 * args.batch_size // world)


# ---- Checkpoints (checkpoint.py): written in the background; the newest intact one resumes ----
ckpts = Checkpoints(out, args.keep, xla=USE_XLA)


def save_checkpoint(step):
    rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None,
               xla=xm.get_rng_state() if USE_XLA else None)  # the steps' draws: timesteps, noise, CFG dropout
    ckpts.save(step, dict(model=model.state_dict(), optimizer=optimizer.state_dict()),
               host=dict(step=step, data=stream.state_dict(), rng=rng))


def load_checkpoint(path):
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict())
    hosts = ckpts.load(path, state)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # state_dict() tensors alias the parameters, and torch.distributed.checkpoint leaves reference cycles around
    # them; while an alias lives, XLA must also output it after each in-place update: another graph.
    del state
    gc.collect()
    stream.load_state_dict([h["data"] for h in hosts])  # this host's share of what is left of the epoch
    host = hosts[rank % len(hosts)]  # the step and the RNG: its own when the number of hosts is the same
    sync()  # the restored tensors become device buffers before the first step is traced
    torch.set_rng_state(host["rng"]["torch"])  # the RNG last: every XLA sync advances the device RNG
    if host["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(host["rng"]["cuda"])
    if host["rng"]["xla"] is not None:
        xm.set_rng_state(host["rng"]["xla"])
    if FSDP2 and len(hosts) != world:  # new processes: draws of their own (a copied RNG would repeat another's noise)
        torch.manual_seed(args.seed + world * host["step"] + rank)
    return host["step"]


start = 0
ckpts.remove_interrupted()
for path in reversed(ckpts.list()):
    problem = ckpts.check(path)
    if problem is None:
        try:
            start = load_checkpoint(path)
            log(f"resumed from {path} at step {start}")
            break
        except (Exception, CheckpointException) as e:  # a BaseException, CheckpointException included
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    log(f"skipping checkpoint {path}: {problem}")
else:
    if ckpts.list():
        raise SystemExit(f"no intact checkpoint in {out} (why: above); to start over from step 0, move the "
                         f"ckpt-* folders out of it and --resume again")

# ---- Preemption: on SIGTERM (a preemptible or spot VM's notice; torchrun passes it on) every process ends its step,
# they save that step together, and the run exits for a --resume instead of losing the steps since the last save ----
notified = []
signal.signal(signal.SIGTERM, lambda signum, frame: notified.append(signum))
# Beside the training's NCCL. Hosts may reach its all-reduce far apart (a first compile takes minutes): 2 h, not 30 min
notice_group = dist.new_group(backend="gloo", timeout=timedelta(hours=2)) if dist.is_initialized() else None


def preempted():  # by any process: all of them stop at the same step (a host-side all-reduce, no device wait)
    flag = torch.tensor(len(notified))
    if notice_group is not None:
        dist.all_reduce(flag, group=notice_group)
    return bool(flag)


# ---- Training loop ----
meter = dict(time=time.perf_counter(), step=start)
total_flops = flops_per_sample() * args.batch_size
peak_tflops = args.peak_tflops or kind in CHIPS and CHIPS[kind][0]
tokens_per_sample = args.seq_len if args.stage != "decoder" else encoder.num_tokens


def report(step, metrics, lrs):
    """Log a step, from its values on the device (read one step late: see the loop)."""
    now = time.perf_counter()
    dt, steps = now - meter["time"], step - meter["step"]
    meter.update(time=now, step=step)
    if FSDP2:  # each process's share of the global means (compute_loss): their average
        for v in metrics.values():
            dist.all_reduce(v)
    rec = dict(step=step, **{k: v.item() / (world if FSDP2 else 1) for k, v in metrics.items()}, lr=lrs[0])
    rec |= dict(lr_diff_head=lrs[1]) if len(lrs) > 1 else {}
    rec["samples_per_s"] = steps * args.batch_size / dt
    rec["tokens_per_s"] = rec["samples_per_s"] * tokens_per_sample
    if peak_tflops:
        rec["mfu"] = steps * total_flops / dt / (peak_tflops * 1e12 * n_devices)
    rec["eta_s"] = round((args.steps - step) * dt / steps)
    rec |= dict(compiles=met.counter_value("UncachedCompile") or 0) if USE_XLA else {}
    if rank == 0:
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()), flush=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def read(step, metrics, lrs, bad):
    """A logged step's values, or a save's check (metrics None): they wait for the device to compute them."""
    if bad.item():  # never checkpoint weights that a non-finite gradient has reached
        last = ckpts.list()[-1].name if ckpts.list() else "none"
        raise SystemExit(f"non-finite loss or gradient norm by step {step}: stopping. The last good "
                         f"checkpoint ({out / last}) is untouched.")
    if metrics is not None:
        report(step, metrics, lrs)


batch_iter = batches(stream, args.batch_size // world, encoder.image_size)  # from the resumed position
bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss or gradient so far
pending = None  # a logged step, read once the next one is launched: then the device has that one to run meanwhile
for step in range(start + 1, args.steps + 1):
    batch = to_device(next(batch_iter))
    for g, base in zip(optimizer.param_groups, base_lrs):
        # A Python float is passed to XLA as data, so a new value does not recompile the step. Equal numbers are
        # passed as one value, though, and at step 1 some coincide (lr 0 in both groups; Adam's first bias
        # correction 1 - 0.9 equals 1 - beta1): step 1 compiles a graph of its own, every later step reuses one.
        g["lr"] = base * lr_factor(step - 1)
    metrics = train_step(batch)
    bad = bad | ~torch.isfinite(metrics["loss"]) | ~torch.isfinite(metrics["grad_norm"])
    sync()
    if pending:
        read(*pending)
    logged = step % args.log_every == 0 or step == args.steps
    pending = (step, metrics, [g["lr"] for g in optimizer.param_groups], bad) if logged else None
    if (stopping := preempted()) or step % args.save_every == 0 or step == args.steps:  # checked now, then saved
        read(*(pending or (step, None, None, bad)))
        pending = None
        save_checkpoint(step)
    if stopping:
        ckpts.wait()
        log(f"SIGTERM: stopped at step {step}, saved in {out / f'ckpt-{step}'}; continue with --resume")
        raise SystemExit(128 + signal.SIGTERM)
ckpts.wait()  # the last checkpoint complete, or its error raised
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from here a SIGTERM just ends the run: a --resume exports

# ---- Export: the official on-disk format (sample.py loads it). Each sharded tensor is gathered by all processes (SPMD:
# .cpu()) as rank 0 writes it: no host holds the whole model (but for the decoder's model.pt, a pickle of 0.42 B) ----
state = model.state_dict()
if USE_XLA:  # without the vocabulary's padding rows (lazy slices: only they are gathered)
    state |= {k: state[k][:model.config.vocab_size] for k in ("model.embed_tokens.weight", "lm_head.weight")
              if k in state}
full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t.cpu()  # noqa: E731
made = []  # the tensors rank 0 has made whole
try:
    if rank == 0:
        tokenizers = [] if args.stage == "decoder" else [tokenizer]
        model.save_pretrained(out / "export", *tokenizers, state_dict=state, full=lambda t: made.append(t) or full(t))
        log(f"exported {out / 'export'}")
finally:  # the other processes' part in each gather, in rank 0's order; rank 0's too if its write failed part-way
    for t in list(state.values())[len(made):]:
        full(t)
barrier()
