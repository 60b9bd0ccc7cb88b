"""The Qwen2.5 tokenizer and the chat template, in one place for sampling, training and data.

Official Scale-RAE checkpoints ship the "slow" tokenizer files (vocab.json, merges.txt, added_tokens.json,
tokenizer_config.json), saved by transformers' pure-Python Qwen2Tokenizer. We build the same byte-level BPE with the
`tokenizers` library (as transformers' Qwen2 fast converter does): NFC normalization, the Qwen2 pre-tokenizer regex,
byte-level alphabet, and added/special tokens split out before BPE. A `tokenizer.json`, when present, is used as is.

Prompts use the official `qwen_2` ChatML template (conversation.py, conv_qwen) with SYSTEM_PROMPT, byte-identical to
Qwen2.5's template with that system prompt (not Qwen2.5's default, which the checkpoints' tokenizer_config.json has).
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"  # stands for 256 image slots; never reaches the BPE
IMAGE_TOKEN = -200  # the input id of an image slot (official IMAGE_TOKEN_INDEX)
IMAGE_START, IMAGE_END = "<im_start>", "<im_end>"  # Scale-RAE's image markers (added tokens)
IMAGE = IMAGE_START + IMAGE_PLACEHOLDER + IMAGE_END  # an image in a turn (official mm_use_im_start_end)
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"  # ChatML turn markers; <|im_end|> ends generation
PAD = "<|endoftext|>"  # the official training pad token
SPECIAL_TOKENS = (PAD, CHAT_START, CHAT_END, IMAGE_START, IMAGE_END)  # added after the BPE vocabulary, in Qwen's order

# Qwen2's pre-tokenizer regex (transformers tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def turn(role, content):
    """One ChatML turn, as the official preprocess_qwen template writes it."""
    return f"{CHAT_START}{role}\n{content}{CHAT_END}\n"


def chat_prompt(user, image=False):
    """The inference prompt. With `image`, the user turn starts with `<im_start><image><im_end>\\n` (official cli)."""
    user = f"{IMAGE}\n{user}" if image else user
    return turn("system", SYSTEM_PROMPT) + turn("user", user) + f"{CHAT_START}assistant\n"


def _added_tokens(folder):
    """(content, special, id) of every added token, from added_tokens.json and tokenizer_config.json."""
    cfg_path, path = folder / "tokenizer_config.json", folder / "added_tokens.json"
    decoder = json.loads(cfg_path.read_text()).get("added_tokens_decoder", {}) if cfg_path.is_file() else {}
    tokens = {int(idx): (t["content"], t.get("special", True)) for idx, t in decoder.items()}
    for content, idx in (json.loads(path.read_text()) if path.is_file() else {}).items():
        tokens.setdefault(int(idx), (content, True))
    return [tokens[i] + (i,) for i in sorted(tokens)]


def build_bpe(vocab, merges):
    """Qwen2's byte-level BPE from a vocab dict and a merges list (no added tokens yet)."""
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def read_merges(path):
    merges = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        line = line.strip()
        if line and not (i == 0 and line.startswith("#version")):
            a, b = line.split(" ")
            merges.append((a, b))
    return merges


class Tokenizer:
    """encode/decode plus the ids of the special tokens, all resolved from the files (no hard-coded ids)."""

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        ids = {name: tok.token_to_id(name) for name in (CHAT_START, CHAT_END, IMAGE_START, IMAGE_END, PAD)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; a Scale-RAE tokenizer must define them")
        self.chat_start, self.chat_end = ids[CHAT_START], ids[CHAT_END]
        self.image_start, self.image_end, self.pad = ids[IMAGE_START], ids[IMAGE_END], ids[PAD]

    @classmethod
    def from_dir(cls, folder, add_image_markers=False):
        """tokenizer.json if present, else the slow-format files (vocab.json + merges.txt + added tokens).
        add_image_markers: append <im_start> and <im_end> when the files lack them, as the official
        initialize_vision_tokenizer does to the Qwen2.5 tokenizer at the start of stage 1 (ids 151665, 151666)."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = build_bpe(json.loads((folder / "vocab.json").read_text(encoding="utf-8")),
                            read_merges(folder / "merges.txt"))
            # Added tokens go in id order; each keeps its id from the files (they follow the BPE vocabulary).
            for content, special, idx in _added_tokens(folder):
                added = AddedToken(content, special=special, normalized=False)
                (tok.add_special_tokens if special else tok.add_tokens)([added])
                if tok.token_to_id(content) != idx:
                    raise ValueError(f"added token {content!r} has id {tok.token_to_id(content)} but the files say {idx}")
        else:
            raise FileNotFoundError(f"no tokenizer in {folder}: need tokenizer.json, or vocab.json and merges.txt")
        if add_image_markers:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (IMAGE_START, IMAGE_END)
                                    if tok.token_to_id(t) is None])
        return cls(tok)

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_with_image(self, text, image_tokens):
        """Token ids with every `<image>` replaced by its image_tokens slots, IMAGE_TOKEN each (official
        tokenizer_image_token, then the expansion to one slot per encoder token)."""
        ids = []
        for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids += [IMAGE_TOKEN] * image_tokens
            ids += self.encode(chunk)
        return ids

    def save(self, folder):
        """tokenizer.json plus the slow-format files the official loader reads, so an export loads in both codebases."""
        folder = Path(folder)
        self.tok.save(str(folder / "tokenizer.json"))
        bpe = json.loads(self.tok.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        added = self.tok.get_added_tokens_decoder()  # {id: AddedToken}
        (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (folder / "added_tokens.json").write_text(json.dumps({t.content: i for i, t in added.items()}))
        decoder = {str(i): dict(content=t.content, lstrip=False, normalized=False, rstrip=False, single_word=False,
                                special=t.special) for i, t in added.items()}
        specials = [t.content for t in added.values() if t.special and t.content != PAD]
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(
            added_tokens_decoder=decoder, additional_special_tokens=specials, bos_token=None, eos_token=CHAT_END,
            pad_token=PAD, unk_token=None, errors="replace", tokenizer_class="Qwen2Tokenizer",
            add_prefix_space=False, split_special_tokens=False), indent=2))
