"""data.py: token/label layout on worked examples, both official formats, bad samples, sharding, shuffling, exact
resume, resume on another number of hosts, batches. Real Qwen2.5 vocabulary, tiny images, offline."""

import io
import json
import tarfile
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKENS, SampleStream, encode_conversation, open_source
from helpers import write_shapes

SIZE = 32  # image side in these tests


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """24 synthetic samples in both formats, 4 tars of 6."""
    return write_shapes(tmp_path_factory.mktemp("shapes"), 24, seed=3, image_size=SIZE, samples_per_tar=6)


def preprocess(images):
    """A stand-in for the encoder's preprocessing: resize, scale to [-1, 1]."""
    arrays = [np.asarray(im.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def take(stream, n):
    return list(islice(iter(stream), n))


def write_jsonl(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "data.jsonl"


def png(color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def chat(prompt, answer):
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


# ---- sample -> tokens --------------------------------------------------------------------------------------------

def test_generation_sample_worked_example(tok):
    prompt = "Can you generate a photo of two small red circles on the left?"
    ids, labels, is_target = encode_conversation(tok, chat(prompt, "Here you go:\n<image>"), True, max_len=400)
    # Expected layout, spelled out from the qwen_2 template: system, user, assistant with the image markers.
    system = tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    user = tok.encode(f"<|im_start|>user\n{prompt}<|im_end|>\n")
    head = tok.encode("<|im_start|>assistant\nHere you go:\n<im_start>")
    tail = tok.encode("<im_end><|im_end|>\n")
    assert ids == system + user + head + [IMAGE_TOKEN] * IMAGE_TOKENS + tail
    assert is_target

    nl, s, e = tok.encode("\n")[0], tok.chat_start, tok.chat_end
    assert (nl, s, e) == (198, 151644, 151645)  # the ids the official code hard-codes
    # System and user turns: only <|im_start|>, the "\n" after the role, <|im_end|> and the final "\n" are labelled.
    for start, part in ((0, system), (len(system), user)):
        labelled = [(i - start, lab) for i, lab in enumerate(labels[start:start + len(part)], start) if lab != IGNORE_INDEX]
        assert labelled == [(0, s), (2, nl), (len(part) - 2, e), (len(part) - 1, nl)]
    # Assistant turn: every token labelled with itself, except the 256 image slots.
    a = len(system) + len(user)
    assert labels[a:a + len(head)] == head
    assert labels[a + len(head):a + len(head) + IMAGE_TOKENS] == [IGNORE_INDEX] * IMAGE_TOKENS
    assert labels[-len(tail):] == tail
    # CE predicts <im_end> from the last latent-query slot (labels are shifted by one inside the loss).
    last_slot = max(i for i, t in enumerate(ids) if t == IMAGE_TOKEN)
    assert labels[last_slot + 1] == tok.image_end
    assert tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False) == (
        "<|im_start|>\n<|im_end|>\n" * 2 + "<|im_start|>assistant\nHere you go:\n<im_start><im_end><|im_end|>\n")


def test_understanding_sample_worked_example(tok):
    ids, labels, is_target = encode_conversation(tok, chat("<image>\nWhat color is the shape?", "red"), True, 400)
    assert not is_target
    first = ids.index(IMAGE_TOKEN)
    # The whole <im_start>[256 slots]<im_end> block is unlabelled; official answer_img_mask reads labels[first-1].
    assert ids[first - 1] == tok.image_start and ids[first + IMAGE_TOKENS] == tok.image_end
    assert labels[first - 1:first + IMAGE_TOKENS + 1] == [IGNORE_INDEX] * (IMAGE_TOKENS + 2)
    # The "\n" after <im_end> is token 198 alone, so it is labelled like every "\n" (official unmask list).
    assert tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False) == (
        "<|im_start|>\n<|im_end|>\n" + "<|im_start|>\n\n<|im_end|>\n" + "<|im_start|>assistant\nred<|im_end|>\n")


def test_turns_tokenize_like_transformers_chat_template(tok, tok_dir):
    """Oracle: transformers' apply_chat_template, per turn, with the template preprocess_qwen installs."""
    from transformers import Qwen2TokenizerFast
    hf = Qwen2TokenizerFast.from_pretrained(str(tok_dir))
    hf.add_tokens(["<image>"], special_tokens=True)
    hf.chat_template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                        " + '<|im_end|>' + '\n'}}{% endfor %}")
    conv = [("user", "<im_start><image><im_end>\nDescribe it, please:  two  lines\n\nok?"), ("assistant", "Sure — it's 3 cats.")]
    expected = []
    for role, content in [("system", "You are a helpful assistant.")] + conv:
        expected += hf.apply_chat_template([{"role": role, "content": content}])
    expected = [IMAGE_TOKEN if t == hf.convert_tokens_to_ids("<image>") else t for t in expected]
    turns = [{"from": "human", "value": conv[0][1].replace("<im_start><image><im_end>", "<image>")},
             {"from": "gpt", "value": conv[1][1]}]
    ids, _, _ = encode_conversation(tok, turns, True, 1000, image_tokens=1)
    assert ids == expected


def test_image_without_placeholder_goes_first_and_first_non_human_turn_is_dropped(tok):
    ids, labels, is_target = encode_conversation(tok, chat("Describe.", "A cat."), True, 400)
    ref, _, _ = encode_conversation(tok, chat("<image>\nDescribe.", "A cat."), True, 400)
    assert ids == ref and not is_target
    # A leading gpt turn is dropped (official); with it goes the image prepended to it, so the sample is malformed.
    lead = [{"from": "gpt", "value": "Hi."}] + chat("Describe.", "A cat.")
    with pytest.raises(data.Skip) as e:
        encode_conversation(tok, lead, True, 400)
    assert e.value.reason == "malformed"
    ids2, _, _ = encode_conversation(tok, lead, False, 400)
    assert ids2 == encode_conversation(tok, chat("Describe.", "A cat."), False, 400)[0]
    for role in (["human"], {"human": 1}):  # an unhashable role is a malformed record, not a crash of the run
        with pytest.raises(data.Skip, match="list of {from, value}"):
            encode_conversation(tok, [{"from": role, "value": "Hi."}], False, 400)


def test_length_limits(tok):
    conv = chat("<image>\nWhat is this?", "A square.")
    n = len(encode_conversation(tok, conv, True, 10_000)[0])
    assert n > IMAGE_TOKENS
    assert len(encode_conversation(tok, conv, True, n)[0]) == n  # exactly L fits
    with pytest.raises(data.Skip) as e:
        encode_conversation(tok, conv, True, n - 1)
    assert e.value.reason == "too_long"
    text = chat("word " * 300, "ok")  # text-only: truncated to L, as official, never dropped
    ids, labels, _ = encode_conversation(tok, text, False, 64)
    assert len(ids) == len(labels) == 64


# ---- formats and bad samples ---------------------------------------------------------------------------------

def test_both_formats_read_the_same_samples(tok, shapes):
    jsonl, wds = (take(SampleStream(open_source(shapes[f]), tok, 320, shuffle=False, epochs=1), 100)
                  for f in ("jsonl", "wds"))
    assert len(jsonl) == len(wds) == 24
    for a, b in zip(jsonl, wds):
        assert a.metadata == b.metadata
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.image.size == (SIZE, SIZE)
        assert a.image_is_target == b.image_is_target == (a.metadata["task"] == "generation")
    assert {s.metadata["task"] for s in jsonl} == {"generation", "understanding"}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tok, tmp_path, workers):
    """Also when worker processes decode the images: the same samples, skips and counts."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "good.png").write_bytes(png())
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "img" / "truncated.png").write_bytes(png()[:40])
    ok = chat("<image>\nColor?", "red")
    rows = [dict(image="good.png", conversations=ok), dict(image="missing.png", conversations=ok),
            dict(image="corrupt.png", conversations=ok), dict(image="truncated.png", conversations=ok),
            dict(image=["good.png", "good.png"], conversations=ok), dict(image="good.png", conversations="nonsense"),
            dict(image="good.png", conversations=chat("<image> and <image>", "two")),
            dict(image="good.png", conversations=chat("<image>\n" + "long " * 400, "x")),
            dict(conversations=chat("Hello", "Hi there"))]
    path = write_jsonl(tmp_path, rows)
    with open(path, "a") as f:
        f.write("{not json\n")
    stream = SampleStream(open_source(path, tmp_path / "img"), tok, 320, shuffle=False, epochs=1, workers=workers)
    got = take(stream, 100)
    assert [s.key for s in got] == ["data.jsonl:1", "data.jsonl:9"]
    assert got[1].image is None and (got[1].input_ids != IMAGE_TOKEN).all()
    assert dict(stream.stats) == dict(read=10, used=2, bad_image=3, too_many_images=2, malformed=2, too_long=1)

    # Tars: a missing image member, a corrupt one, and an unreadable shard.
    tars = []
    for t, members in enumerate([[("a.json", dict(conversations=ok, image_filename="a.png")), ("a.png", png()),
                                  ("b.json", dict(conversations=ok, image_filename="nope.png")),
                                  ("c.json", dict(conversations=ok, image_filename="c.png")), ("c.png", b"junk")],
                                 None]):
        tars.append(f"s{t}.tar")
        if members is None:
            (tmp_path / tars[-1]).write_bytes(b"this is not a tar file" * 50)
            continue
        with tarfile.open(tmp_path / tars[-1], "w") as tar:
            for name, content in members:
                blob = content if isinstance(content, bytes) else json.dumps(content).encode()
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    (tmp_path / "wds_manifest.json").write_text(json.dumps({"tars": tars}))
    stream = SampleStream(open_source(tmp_path / "wds_manifest.json"), tok, 320, shuffle=False, epochs=1,
                          workers=workers)
    assert [s.key for s in take(stream, 100)] == ["s0.tar/a.json"]
    assert dict(stream.stats) == dict(read=4, used=1, bad_image=2, bad_shard=1)


def test_clear_errors_before_any_work(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        open_source(tmp_path / "nope.jsonl")
    (tmp_path / "wds_manifest.json").write_text(json.dumps({"tars": ["gone.tar"]}))
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        open_source(tmp_path / "wds_manifest.json")
    (tmp_path / "x_wds.json").write_text("{}")
    with pytest.raises(ValueError, match="'tars'"):
        open_source(tmp_path / "x_wds.json")
    src = open_source(write_jsonl(tmp_path, [dict(conversations=chat("a", "b"))]))
    with pytest.raises(ValueError, match="1 shard"):
        SampleStream(src, tok, 64, rank=0, world=2)
    nothing = open_source(write_jsonl(tmp_path, [dict(image="gone.png", conversations=chat("a", "b"))] * 3))
    with pytest.raises(RuntimeError, match="no usable sample"):
        take(SampleStream(nothing, tok, 300), 1)


# ---- sharding, shuffling, resume -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "wds"])
def test_two_ranks_partition_an_epoch(tok, shapes, fmt):
    keys = [[s.key for s in take(SampleStream(open_source(shapes[fmt]), tok, 320, rank=r, world=2, seed=5,
                                              buffer_size=4, epochs=1), 100)] for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 12
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == 24


@pytest.mark.parametrize("fmt", ["jsonl", "wds"])
def test_shuffling_is_seeded_and_changes_every_epoch(tok, shapes, fmt):
    def order(seed):
        return [s.key for s in take(SampleStream(open_source(shapes[fmt]), tok, 320, seed=seed, buffer_size=5), 48)]
    a = order(0)
    assert a == order(0)  # deterministic for a seed
    assert a != order(1)
    assert sorted(a[:24]) == sorted(a[24:]) and a[:24] != a[24:]  # every sample once per epoch, in a new order
    plain = [s.key for s in take(SampleStream(open_source(shapes[fmt]), tok, 320, shuffle=False, epochs=1), 24)]
    assert sorted(plain) == sorted(a[:24]) and plain != a[:24]


@pytest.mark.parametrize("fmt", ["jsonl", "wds"])
def test_resume_yields_exactly_the_rest_of_the_stream(tok, shapes, fmt, tmp_path):
    def stream(rank):
        return SampleStream(open_source(shapes[fmt]), tok, 320, rank=rank, world=2, seed=7, buffer_size=5)
    ref = [[s.key for s in take(stream(r), 40)] for r in (0, 1)]  # crosses epochs (12 samples per epoch and rank)
    for k in (0, 4, 5, 12, 17):  # inside a block, at block and epoch boundaries
        firsts = [stream(r) for r in (0, 1)]
        for r, (first, n) in enumerate(zip(firsts, ((k + 14) % 24, k))):  # rank 0 ahead or behind by an epoch
            assert [s.key for s in take(first, n)] == ref[r][:n]
        states = json.loads(json.dumps([first.state_dict() for first in firsts]))  # what the checkpoint stores
        resumed = stream(1)
        resumed.load_state_dict(states)
        assert [s.key for s in take(resumed, 40 - k)] == ref[1][k:]
    with pytest.raises(ValueError, match="all the hosts"):
        stream(1).load_state_dict(states[1:])
    other = SampleStream(open_source(shapes[fmt]), tok, 320, rank=1, world=2, seed=8, buffer_size=5)
    with pytest.raises(ValueError, match="seed=7"):
        other.load_state_dict(states)


class Shards:
    """A source of text-only records "shard/index" in shards of unequal sizes."""

    def __init__(self, sizes):
        self.sizes, self.num_shards = sizes, len(sizes)

    def read(self, shard, start=0):
        for i in range(start, self.sizes[shard]):
            yield dict(key=f"{shard}/{i}", conversations=chat("Hi", "Hello"), metadata={}, images=[])


@pytest.mark.parametrize("worlds", [(3, 2), (2, 5, 1), (1, 2), (4, 3, 8)])
def test_resume_on_another_number_of_hosts_uses_every_record_once(tok, worlds):
    """Runs stopped mid-epoch (hosts at different points, rank 0 in the next epoch), resumed on other numbers of
    hosts: over all runs each record is used once per epoch, and after the resumed epochs hosts read as fresh ones."""
    source = Shards([5, 1, 9, 3, 7, 2, 8, 4])  # 39 records; blocks of 3 split shards, runs stop inside blocks

    def stream(rank, world):
        return SampleStream(source, tok, 64, rank=rank, world=world, seed=3, buffer_size=3, epochs=4)

    used, states = [], None  # (epoch, rank, key) of every sample of all runs
    for i, world in enumerate(worlds):
        streams = [stream(r, world) for r in range(world)]
        for r, s in enumerate(streams):
            if states is not None:
                s.load_state_dict(states)
            n = 0
            for x in s:  # the last run reads to the end; the others stop after a few samples
                used.append((s.epoch, r, x.key))
                n += r > 0 or s.epoch > 0  # rank 0 goes on into the next epoch
                if n == 2 + r and i < len(worlds) - 1:
                    break
        states = json.loads(json.dumps([s.state_dict() for s in streams]))
        if i == 0 and world > 1:
            assert [s["epoch"] for s in states] == [1] + [0] * (world - 1)
        assert max(s["epoch"] for s in states) < 3 or i == len(worlds) - 1
    keys = [f"{shard}/{i}" for shard, n in enumerate(source.sizes) for i in range(n)]
    assert sorted((e, k) for e, _, k in used) == sorted((e, k) for e in range(4) for k in keys)
    for r in range(worlds[-1]):  # epoch 3, which only the last run read
        s = stream(r, worlds[-1])
        assert [(s.epoch, r, x.key) for x in s if s.epoch == 3] == [u for u in used if u[:2] == (3, r)]


def test_batches_have_static_shapes_and_resume(tok, shapes):
    """Also with 2 worker processes preparing the samples: the same batches, and the position after each."""
    def stream(workers=0):
        return SampleStream(open_source(shapes["wds"]), tok, 300, seed=1, buffer_size=6, preprocess=preprocess,
                            workers=workers, prefetch=7)
    it = data.batches(stream(), 5, SIZE)
    batch = next(it)
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == dict(
        input_ids=((5, 300), torch.int64), labels=((5, 300), torch.int64), pixel_values=((5, 3, SIZE, SIZE), torch.float32),
        has_image=((5,), torch.bool), image_is_target=((5,), torch.bool))
    assert batch["has_image"].all()  # every synthetic sample has an image
    assert ((batch["input_ids"] == IMAGE_TOKEN).sum(1) == IMAGE_TOKENS).all()
    assert batch["pixel_values"].abs().amax() <= 1 and batch["pixel_values"].std() > 0.1

    s1, s1_workers = stream(), stream(workers=2)
    batches, with_workers = data.batches(s1, 5, SIZE), data.batches(s1_workers, 5, SIZE)
    for _ in range(6):  # 30 samples: into the second epoch
        expected, got = next(batches), next(with_workers)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert s1_workers.state_dict() == s1.state_dict()
    state = s1.state_dict()
    expected = next(batches)
    s2 = stream(workers=2)
    s2.load_state_dict([state])
    got = next(data.batches(s2, 5, SIZE))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_text_only_rows_get_zero_pixels_and_last_partial_batch_is_dropped(tok, tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    rows = [dict(image="a.png", conversations=chat("Draw it", "Here you go:\n<image>")),
            dict(conversations=chat("Hi", "Hello!")), dict(conversations=chat("Bye", "See you."))]
    stream = SampleStream(open_source(write_jsonl(tmp_path, rows)), tok, 300, shuffle=False, epochs=1,
                          preprocess=preprocess)
    got = list(data.batches(stream, 2, SIZE))
    assert len(got) == 1  # 3 samples, batch of 2: the last one is dropped
    b = got[0]
    assert b["has_image"].tolist() == [True, False] and b["image_is_target"].tolist() == [True, False]
    assert (b["pixel_values"][1] == 0).all() and (b["pixel_values"][0] != 0).any()
    assert (b["input_ids"][1] != IMAGE_TOKEN).all()
    n = int((b["input_ids"][1] != tok.pad).sum())  # right padding with <|endoftext|> / -100
    assert (b["input_ids"][1, n:] == tok.pad).all() and (b["labels"][1, n:] == IGNORE_INDEX).all()


# ---- synthetic shapes ----------------------------------------------------------------------------------------

def test_images_only_stream_skips_text_only_samples(tmp_path, tok):
    rows = [dict(conversations=[dict(**{"from": "human"}, value="hi"), dict(**{"from": "gpt"}, value="hello")])]
    Image.new("RGB", (SIZE, SIZE), (200, 10, 10)).save(tmp_path / "a.png")
    rows.append(dict(image="a.png", conversations=[dict(**{"from": "human"}, value="<image>\nColor?"),
                                                     dict(**{"from": "gpt"}, value="red")]))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stream = data.SampleStream(data.open_source(tmp_path / "d.jsonl"), tok, 400, images_only=True, epochs=1)
    samples = list(stream)
    assert len(samples) == 1 and samples[0].image is not None and stream.stats["no_image"] == 1
    # Without a tokenizer (the decoder stage), samples and batches carry only the images.
    with pytest.raises(ValueError, match="images_only"):
        data.SampleStream(data.open_source(tmp_path / "d.jsonl"), None, 400)
    stream = data.SampleStream(data.open_source(tmp_path / "d.jsonl"), None, 400, images_only=True, epochs=1,
                               preprocess=preprocess)
    [s] = list(stream)
    batch = data.collate([s], image_size=SIZE)
    assert s.input_ids is None and set(batch) == {"pixel_values", "has_image", "image_is_target"}
