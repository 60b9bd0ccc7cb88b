"""Training data for Scale-RAE: the two official formats in, fixed-shape token/label/image batches out.

Reference: the official trainer, scale_rae/train/{spmd_trainer.py (preprocess_qwen, LazySupervisedDataset, the
collator), webdataset_trainer.py}. Formats: JSONL, one {"image", "conversations", "metadata"} per line (image paths
relative to the JSONL's folder); WebDataset, a `*wds*.json` manifest {"tars": [...]} of tar shards whose `.json` members
name their image member. Tokens as preprocess_qwen (qwen_2, mm_use_im_start_end): a system turn, each ChatML turn
tokenized alone, labels only on assistant turns and on "\n", <|im_start|>, <|im_end|>; `<image>` becomes <im_start> +
256 IMAGE_TOKEN slots + <im_end>: a generation target in an assistant turn, understanding input in a user turn. Where we
differ: the official WebDataset path never shuffles (set_epoch is lost in MpDeviceLoader) and resamples a bad sample at
random; here shard order and blocks of `buffer_size` records of a shard are shuffled per epoch, bad samples are
skipped and counted, and the hosts' saved positions resume an epoch exactly, on as many hosts or on another number.
"""

import functools
import json
import logging
import multiprocessing
import os
import random
import signal
import tarfile
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from encoders import load_image
from tokenizer import IMAGE, IMAGE_PLACEHOLDER, IMAGE_TOKEN, SYSTEM_PROMPT, turn

log = logging.getLogger(__name__)

IGNORE_INDEX = -100   # label of tokens the loss skips
IMAGE_TOKENS = 256    # slots per image: 16x16 patches of a 224px image at patch 14
ROLES = {"human": "user", "gpt": "assistant"}  # official names -> ChatML roles; other roles pass through, masked


class Skip(Exception):
    """A sample that cannot be trained on; `reason` is the key it is counted under in `stream.stats`."""

    def __init__(self, reason, detail="", key=None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.key = reason, detail, key

    def __reduce__(self):  # a worker process returns it
        return Skip, (self.reason, self.detail, self.key)


# ---- Sample -> token ids and labels ----
@functools.lru_cache(maxsize=4)
def _fixed_ids(tokenizer):
    """The system turn's ids, and the ids labelled everywhere: "\\n", <|im_start|>, <|im_end|> (official list)."""
    newline = tokenizer.encode("\n")
    if len(newline) != 1:
        raise ValueError(f"the tokenizer encodes '\\n' as {newline}, not as one token")
    return tokenizer.encode(turn("system", SYSTEM_PROMPT)), {newline[0], tokenizer.chat_start, tokenizer.chat_end}


def encode_conversation(tokenizer, conversations, has_image, max_len, image_tokens=IMAGE_TOKENS):
    """(input_ids, labels, image_is_target) of one sample, unpadded, at most max_len long (text is truncated, an image
    sample too long is Skip("too_long")); Skip("malformed") or Skip("too_many_images") for what cannot be read."""
    try:  # official field names from/value; role/content are read too, as official
        turns = [(t.get("from", t.get("role")), t.get("value", t.get("content"))) for t in conversations]
        turns = [(ROLES.get(role, role), content) for role, content in turns]  # a list or dict role: TypeError
    except (AttributeError, TypeError):
        raise Skip("malformed", "conversations must be a list of {from, value} objects") from None
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
            content = content.replace(IMAGE_PLACEHOLDER, IMAGE)
            image_is_target = trained
        piece = tokenizer.encode_with_image(turn(role, content), image_tokens)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    labels = [IGNORE_INDEX if i == IMAGE_TOKEN else i if i in unmasked else lab for i, lab in zip(ids, labels)]

    if has_image and len(ids) > max_len:  # official check_image_tokens: never cut into or after an image
        raise Skip("too_long", f"{len(ids)} tokens with the image expanded > max_len {max_len}")
    return ids[:max_len], labels[:max_len], image_is_target


# ---- Readers: a source is a list of shards; read(shard, start) yields a shard's records from index `start` on ----
# A record is {"key", "conversations", "metadata", "images": [path or bytes or None (missing)]} or {"key", "error"}.

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
        self._file = open(self.path, "rb")  # kept open: read() seeks to one line per shard
        self.offsets, off = [], 0
        for line in self._file:
            if line.strip():
                self.offsets.append(off)
            off += len(line)
        self.num_shards = len(self.offsets)

    def read(self, shard, start=0):
        if start > 0:
            return
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
        self.num_shards = len(self.tars)

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


# ---- The stream: sharded, shuffled, resumable; samples out, bad ones counted ----
@dataclass
class Sample:
    input_ids: np.ndarray    # (L,) int64, IMAGE_TOKEN at the image slots, pad id after the text
    labels: np.ndarray       # (L,) int64, -100 where the loss skips
    image: object            # a PIL image, or its (3, S, S) float32 pixels if the stream preprocesses; None: text only
    image_is_target: bool    # the image is in an assistant turn (generation), not a user turn (understanding)
    key: str
    metadata: dict


@dataclass
class Prepare:
    """A record -> its Sample (tokens; the image decoded, and preprocessed if `preprocess`), or the Skip saying why it
    cannot be trained on. The stream's costly part: its worker processes run it, when it has some. Numpy arrays: they
    cross from a worker in the pipe (a torch tensor would hold a shared-memory file open until it is received)."""
    tokenizer: object
    max_len: int
    image_tokens: int = IMAGE_TOKENS
    images_only: bool = False
    preprocess: object = None  # a list of PIL images -> (n, 3, S, S) float pixels (the encoder's)

    def __call__(self, record):
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
            e.key = record["key"]
            return e
        if image is not None and self.preprocess is not None:
            image = self.preprocess([image])[0].float().numpy()  # (3, S, S)
        if ids is not None:  # right padding to max_len (official collator)
            n = self.max_len - len(ids)
            ids = np.array(ids + [self.tokenizer.pad] * n, dtype=np.int64)
            labels = np.array(labels + [IGNORE_INDEX] * n, dtype=np.int64)
        return Sample(ids, labels, image, is_target, record["key"], record["metadata"])


def _start_worker(prepare):  # a worker process gets the stream's Prepare once, not with every record
    global _prepare
    _prepare = prepare
    # torchrun and a VM's shutdown send SIGTERM to every process: the trainer then ends its step and saves it, which
    # takes these workers; the pool ends them when the trainer exits
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _prepare_in_worker(record):
    return _prepare(record)


class SampleStream:
    """Iterator of `Sample`s for data-parallel host `rank` of `world`, padded to max_len; endless with epochs=None.
    images_only: skip text-only samples (decoder stage; tokenizer may be None). `stats` counts reads, uses and skips.
    preprocess: images come out as the encoder's pixels; workers: records are prepared (decoded, tokenized,
    preprocessed) in that many processes, up to `prefetch` ahead, and come out in the order they would without them.
    An epoch: the seed+epoch permutation of all shards (identical on all hosts), of which this host reads positions
    rank, rank + world, ... in order, each shard in blocks of buffer_size records shuffled by a key of the shard, not
    of the host: a shard's records come in one order whichever host reads it. So a host's progress is a cursor
    (epoch, rank, world) -> (position, taken): its positions below `position` are done, and the first `taken` records
    of the shard at `position`; any number of hosts can share out the rest of the epoch (`load_state_dict`)."""

    def __init__(self, source, tokenizer, max_len, rank=0, world=1, seed=0, shuffle=True, buffer_size=1000,
                 epochs=None, image_tokens=IMAGE_TOKENS, images_only=False, preprocess=None, workers=0, prefetch=256):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        if tokenizer is None and not images_only:
            raise ValueError("a SampleStream without a tokenizer can only read images (images_only=True)")
        if source.num_shards < world:
            raise ValueError(f"{source.num_shards} shard(s) cannot feed {world} hosts: write at least one per host")
        self.source, self.prepare = source, Prepare(tokenizer, max_len, image_tokens, images_only, preprocess)
        self.workers, self.prefetch = workers, prefetch
        self.rank, self.world, self.seed, self.shuffle, self.epochs = rank, world, seed, shuffle, epochs
        self.buffer_size = buffer_size if shuffle else 1
        self.epoch, self.cursors = 0, {}  # the cursors of this epoch and later ones: this host's, and those it resumed
        self.stats = Counter()

    def _taken(self, epoch, p):
        """How many records of the shard at position p of the epoch's permutation are used; None: all of them."""
        taken = 0
        for (e, rank, world), (position, n) in self.cursors.items():
            if e == epoch and p % world == rank:
                if p < position:
                    return None
                if p == position:
                    taken = max(taken, n)
        return taken

    def _records(self):
        """(cursor, record) in this host's order from its position on, and (None, epoch) where an epoch ends."""
        epoch = self.epoch
        while self.epochs is None or epoch < self.epochs:
            order = list(range(self.source.num_shards))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            for p in range(self.rank, len(order), self.world):
                if (taken := self._taken(epoch, p)) is None:
                    continue
                start = taken - taken % self.buffer_size  # blocks start at multiples of buffer_size in a shard
                records = self.source.read(order[p], start)
                while block := list(islice(records, self.buffer_size)):
                    perm = list(range(len(block)))
                    if self.shuffle:
                        random.Random(f"{self.seed}/{epoch}/{order[p]}/{start}").shuffle(perm)
                    for j in range(taken - start, len(block)):
                        yield (p, start + j + 1), block[perm[j]]
                    start = taken = start + len(block)
            yield None, epoch
            epoch += 1

    def _prepared(self):
        """(cursor, Sample or Skip), or (None, epoch): in order, prepared here or up to `prefetch` ahead in the workers
        (forked, as DataLoader's: they inherit the tokenizer and preprocessing)."""
        if not self.workers:
            yield from ((c, r if c is None else self.prepare(r)) for c, r in self._records())
            return
        with ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"), initializer=_start_worker,
                                 initargs=(self.prepare,)) as pool:
            ahead = deque()
            for c, r in self._records():
                ahead.append((c, r if c is None else pool.submit(_prepare_in_worker, r)))
                while ahead and (len(ahead) > self.prefetch or ahead[0][0] is None):
                    c, r = ahead.popleft()
                    yield c, r if c is None else r.result()
            yield from ((c, r if c is None else r.result()) for c, r in ahead)

    def __iter__(self):
        whole_epoch, used = not any(e == self.epoch for e, _, _ in self.cursors), self.stats["used"]
        for cursor, result in self._prepared():
            if cursor is None:  # the end of the epoch
                if whole_epoch and self.stats["used"] == used:  # an endless stream would otherwise spin forever
                    raise RuntimeError(f"no usable sample in a whole epoch of host {self.rank}'s data: "
                                       f"{dict(self.stats)}")
                self.epoch += 1
                self.cursors = {k: v for k, v in self.cursors.items() if k[0] >= self.epoch}  # load_state_dict knows
                whole_epoch, used = not any(e == self.epoch for e, _, _ in self.cursors), self.stats["used"]
                continue
            self.cursors[self.epoch, self.rank, self.world] = cursor
            self.stats["read"] += 1
            if isinstance(result, Skip):
                self.stats[result.reason] += 1
                n = self.stats[result.reason]
                if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th, ... of each kind; all are counted
                    log.warning("skipped sample %s (%s; %d so far)", result.key, result, n)
                continue
            self.stats["used"] += 1
            yield result

    def state_dict(self):
        """This host's progress after the last sample yielded (JSON-able), what must match to resume, skip counts."""
        return dict(epoch=self.epoch, cursors=[[*k, *v] for k, v in self.cursors.items()], stats=dict(self.stats),
                    rank=self.rank, world=self.world, seed=self.seed, shuffle=self.shuffle,
                    buffer_size=self.buffer_size, num_shards=self.source.num_shards)

    def load_state_dict(self, states):
        """Resume from the `state_dict()`s of all the hosts of a run, however many: this host reads what is left of
        its positions under its own rank and world (on the same world, exactly what it would have read). Hosts end
        epochs at different times (shards differ in size, samples are skipped): the run resumes at the earliest epoch,
        where a host already in a later one had read all its positions. This host takes the skip counts of the old
        ranks equal to its rank modulo its world, so that their sum is kept."""
        now = self.state_dict()
        for k in ("seed", "shuffle", "buffer_size", "num_shards"):
            for saved in {s[k] for s in states} - {now[k]}:
                raise ValueError(f"data position saved with {k}={saved} cannot resume a stream with {k}={now[k]}")
        got = sorted((s["world"], s["rank"]) for s in states)
        if not states or got != [(len(states), r) for r in range(len(states))]:
            raise ValueError(f"resuming needs the data positions of all the hosts of a run, got (world, rank) {got}")
        self.epoch, self.cursors = min(s["epoch"] for s in states), {}
        for s in states:
            ended = [[e, s["rank"], s["world"], self.source.num_shards, 0] for e in range(self.epoch, s["epoch"])]
            for e, rank, world, position, taken in s["cursors"] + ended:
                self.cursors[e, rank, world] = max(self.cursors.get((e, rank, world), (0, 0)), (position, taken))
        self.stats = sum((Counter(s["stats"]) for s in states if s["rank"] % self.world == self.rank), Counter())


# ---- Batches with static shapes ----
def collate(samples, image_size=224):
    """The batch dict: input_ids/labels (B, L) int64, pixel_values (B, 3, S, S) float32 (zeros where no image),
    has_image (B,) bool, image_is_target (B,) bool. Images are pixels: the samples of a stream with a `preprocess`."""
    pixel_values = torch.zeros(len(samples), 3, image_size, image_size)  # zeros on text-only rows, as official
    for i, s in enumerate(samples):
        if s.image is not None:
            if not isinstance(s.image, np.ndarray) or s.image.shape != pixel_values.shape[1:]:
                raise ValueError(f"sample {s.key}: its image is {getattr(s.image, 'shape', type(s.image))}, not "
                                 f"(3, {image_size}, {image_size}) pixels (a stream with the encoder's preprocess)")
            pixel_values[i] = torch.from_numpy(s.image)
    batch = dict(pixel_values=pixel_values, has_image=torch.tensor([s.image is not None for s in samples]),
                 image_is_target=torch.tensor([s.image_is_target for s in samples]))
    if samples[0].input_ids is not None:  # an images-only stream without a tokenizer has no tokens
        batch.update(input_ids=torch.from_numpy(np.stack([s.input_ids for s in samples])),
                     labels=torch.from_numpy(np.stack([s.labels for s in samples])))
    return batch


def batches(stream, batch_size, image_size=224):
    """Full batches (a partial last one is dropped); after each, `stream.state_dict()` is the position after it."""
    it = iter(stream)
    while len(chunk := list(islice(it, batch_size))) == batch_size:
        yield collate(chunk, image_size)
