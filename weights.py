"""Reading and writing official weights: a Hub id or a local folder in, tensors with their official names out.

Every component loads through the same functions, so every loader behaves the same way:
  resolve(path)              a local folder as is, or a Hub repo downloaded once into the huggingface_hub cache;
  read_config / from_dict    config.json, and a config dataclass from it (unknown keys ignored);
  read_safetensors(folder)   `model.safetensors` or a sharded `model.safetensors.index.json`, memory-mapped;
  load_strict(module, sd)    every missing, unexpected or mis-shaped key in one error (official: strict=False, silent).
  save_safetensors(sd, path) the format written a tensor at a time, so a sharded model is gathered one tensor at a time.
Modules are built on the `meta` device and filled with `assign=True`, so a 7B model never exists twice in RAM.
Files and folders are written under a temporary name and renamed when complete, so a crash never leaves half of one.
"""

import json
import os
import secrets
import shutil
import tempfile
import warnings
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open


class WeightsError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not match the model it is loaded into."""


def resolve(path_or_repo, allow_patterns=None):
    """A local folder, or a Hub repo id fetched (and cached) with huggingface_hub. Returns the folder as a Path."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"{path} is a file; pass the folder that contains it (or a Hub repo id)")
    name = str(path_or_repo)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise WeightsError(f"{name!r} is neither a local folder nor a Hub repo id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except Exception as e:  # offline, unknown/gated/invalid repo, ...: one readable line instead of a traceback wall
        raise WeightsError(f"could not get {name!r} from the Hugging Face Hub ({type(e).__name__}: "
                           f"{(str(e) or ' ').splitlines()[0]}); download it with network access (`huggingface-cli "
                           f"download {name}`) or pass its local folder") from None


def read_config(folder, name="config.json"):
    path = Path(folder) / name
    if not path.is_file():
        raise WeightsError(f"{path} not found: expected a {name} next to the weights")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e})") from None


def from_dict(cls, d):
    """A config dataclass from a Hugging Face config dict; unknown keys are ignored, absent ones keep the defaults."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def safetensors_files(folder):
    """The shard files of a checkpoint folder: a single model.safetensors, or those named by the index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index ({e!r})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        raise WeightsError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    for f in files:
        if not f.is_file():
            raise WeightsError(f"{f} is named by the index but missing (incomplete download?)")
    return files


def read_safetensors(folder, prefix="", keep=None, cast=lambda name, tensor: tensor):
    """{name: tensor} of the tensors whose name starts with `prefix` (stripped), memory-mapped on the CPU. `keep`, name
    prefixes (after stripping), limits what is read: `vision_model.` of a full SigLIP never touches the text tower.
    `cast` (see caster) converts each tensor as it is read: host memory holds one mapped shard at a time."""
    out = {}
    for f in safetensors_files(folder):
        try:
            with safe_open(f, framework="pt", device="cpu") as st:
                for k in st.keys():
                    name = k[len(prefix):]
                    if k.startswith(prefix) and (keep is None or name.startswith(keep)):
                        out[name] = cast(name, st.get_tensor(k))
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{f} is corrupt or truncated ({e}); delete it and download it again") from None
    return out


def write_atomic(path, write):
    """Write `path` under a new temporary name in its folder, then rename it: a failed write leaves nothing, no other
    file is touched, the file gets the user's umask. `write` is the bytes, or a callable write(tmp_path)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        tmp.write_bytes(write) if isinstance(write, bytes) else write(tmp)
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers (safetensors' save_file) replace it with a private (0600) file
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(folder):
    """ValueError now, not after minutes of work, if `folder` (if absent: its nearest existing parent) is unwritable."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        tempfile.TemporaryFile(dir=existing).close()  # NotADirectoryError when `existing` is a file
    except OSError as e:
        raise ValueError(f"cannot write in {folder}: {e}") from None


def write_folder(folder, write):
    """Write `folder` as `folder.tmp` with `write(tmp_path)`, then rename it; a killed write's `.tmp` is discarded."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists; write to a new folder")
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    tmp.rename(folder)
    return folder


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(state_dict, path, metadata=None, dtype=None, full=lambda t: t):
    """Write a state dict as safetensors (in `dtype`, default each tensor's own), atomically and one tensor at a time:
    full(t) makes each tensor whole only when its turn comes, so a model sharded over processes is gathered tensor by
    tensor and never whole in a host's memory."""
    dtypes = {k: dtype or t.dtype for k, t in state_dict.items()}
    header, end = {"__metadata__": metadata} if metadata else {}, 0
    for k, t in state_dict.items():  # the header needs only shapes: it is written first
        n = t.numel() * dtypes[k].itemsize
        header[k] = dict(dtype=SAFETENSORS_DTYPES[dtypes[k]], shape=list(t.shape), data_offsets=[end, end + n])
        end += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data 8-byte aligned, as safetensors writes it

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for k, t in state_dict.items():  # in the header's order, each made whole when its turn comes
                whole = full(t.detach()).to("cpu", dtypes[k]).contiguous()
                if whole.shape != t.shape:
                    raise ValueError(f"{k}: full() gave shape {tuple(whole.shape)}, not {tuple(t.shape)}")
                f.write(whole.reshape(-1).view(torch.uint8).numpy())
    write_atomic(path, write)


def caster(module, dtype=None, device="cpu"):
    """(name, tensor) -> the tensor as `module` holds it, on `device`: parameters in `dtype` (default: the module's),
    floating buffers (fixed tables: positions, rotation angles) in float32, so a bfloat16 model keeps exact angles."""
    params = dict(module.named_parameters())

    def cast(name, t):
        keep = (dtype or params[name].dtype) if name in params else torch.float32
        return t.to(device, keep if t.is_floating_point() else t.dtype)
    return cast


def load_strict(module: nn.Module, state_dict, what, dtype=None, device="cpu", harmless=()):
    """Load `state_dict` into `module` (built on `meta`) after checking every key; returns it on `device`, in eval mode.
    Keys in `harmless` (unused tensors, such as MAE's `mask_token`) are dropped with a warning. Non-persistent buffers
    (tables the module computes) are not in the file and keep their values; the others are cast by caster()."""
    extra = [k for k in harmless if state_dict.pop(k, None) is not None]
    if extra:
        warnings.warn(f"{what}: ignoring {extra}, which the model does not use")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        def show(title, items):
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "") if items else ""
        raise WeightsError(f"{what} does not match the model" + show("missing", missing)
                           + show("unexpected", unexpected) + show("wrong shape", mismatched))
    cast = caster(module, dtype, device)
    for k, v in state_dict.items():  # in place (a no-op for what read_safetensors cast), one tensor at a time
        state_dict[k] = cast(k, v)
    module.load_state_dict(state_dict, strict=False, assign=True)
    meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if meta:
        raise WeightsError(f"{what}: these tensors were neither in the file nor recomputed: {meta[:12]}")
    return module.to(device).eval()
