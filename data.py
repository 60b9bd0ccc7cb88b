"""Training data for Scale-RAE: the two official formats in, fixed-shape token/label/image batches out, and a
synthetic captioned-shapes dataset that goes through the same readers.

Reference: the official trainer (ZitengWangNYU/Scale-RAE), scale_rae/train/spmd_trainer.py (`preprocess_qwen`,
`LazySupervisedDataset`, `DataCollatorForSupervisedDataset`) and scale_rae/train/webdataset_trainer.py.

Formats (§1.1 of the training notes):
  JSONL         one sample per line: {"image": path | [path], "conversations": [{"from": "human"|"gpt", "value"}],
                "metadata": {}}; relative image paths are joined with `image_folder` (default: the JSONL's folder).
  WebDataset    a manifest named like `wds_manifest.json`, {"tars": [...]}, listing tar shards (relative paths are
                taken from the manifest's folder); each sample is a `.json` member {"conversations", "metadata",
                "image_filename"} plus the image member it names, read with the standard library's tarfile.

Sample -> tokens (§1.2), as `preprocess_qwen` does with `--version qwen_2 --mm_use_im_start_end True`:
  the system turn "You are a helpful assistant." is always prepended; every ChatML turn is tokenized on its own;
  labels are -100 except on assistant turns (header `<|im_start|>assistant\\n` included) and on the ids of "\\n",
  `<|im_start|>` and `<|im_end|>`, which are labelled everywhere; `<image>` becomes `<im_start><image><im_end>` and
  its one placeholder expands to 256 slots, IMAGE_TOKEN (-200) in input_ids and -100 in labels. An image in an
  assistant turn is a generation target (its slots hold the latent queries, and CE trains `<im_end>` from the last
  one); in a user turn it is understanding input. Rows are right-padded with `<|endoftext|>` / -100 to a fixed L.

The stream of samples (what the official code does, and where we differ):
  * Sharding: the epoch's shard order is shuffled with seed+epoch (the same order on every host), and host `rank`
    takes shards rank, rank+world, ... (the official round robin). A tar is a shard; a JSONL file is random access,
    so each line is its own shard and the epoch order is a full permutation (the official RandomSampler).
  * Shuffling: the official WebDataset path never shuffled: `set_epoch` is not forwarded through MpDeviceLoader, so
    tars are read in manifest order with no sample buffer (training notes §1.1). We shuffle the shard order every
    epoch and the samples within blocks of `buffer_size` consecutive records; `shuffle=False` reads in file order.
  * The stream is endless (epochs follow each other), so hosts never run dry at different steps; training is
    counted in steps. The position (epoch, shard, offset, taken) names the start of the current shuffle block and
    how many of its records were consumed; a block is re-read and re-permuted on restore, so resuming is exact.
  * Bad samples never stop a run: they are skipped and counted in `stream.stats` (the official code resamples a
    random index instead, which changes the stream). A missing tar image member is a bad image here; the official
    code silently turned such a sample into a text-only one.
"""

import functools
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tokenizer import IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START, SYSTEM_PROMPT, turn
from weights import write_atomic

log = logging.getLogger(__name__)

IGNORE_INDEX = -100   # label of tokens the loss skips
IMAGE_TOKEN = -200    # input id of an image slot (official IMAGE_TOKEN_INDEX)
IMAGE_TOKENS = 256    # slots per image: 16x16 patches of a 224px image at patch 14
ROLES = {"human": "user", "gpt": "assistant"}  # official names -> ChatML roles; other roles pass through, masked


class Skip(Exception):
    """A sample that cannot be trained on; `reason` is the key it is counted under in `stream.stats`."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------------------------
# Sample -> token ids and labels

@functools.lru_cache(maxsize=4)
def _fixed_ids(tokenizer):
    """The system turn's ids, and the ids labelled everywhere: "\\n", <|im_start|>, <|im_end|> (official list)."""
    newline = tokenizer.encode("\n")
    if len(newline) != 1:
        raise ValueError(f"the tokenizer encodes '\\n' as {newline}, not as one token")
    return tokenizer.encode(turn("system", SYSTEM_PROMPT)), {newline[0], tokenizer.chat_start, tokenizer.chat_end}


def encode_conversation(tokenizer, conversations, has_image, max_len, image_tokens=IMAGE_TOKENS):
    """(input_ids, labels, image_is_target) of one sample, unpadded, at most max_len long.

    Raises Skip("malformed") for a conversation it cannot read, Skip("too_many_images") for more than one
    `<image>`, Skip("too_long") for an image sample longer than max_len once expanded (text-only ones are truncated).
    """
    try:  # official field names from/value; role/content are read too, as official
        turns = [(t.get("from", t.get("role")), t.get("value", t.get("content"))) for t in conversations]
    except (AttributeError, TypeError):
        raise Skip("malformed", "conversations must be a list of {from, value} objects") from None
    turns = [(ROLES.get(role, role), content) for role, content in turns]
    if not turns or any(not isinstance(r, str) or not isinstance(c, str) for r, c in turns):
        raise Skip("malformed", "empty conversation or a turn without a role/text")
    if has_image and not any(IMAGE_PLACEHOLDER in c for _, c in turns):
        turns[0] = (turns[0][0], f"{IMAGE_PLACEHOLDER}\n{turns[0][1]}")  # official: the image goes before turn 1
    if turns[0][0] != "user":
        turns = turns[1:]  # official: a conversation starts with the human turn
    n_placeholders = sum(c.count(IMAGE_PLACEHOLDER) for _, c in turns)
    if n_placeholders > 1:
        raise Skip("too_many_images", f"{n_placeholders} <image> placeholders (max 1 image per sample)")
    if n_placeholders != has_image:
        raise Skip("malformed", "an <image> placeholder without an image" if n_placeholders else
                   "an image whose placeholder is not in a user/assistant turn")

    system, unmasked = _fixed_ids(tokenizer)
    ids, labels, image_is_target = list(system), [IGNORE_INDEX] * len(system), False
    for role, content in turns:
        trained = role == "assistant"
        if IMAGE_PLACEHOLDER in content:
            content = content.replace(IMAGE_PLACEHOLDER, IMAGE_START + IMAGE_PLACEHOLDER + IMAGE_END)
            image_is_target = trained
        piece = tokenizer.encode_with_image(turn(role, content), IMAGE_TOKEN)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    labels = [i if i in unmasked else lab for i, lab in zip(ids, labels)]

    if has_image:  # one placeholder -> image_tokens slots that the loss skips
        p = ids.index(IMAGE_TOKEN)
        ids[p:p + 1] = [IMAGE_TOKEN] * image_tokens
        labels[p:p + 1] = [IGNORE_INDEX] * image_tokens
        if len(ids) > max_len:  # official check_image_tokens: never cut into or after an image
            raise Skip("too_long", f"{len(ids)} tokens with the image expanded > max_len {max_len}")
    return ids[:max_len], labels[:max_len], image_is_target


def pad_to(ids, labels, max_len, pad_id):
    """Right padding to a fixed length (official collator): input_ids with the pad id, labels with -100."""
    n = max_len - len(ids)
    return (torch.from_numpy(np.array(ids + [pad_id] * n, dtype=np.int64)),  # numpy: 5x faster than torch.tensor(list)
            torch.from_numpy(np.array(labels + [IGNORE_INDEX] * n, dtype=np.int64)))


# --------------------------------------------------------------------------------------------------------------
# Readers. A source is a list of shards; read(shard, start) yields that shard's records from index `start` on.
# A record is {"key", "conversations", "metadata", "images": [path or bytes or None (missing)]} or {"key", "error"}.

def load_image(src, name=None):
    """A PIL RGB image from a path or the bytes of an image file; ValueError naming it when unreadable."""
    name = name or str(src)
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            return im.convert("RGB")  # convert() decodes the whole file, so a truncated one fails here
    except Exception as e:  # OSError/UnidentifiedImageError, DecompressionBombError, SyntaxError from bad headers
        raise ValueError(f"cannot read image {name}: {type(e).__name__}: {e}") from None


def _image_list(value):
    """The official `_has_image`: a path or a list of paths; '', None, 'None', 'nan' mean no image."""
    if value is None or str(value) in ("", "None", "none", "nan"):
        return []
    return list(value) if isinstance(value, list) else [value]


class JsonlSource:
    """A JSONL file, indexed by line byte offsets once (as the official `_build_offset_index`); one line = one shard."""

    def __init__(self, path, image_folder=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL data file {self.path} not found")
        self.image_folder = Path(image_folder) if image_folder is not None else self.path.parent
        self.offsets, off = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    self.offsets.append(off)
                off += len(line)
        self._file = None

    @property
    def num_shards(self):
        return len(self.offsets)

    def read(self, shard, start=0):
        if start > 0:
            return
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(self.offsets[shard])
        key = f"{self.path.name}:{shard + 1}"
        try:
            d = json.loads(self._file.readline())
            images = [p if os.path.isabs(p) else str(self.image_folder / p) for p in _image_list(d.get("image"))]
            yield dict(key=key, conversations=d["conversations"], metadata=d.get("metadata", {}), images=images)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            yield dict(key=key, error=f"{type(e).__name__}: {e}")


class TarSource:
    """WebDataset-style tar shards listed in a manifest; JSON members in sorted name order (official)."""

    def __init__(self, manifest):
        self.manifest = Path(manifest)
        try:
            tars = json.loads(self.manifest.read_text())["tars"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.manifest} is not a WebDataset manifest with a 'tars' list ({e})") from None
        self.tars = [p if os.path.isabs(p) else str(self.manifest.parent / p) for p in tars]
        missing = [p for p in self.tars if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} tar shard(s) of {self.manifest} not found, e.g. {missing[0]}")

    @property
    def num_shards(self):
        return len(self.tars)

    def read(self, shard, start=0):
        path = self.tars[shard]
        try:
            tar = tarfile.open(path, "r")
            members = sorted((m for m in tar.getmembers() if m.name.endswith(".json")), key=lambda m: m.name)
        except (OSError, tarfile.TarError) as e:
            if start == 0:  # one record stands for the whole shard, so positions after it stay valid
                yield dict(key=path, error=f"unreadable tar shard: {e}", shard_error=True)
            return
        with tar:
            for m in members[start:]:
                key = f"{os.path.basename(path)}/{m.name}"
                try:
                    d = json.loads(tar.extractfile(m).read())
                    name = d.get("image_filename")
                    images = [] if name is None else [self._member_bytes(tar, name)]
                    yield dict(key=key, conversations=d["conversations"], metadata=d.get("metadata", {}), images=images)
                except (OSError, tarfile.TarError, ValueError, KeyError, TypeError, AttributeError) as e:
                    yield dict(key=key, error=f"{type(e).__name__}: {e}")

    @staticmethod
    def _member_bytes(tar, name):
        try:
            f = tar.extractfile(name)
        except KeyError:
            return None  # counted as a bad image when the sample is used
        return None if f is None else f.read()


def open_source(path, image_folder=None):
    """The official dispatch: a `.json` whose name contains 'wds' is a WebDataset manifest, anything else JSONL."""
    path = Path(path)
    if path.suffix == ".json" and "wds" in path.name:
        return TarSource(path)
    return JsonlSource(path, image_folder)


# --------------------------------------------------------------------------------------------------------------
# The stream: sharded, shuffled, resumable; samples out, bad ones counted

@dataclass
class Sample:
    input_ids: torch.Tensor  # (L,) int64, IMAGE_TOKEN at the image slots, pad id after the text
    labels: torch.Tensor     # (L,) int64, -100 where the loss skips
    image: Image.Image | None
    image_is_target: bool    # the image is in an assistant turn (generation), not a user turn (understanding)
    key: str
    metadata: dict


class SampleStream:
    """Endless iterator of `Sample`s for data-parallel host `rank` of `world` (see the module docstring).

    max_len: the fixed sequence length L (official model_max_length). buffer_size: records shuffled together.
    epochs: stop after this many (None: never stop). images_only: skip text-only samples (the decoder stage reads
    only the images; with tokenizer None, samples carry no tokens). `stats` counts records read, samples used, and skips by reason.
    """

    def __init__(self, source, tokenizer, max_len, rank=0, world=1, seed=0, shuffle=True, buffer_size=1000,
                 epochs=None, image_tokens=IMAGE_TOKENS, images_only=False):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        if tokenizer is None and not images_only:
            raise ValueError("a SampleStream without a tokenizer can only read images (images_only=True)")
        if source.num_shards < world:
            raise ValueError(f"{source.num_shards} shard(s) cannot feed {world} hosts: write at least one per host")
        self.source, self.tokenizer, self.max_len, self.image_tokens = source, tokenizer, max_len, image_tokens
        self.rank, self.world, self.seed, self.shuffle, self.epochs = rank, world, seed, shuffle, epochs
        self.buffer_size = buffer_size if shuffle else 1
        self.images_only = images_only
        self.position = dict(epoch=0, shard=0, offset=0, taken=0)
        self.stats = Counter()

    def host_shards(self, epoch):
        """This host's shards for an epoch: the seed+epoch permutation (identical on all hosts), round robin."""
        order = list(range(self.source.num_shards))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order[self.rank::self.world]

    def _records(self, epoch, shard, offset):
        """(record, shard, offset) from a position on, with the position just after each record."""
        shards = self.host_shards(epoch)
        for s in range(shard, len(shards)):
            start = offset if s == shard else 0
            for i, record in enumerate(self.source.read(shards[s], start), start + 1):
                yield record, s, i

    def __iter__(self):
        while self.epochs is None or self.position["epoch"] < self.epochs:
            epoch, shard, offset, taken = (self.position[k] for k in ("epoch", "shard", "offset", "taken"))
            whole_epoch, used = (shard, offset, taken) == (0, 0, 0), self.stats["used"]
            records = self._records(epoch, shard, offset)
            while block := list(islice(records, self.buffer_size)):
                order = list(range(len(block)))
                if self.shuffle:  # keyed by the block's start, so a restored stream draws the same permutation
                    random.Random(f"{self.seed}/{self.rank}/{epoch}/{shard}/{offset}").shuffle(order)
                for j in range(taken, len(block)):
                    self.position = dict(epoch=epoch, shard=shard, offset=offset, taken=j + 1)
                    sample = self._sample(block[order[j]][0])
                    if sample is not None:
                        yield sample
                _, shard, offset = block[-1]  # the next block starts here
                taken = 0
            if whole_epoch and self.stats["used"] == used:  # an endless stream would otherwise spin forever
                raise RuntimeError(f"no usable sample in a whole epoch of host {self.rank}'s data: {dict(self.stats)}")
            self.position = dict(epoch=epoch + 1, shard=0, offset=0, taken=0)

    def _sample(self, record):
        self.stats["read"] += 1
        try:
            if "error" in record:
                raise Skip("bad_shard" if record.get("shard_error") else "malformed", record["error"])
            images = record["images"]
            if len(images) > 1:
                raise Skip("too_many_images", f"{len(images)} images (max 1 per sample)")
            if self.images_only and not images:
                raise Skip("no_image", "text-only sample in an images-only stream")
            if self.tokenizer is None:  # an images-only stream (the decoder stage) reads no text
                ids, labels, is_target = None, None, False
            else:
                ids, labels, is_target = encode_conversation(self.tokenizer, record["conversations"], bool(images),
                                                             self.max_len, self.image_tokens)
            image = None
            if images:
                if images[0] is None:
                    raise Skip("bad_image", "image member missing from the tar")
                try:
                    image = load_image(images[0], name=record["key"] if isinstance(images[0], bytes) else None)
                except ValueError as e:
                    raise Skip("bad_image", str(e)) from None
        except Skip as e:
            self.stats[e.reason] += 1
            n = self.stats[e.reason]
            if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th, ... of each kind; all are counted
                log.warning("skipped sample %s (%s; %d so far)", record["key"], e, n)
            return None
        self.stats["used"] += 1
        if ids is None:
            return Sample(None, None, image, is_target, record["key"], record["metadata"])
        input_ids, labels = pad_to(ids, labels, self.max_len, self.tokenizer.pad)
        return Sample(input_ids, labels, image, is_target, record["key"], record["metadata"])

    def state_dict(self):
        """The position after the last sample yielded, plus what must match on restore, plus the skip counts."""
        return dict(position=dict(self.position), stats=dict(self.stats), rank=self.rank, world=self.world,
                    seed=self.seed, shuffle=self.shuffle, buffer_size=self.buffer_size,
                    num_shards=self.source.num_shards)

    def load_state_dict(self, state):
        for k in ("rank", "world", "seed", "shuffle", "buffer_size"):
            if state[k] != getattr(self, k):
                raise ValueError(f"data position saved with {k}={state[k]} cannot resume a stream with "
                                 f"{k}={getattr(self, k)}")
        if state["num_shards"] != self.source.num_shards:
            raise ValueError(f"data position saved for {state['num_shards']} shards, "
                             f"the data now has {self.source.num_shards}")
        self.position, self.stats = dict(state["position"]), Counter(state["stats"])


# --------------------------------------------------------------------------------------------------------------
# Batches with static shapes

def collate(samples, preprocess, image_size=224):
    """The batch dict: input_ids/labels (B, L) int64, pixel_values (B, 3, S, S) float32 (zeros where no image),
    has_image (B,) bool, image_is_target (B,) bool. `preprocess` maps a list of PIL images to (n, 3, S, S)."""
    has_image = torch.tensor([s.image is not None for s in samples])
    images = [s.image for s in samples if s.image is not None]
    pixels = preprocess(images).float() if images else torch.zeros(0, 3, image_size, image_size)
    if tuple(pixels.shape) != (len(images), 3, image_size, image_size):
        raise ValueError(f"preprocess gave {tuple(pixels.shape)} for {len(images)} images, expected "
                         f"({len(images)}, 3, {image_size}, {image_size})")
    if len(images) < len(samples):  # zeros where there is no image (official text-only rows)
        pixel_values = torch.zeros(len(samples), 3, image_size, image_size)
        pixel_values[has_image] = pixels
    else:
        pixel_values = pixels
    batch = dict(pixel_values=pixel_values,                            # (B, 3, S, S)
                 has_image=has_image,                                  # (B,)
                 image_is_target=torch.tensor([s.image_is_target for s in samples]))
    if samples[0].input_ids is not None:  # an images-only stream without a tokenizer has no tokens
        batch.update(input_ids=torch.stack([s.input_ids for s in samples]),  # (B, L)
                     labels=torch.stack([s.labels for s in samples]))        # (B, L)
    return batch


def batches(stream, batch_size, preprocess, image_size=224):
    """Batches of exactly batch_size samples (the last partial one is dropped). After each batch,
    `stream.state_dict()` is the position right after it, ready to be saved with a checkpoint."""
    it = iter(stream)
    while len(chunk := list(islice(it, batch_size))) == batch_size:
        yield collate(chunk, preprocess, image_size)


# --------------------------------------------------------------------------------------------------------------
# Synthetic captioned shapes (a toy dataset that needs no download)

SHAPES = ("circle", "square", "triangle")
# Every shape color has a channel <= 60 and every background channel is >= 200, so an analyzer can tell shape
# pixels from background ones by their darkest channel, and the colors are far apart from each other.
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
          "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20)}
BACKGROUNDS = {"white": (250, 250, 250), "light gray": (218, 218, 218), "pale blue": (215, 228, 245),
               "cream": (245, 238, 210), "pale green": (220, 240, 220), "pale pink": (245, 222, 228)}
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

ANCHORS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78), "center": (0.5, 0.5)}
# Shapes sit on a GRID x GRID grid of cells (at 64 px: the toy encoder's 8 x 8 tokens of 8 px): a small shape fills
# one cell, a large one 2 x 2, one empty cell apart, and a two-tone background splits on a cell edge. So a token holds
# a background, a whole small shape or a quarter of a large one, and nothing else: a small vocabulary of token
# contents that a toy DiT learns. (Shapes at any offset made it draw token-sized blobs: shape at chance even with
# the true attributes as its condition.)
GRID = 8
SIZE_CELLS = {"small": 1, "large": 2}
SIZE_FRACTION = {s: n / GRID for s, n in SIZE_CELLS.items()}  # side / image side, as the analyzer reads it
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}
REQUESTS = ("Can you generate a photo of {}?", "Generate an image of {}.", "Please draw {}.", "Show me {}.",
            "Create a picture of {}.")
QUESTIONS = {  # attribute -> phrasings; {is}/{noun} agree with the count
    "color": ("What color {is} the {noun}?", "Which color {is} the {noun} in this image?"),
    "shape": ("What shape is shown in the image?", "Which kind of shape can you see?"),
    "count": ("How many shapes are there?", "How many shapes can you see in the image?"),
    "position": ("Where {is} the {noun}?", "In which part of the image {is} the {noun}?"),
    "size": ("{Is} the {noun} small or large?",),
}
GENERATION_ANSWER = "Here you go:\n<image>"  # the official data's answer (docs/Train.md)


@dataclass(frozen=True)
class Shapes:
    """What one synthetic image shows; saved as the sample's `metadata` (plus the pixel boxes) for evaluation."""
    shape: str
    color: str
    count: int
    size: str
    position: str
    background: tuple = ("white",)  # one name, or two for a two-tone background
    split: str | None = None        # "vertical"/"horizontal" line between the two tones


def describe(s):
    """'two small red circles on the left'."""
    what = f"{s.size} {s.color} {s.shape}" + ("s" if s.count > 1 else "")
    return f"{'a' if s.count == 1 else COUNT_WORDS[s.count]} {what} {WHERE[s.position]}"


def generation_prompt(s, phrasing=0):
    return REQUESTS[phrasing % len(REQUESTS)].format(describe(s))


def generation_answer(s):
    """'Here are two small red circles on the left:\n<image>': the request restated before the image, where the
    official data answers GENERATION_ANSWER. Stage 1 starts from a pretrained Qwen2.5, whose states at the latent
    queries already carry the request; the toy LLM starts from scratch, and with the official answer its query states
    stay alike for every prompt (cosine 0.999 after 600 steps), so the DiT learns to ignore them. Restating the
    request (a CE target) puts its content right before <im_start>."""
    return f"Here {'is' if s.count == 1 else 'are'} {describe(s)}:\n{IMAGE_PLACEHOLDER}"


def random_shapes(rng, holdout=()):
    """Uniform attributes; (color, shape) pairs in `holdout` are never drawn (for compositional evaluation)."""
    if {(c, s) for c in COLORS for s in SHAPES} <= set(holdout):
        raise ValueError("the holdout excludes every (color, shape) pair: nothing left to draw")
    while True:
        s = Shapes(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randint(1, 3), rng.choice(SIZES),
                   rng.choice(POSITIONS))
        if (s.color, s.shape) not in holdout:
            break
    if rng.random() < 0.5:
        return s
    return Shapes(s.shape, s.color, s.count, s.size, s.position, tuple(rng.sample(list(BACKGROUNDS), 2)),
                  rng.choice(("vertical", "horizontal")))


def layout(s):
    """The grid cells of s's shapes (top-left corners (x0, y0)): a row of s.count shapes one cell apart, vertical on
    the left/right and horizontal elsewhere, centered on the position's anchor. One layout per (count, size,
    position), so the prompt alone says where each shape token goes. (Random offsets of up to one cell made no
    difference to an oracle-conditioned toy DiT after 900 steps; one layout is simpler.)"""
    n = SIZE_CELLS[s.size]
    ax, ay = ANCHORS[s.position]
    vertical = s.position in ("left", "right")
    across = round((ax if vertical else ay) * GRID - n / 2)
    start = round((ay if vertical else ax) * GRID - (s.count * n + s.count - 1) / 2)
    return [(across, start + k * (n + 1)) if vertical else (start + k * (n + 1), across) for k in range(s.count)]


def render_shapes(s, rng, image_size=224):
    """(image, boxes): s drawn on its grid layout at 2x and downsampled (smooth edges)."""
    W, cell = 2 * image_size, 2 * image_size / GRID
    img = Image.new("RGB", (W, W), BACKGROUNDS[s.background[0]])
    draw = ImageDraw.Draw(img)
    if s.split == "vertical":
        draw.rectangle((rng.randint(3, 5) * cell, 0, W, W), fill=BACKGROUNDS[s.background[1]])
    elif s.split == "horizontal":
        draw.rectangle((0, rng.randint(3, 5) * cell, W, W), fill=BACKGROUNDS[s.background[1]])
    side = SIZE_CELLS[s.size] * cell
    boxes = []
    for cx0, cy0 in layout(s):
        x0, y0 = cx0 * cell, cy0 * cell
        x1, y1 = x0 + side - 1, y0 + side - 1  # PIL's boxes include their last pixel: the shape stays in its cells
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=COLORS[s.color])
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=COLORS[s.color])
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=COLORS[s.color])
        boxes.append([round(v / 2) for v in (x0, y0, x0 + side, y0 + side)])
    return img.resize((image_size, image_size), Image.LANCZOS), boxes


def shapes_sample(seed, index, image_size=224, understanding_fraction=0.5, holdout=()):
    """(record, image) of sample `index`: the same for a given seed whatever the dataset size. A record has the
    official fields: conversations and metadata (attributes, pixel boxes, task, question, answer)."""
    rng = random.Random(seed * 1_000_003 + index)
    s = random_shapes(rng, holdout)
    image, boxes = render_shapes(s, rng, image_size)
    meta = dict(asdict(s), background=list(s.background), boxes=boxes)
    if rng.random() < understanding_fraction:
        attr = rng.choice(list(QUESTIONS))
        one = s.count == 1
        agree = {"is": "is" if one else "are", "Is": "Is" if one else "Are", "noun": "shape" if one else "shapes"}
        question = rng.choice(QUESTIONS[attr]).format(**agree)
        answer = COUNT_WORDS[s.count] if attr == "count" else getattr(s, attr)
        conversations = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                         {"from": "gpt", "value": answer}]
        meta.update(task="understanding", question=attr, answer=answer)
    else:
        conversations = [{"from": "human", "value": generation_prompt(s, rng.randrange(len(REQUESTS)))},
                         {"from": "gpt", "value": generation_answer(s)}]
        meta.update(task="generation")
    return dict(conversations=conversations, metadata=meta), image


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shapes_dataset(folder, n, seed=0, image_size=224, understanding_fraction=0.5, holdout=(),
                         formats=("jsonl", "wds"), samples_per_tar=1000):
    """Write n synthetic samples in the official formats: `data.jsonl` + `images/` and/or `wds_manifest.json` +
    `shards/*.tar`. Returns {format: path to pass to open_source}. Every file is written atomically."""
    if not set(formats) <= {"jsonl", "wds"} or not formats:
        raise ValueError(f"formats must be a subset of ('jsonl', 'wds'), got {formats}")
    folder = Path(folder)
    samples = []  # (record, PNG bytes): compressed, so a large dataset fits in memory while it is written
    for i in range(n):
        record, image = shapes_sample(seed, i, image_size, understanding_fraction, holdout)
        samples.append((record, _png(image)))
    names = [f"sample_{i:06d}" for i in range(n)]
    out = {}
    if "jsonl" in formats:
        (folder / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for name, (record, png) in zip(names, samples):
            write_atomic(folder / "images" / f"{name}.png", png)
            lines.append(json.dumps(dict(image=f"images/{name}.png", **record)))
        write_atomic(folder / "data.jsonl", ("\n".join(lines) + "\n").encode())
        out["jsonl"] = folder / "data.jsonl"
    if "wds" in formats:
        (folder / "shards").mkdir(parents=True, exist_ok=True)
        tars = []
        for t in range(0, n, samples_per_tar):
            tars.append(f"shards/shard_{t // samples_per_tar:05d}.tar")
            tmp = folder / f"{tars[-1]}.tmp"
            with tarfile.open(tmp, "w") as tar:
                for name, (record, png) in zip(names[t:t + samples_per_tar], samples[t:t + samples_per_tar]):
                    meta = json.dumps(dict(record, image_filename=f"{name}.png")).encode()
                    for member, blob in ((f"{name}.json", meta), (f"{name}.png", png)):
                        info = tarfile.TarInfo(member)
                        info.size = len(blob)  # mtime stays 0: the same seed gives byte-identical tars
                        tar.addfile(info, io.BytesIO(blob))
            os.replace(tmp, folder / tars[-1])
        manifest = dict(dataset_name=f"shapes-seed{seed}", tars=tars, samples_per_tar_assumption=samples_per_tar,
                        estimated_total_samples=n)
        write_atomic(folder / "wds_manifest.json", json.dumps(manifest, indent=1).encode())
        out["wds"] = folder / "wds_manifest.json"
    return out


# --------------------------------------------------------------------------------------------------------------
# Analyzer: the attributes a shapes image shows, read back deterministically (no learning), for evaluation

# (color, shape) pairs the toy model never sees in training (its data is written with holdout=TOY_HOLDOUT): the
# compositional held-out set of evaluate.py. Each color and each shape still appears with other partners.
TOY_HOLDOUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
SCORED = ("color", "shape", "position", "count")  # what a prompt is scored on (GenEval-like); size is reported too

PALETTE = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)  # (12, 3) shapes first
NOISE_AREA = 0.002  # components smaller than this fraction of the image (~1/4 of a small triangle) are noise
EDGE = 0.2  # coverage below EDGE counts as 0, above 1 - EDGE as 1: ringing, noise and JPEG leave the shape's size
FILL_TRIANGLE, FILL_SQUARE = 0.69, 0.87  # bounding-box fill: triangle 1/2 < 0.69 < circle π/4 < 0.87 < square 1


def connected_components(mask):
    """(labels, n): the 4-connected components of a boolean (H, W) mask, labelled 1..n (0 = background).

    Each pixel starts with its own flat index; labels then propagate as the minimum over 4-neighbours, with pointer
    jumping (a label is the index of a pixel of the same component, so label <- label[label] skips ahead), until
    nothing changes. Plain numpy: a few dozen vectorized passes."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big).ravel()
        for _ in range(4):
            fg = new < big
            new[fg] = new[new[fg]]
        new = new.reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, labels = np.unique(lab, return_inverse=True)
    labels = labels.reshape(h, w) + 1
    labels[~mask] = 0
    return labels, int((roots < big).sum())


def blend(pixels, color):
    """(coverage, residual) of pixels (..., 3) seen as blends a·color + (1 - a)·B, with a in [0, 1] and the background
    B (of the six) that fits best: anti-aliased or blurred edges get their partial coverage, and the residual says
    how well `color` explains the pixel at all."""
    bg = PALETTE[len(COLORS):]                                    # (6, 3)
    d = np.asarray(color, np.float32) - bg                        # (6, 3) background -> color
    pd = pixels @ d.T - (bg * d).sum(-1)                          # (..., 6) (p - B)·d, as matrix products
    dd = (d * d).sum(-1)
    a = (pd / dd).clip(0, 1)
    pb = (pixels ** 2).sum(-1, keepdims=True) - 2 * pixels @ bg.T + (bg ** 2).sum(-1)  # |p - B|^2
    residual = pb - 2 * a * pd + a * a * dd                       # |p - B - a·d|^2
    best = residual.argmin(-1)[..., None]
    return np.take_along_axis(a, best, -1)[..., 0], np.take_along_axis(residual, best, -1)[..., 0]


def _dilate(m):  # a boolean mask grown by one pixel (4-neighbours)
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def shape_class(fill):
    """circle, square or triangle from the fraction of its bounding box a shape fills."""
    return "triangle" if fill < FILL_TRIANGLE else "circle" if fill < FILL_SQUARE else "square"


def analyze_shapes(image):
    """The attributes a synthetic shapes image shows: dict(color, shape, position, count, size); None where a value
    cannot be read (an image without shapes has count 0 and nothing else). Works at any size (>= 48 px is reliable).

    Every pixel takes the nearest palette entry (6 shape colors, 6 backgrounds, far apart: see COLORS); shape pixels
    are those nearest a shape color. color: the shape color whose blends with the backgrounds fit the most shape
    pixels best (a blurred red edge is nearer orange than red, but it is a red blend). The 4-connected components
    of the shape pixels, minus noise (smaller than NOISE_AREA of the image or than 1/5 of the largest), are the
    shapes, and count is their number. Each shape is measured on its coverage by the dominant color (sub-pixel;
    EDGE clips faint and near-full values) over the component grown by one pixel: area = sum of coverage,
    width/height = sums of the column/row maxima. shape: the majority class by fill = area / (width x height) (ties:
    the larger area); position: the anchor nearest the mean of the box centers; size: the SIZE_FRACTION nearest the
    median side. Blur, noise and stray pixels (generated images) are tolerated: stray pixels form noise components,
    and the color vote is a majority."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    h, w = pixels.shape[:2]
    nearest = ((PALETTE ** 2).sum(-1) - 2 * pixels @ PALETTE.T).argmin(-1)  # (H, W) nearest palette entry
    mask = nearest < len(COLORS)
    out = dict(color=None, shape=None, position=None, count=0, size=None)
    if not mask.any():
        return out
    fits = np.stack([blend(pixels[mask], c)[1] for c in PALETTE[:len(COLORS)]])  # (6, N) residual per color
    dominant = np.bincount(fits.argmin(0), minlength=len(COLORS)).argmax()
    out["color"] = list(COLORS)[dominant]
    labels, n = connected_components(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = [i + 1 for i in range(n) if areas[i] >= max(NOISE_AREA * h * w, 0.2 * areas.max())]
    out["count"] = len(keep)
    if not keep:
        return out
    alpha = ((blend(pixels, PALETTE[dominant])[0] - EDGE) / (1 - 2 * EDGE)).clip(0, 1)  # (H, W) coverage
    votes, centers, sides = Counter(), [], []
    for k in keep:
        component = labels == k
        a = np.where(_dilate(component) & ~(mask & ~component), alpha, 0)  # never another shape's pixels
        if not a.any():  # a shape of another color (generated images): measured on its own pixels
            a = component.astype(np.float32)
        cols, rows = a.max(0), a.max(1)
        width, height = cols.sum(), rows.sum()
        votes[shape_class(a.sum() / (width * height))] += 1 + a.sum() / (h * w)  # a vote per shape; area breaks ties
        xs, ys = np.arange(w), np.arange(h)
        centers.append((((cols * xs).sum() / width + 0.5) / w, ((rows * ys).sum() / height + 0.5) / h))
        sides.append((width / w + height / h) / 2)
    out["shape"] = votes.most_common(1)[0][0]
    cx, cy = np.mean(centers, 0)
    out["position"] = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)
    side = float(np.median(sides))
    out["size"] = min(SIZE_FRACTION, key=lambda s: abs(SIZE_FRACTION[s] - side))
    return out


# Understanding questions and their short answers, as the training samples ask them (shapes_sample)
ANSWERS = {"color": tuple(COLORS), "shape": SHAPES, "count": tuple(COUNT_WORDS.values()), "position": POSITIONS,
           "size": SIZES}


def shapes_question(s, attribute, phrasing=0):
    """(question, answer) about attribute `attribute` of Shapes `s`, worded as in the training data."""
    one = s.count == 1
    agree = {"is": "is" if one else "are", "Is": "Is" if one else "Are", "noun": "shape" if one else "shapes"}
    phrasings = QUESTIONS[attribute]
    answer = COUNT_WORDS[s.count] if attribute == "count" else getattr(s, attribute)
    return phrasings[phrasing % len(phrasings)].format(**agree), answer


def read_answer(text, attribute):
    """The first word of a free-text answer that is a possible answer to `attribute` ('Two circles.' -> 'two' for
    count, 'circle' for shape; digits count as words), or None."""
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        word = COUNT_WORDS.get(int(word), word) if word.isdigit() else word
        for candidate in (word, word[:-1] if word.endswith("s") else None):
            if candidate in ANSWERS[attribute]:
                return candidate
    return None
