"""The evaluation of issue 7: the deterministic shapes analyzer (shapes.py) on rendered images, clean and degraded; the
prompt set and scoring of evaluate.py (the renderer's own images score 1.0); the toy tokenizer (tokenizer.py); and
evaluate.py end to end, in-process, on a tiny random checkpoint in the official layout with a toy tokenizer."""

import io
import json
import random
import shutil
import warnings
from collections import Counter, deque

import numpy as np
import pytest
from PIL import Image, ImageFilter
from safetensors.torch import save_file

import data
import evaluate
from helpers import opens_an_image_first, random_scale_rae
import shapes
from shapes import (TOY_HOLDOUT, Shapes, analyze_shapes, connected_components, read_answer, render_shapes,
                    shapes_question, shapes_sample, train_tokenizer)
from tokenizer import IMAGE_PLACEHOLDER, SPECIAL_TOKENS, Tokenizer, chat_prompt, turn

ATTRIBUTES = ("color", "shape", "position", "count", "size")


def rendered(n, size, seed=0):
    """n (Shapes, image) pairs drawn as the training data draws them (random attributes and backgrounds)."""
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}/{i}")
        s = shapes.random_shapes(rng)
        out.append((s, render_shapes(s, rng, size)[0]))
    return out


def accuracies(pairs, degrade=lambda im, i: im):
    hits = Counter()
    for i, (s, image) in enumerate(pairs):
        found = analyze_shapes(degrade(image, i))
        hits.update(k for k in ATTRIBUTES if found[k] == getattr(s, k))
    return {k: hits[k] / len(pairs) for k in ATTRIBUTES}


# ---- analyzer ----

@pytest.mark.parametrize("size", [224, 64])
def test_analyzer_reads_every_attribute_of_rendered_images(size):
    acc = accuracies(rendered(200, size))
    assert all(v >= 0.98 for v in acc.values()), acc


def noisy(image, i, sigma=20):
    a = np.asarray(image, np.float32) + np.random.default_rng(i).normal(0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def jpeg(image, quality=30):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


@pytest.mark.parametrize("name,degrade", [
    ("blur", lambda im, i: im.filter(ImageFilter.GaussianBlur(im.size[0] / 224 * 2))),
    ("heavy blur", lambda im, i: im.filter(ImageFilter.GaussianBlur(im.size[0] / 224 * 5))),
    ("noise", noisy),
    ("jpeg", lambda im, i: jpeg(im)),
])
def test_analyzer_tolerates_degraded_images(name, degrade):
    for size in (224, 64):
        acc = accuracies(rendered(30, size, seed=1), degrade)
        assert acc["color"] == 1.0, (size, acc)
        assert acc["count"] >= 0.95 and acc["position"] >= 0.95, (size, acc)
        if name != "heavy blur":  # a strong blur rounds squares into circles and sharpens nothing
            # JPEG's 8 x 8 blocks are a small shape's whole cell at 64 px: measured 0.83 (seed 1), 0.93 (seed 3)
            floor = 0.8 if (name, size) == ("jpeg", 64) else 0.85
            assert acc["shape"] >= floor and acc["size"] >= 0.95, (size, acc)


def test_analyzer_ignores_specks_and_reads_an_empty_image_as_nothing():
    s = Shapes("circle", "green", 2, "large", "right")
    image, _ = render_shapes(s, random.Random(0), 224)
    a = np.asarray(image).copy()
    a[5:8, 5:8] = shapes.COLORS["red"]  # a 9-pixel speck of another color
    a[200, 100] = shapes.COLORS["blue"]
    found = analyze_shapes(Image.fromarray(a))
    assert found == dict(color="green", shape="circle", position="right", count=2, size="large")
    # A second shape of another color (generated images have them) is counted and measured on its own pixels.
    a[0:40, 150:190] = (180, 60, 240)  # nearest purple; no blend of green
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it once measured 0 coverage: a division by zero and a NaN position
        found = analyze_shapes(Image.fromarray(a))
    assert found == dict(color="green", shape="circle", position="right", count=3, size="large")
    assert analyze_shapes(Image.new("RGB", (64, 64), shapes.BACKGROUNDS["cream"])) == dict(
        color=None, shape=None, position=None, count=0, size=None)


def flood_fill_components(mask):
    """Oracle: breadth-first flood fill, one component at a time."""
    labels, n = np.zeros(mask.shape, int), 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        n += 1
        labels[start] = n
        todo = deque([start])
        while todo:
            y, x = todo.popleft()
            for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not labels[v, u]:
                    labels[v, u] = n
                    todo.append((v, u))
    return labels, n


@pytest.mark.parametrize("density", [0.3, 0.55, 0.8])
def test_connected_components_equal_a_flood_fill(density):
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 9), (9, 1), (23, 31)]:
        mask = rng.random(shape) < density
        labels, n = connected_components(mask)
        ref, n_ref = flood_fill_components(mask)
        assert n == n_ref and ((labels > 0) == mask).all()
        pairs = set(zip(labels[mask].tolist(), ref[mask].tolist()))  # the same partition: a bijection of labels
        assert len(pairs) == n and sorted(a for a, _ in pairs) == list(range(1, n + 1))
    # A long spiral-free snake: a worst case for label propagation.
    snake = np.zeros((41, 41), bool)
    snake[::2] = True
    snake[1::4, -1] = snake[3::4, 0] = True
    assert connected_components(snake)[1] == 1


# ---- prompt set, answers, scoring ----

def test_prompt_set_is_deterministic_and_half_held_out():
    a, b = evaluate.prompt_set(3, 40), evaluate.prompt_set(3, 40)
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b] and a != evaluate.prompt_set(4, 40)
    held = [r for r in a if r["split"] == "held-out"]
    assert len(held) == 20 and {(r["shapes"].color, r["shapes"].shape) for r in held} == set(TOY_HOLDOUT)
    assert not {(r["shapes"].color, r["shapes"].shape) for r in a if r["split"] == "seen"} & set(TOY_HOLDOUT)
    assert all(shapes.describe(r["shapes"]) in r["prompt"] for r in a)


def test_renderer_images_score_one_and_wrong_images_score_zero():
    """A perfect image source (the renderer itself) scores 1.0 on every attribute and split."""
    samples = evaluate.prompt_set(0, 30)
    for i, r in enumerate(samples):
        r["image"], _ = render_shapes(r["shapes"], random.Random(i), 96)
        r["found"], r["right"] = evaluate.score(r["shapes"], r["image"])
    gen = evaluate.summarize(samples, [], [])["generation"]
    assert gen["seen"]["n"] == gen["held-out"]["n"] == 15 and gen["all"]["n"] == 30
    assert all(v == 1.0 for row in gen.values() for k, v in row.items() if k != "n"), gen
    s = Shapes("square", "blue", 3, "small", "top")
    wrong, _ = render_shapes(Shapes("circle", "red", 1, "large", "bottom"), random.Random(0), 96)
    assert evaluate.score(s, wrong)[1] == dict.fromkeys(ATTRIBUTES + ("overall",), False) | {"image": True}
    assert evaluate.score(s, None) == (None, dict.fromkeys(("image",) + ATTRIBUTES + ("overall",), False))


def test_questions_and_answers_match_the_training_data():
    for i in range(60):
        record, _ = shapes_sample(5, i, image_size=16, understanding_fraction=1.0)
        m = record["metadata"]
        s = Shapes(m["shape"], m["color"], m["count"], m["size"], m["position"])
        asked = record["conversations"][0]["value"].split("\n", 1)[1]
        phrasings = [shapes_question(s, m["question"], k)[0] for k in range(len(shapes.QUESTIONS[m["question"]]))]
        assert asked in phrasings and shapes_question(s, m["question"])[1] == m["answer"]
        assert read_answer(m["answer"], m["question"]) == m["answer"]
    assert read_answer("Two circles.", "count") == "two" and read_answer("Two circles.", "shape") == "circle"
    assert read_answer("3", "count") == "three" and read_answer("It is at the top.", "position") == "top"
    assert read_answer("I cannot tell", "color") is None and read_answer("", "size") is None


# ---- toy tokenizer ----

def synthetic_texts(n=400):
    texts = []
    for i in range(n):
        record, _ = shapes_sample(0, i, image_size=16)
        texts += [c["value"] for c in record["conversations"]]
    return texts + [chat_prompt("", image=True), turn("assistant", "")]


@pytest.fixture(scope="module")
def toy_tok():
    return train_tokenizer(synthetic_texts(), 384)


def test_toy_tokenizer_round_trips_the_synthetic_texts_and_the_chat_template(toy_tok, tmp_path):
    assert len(toy_tok) == 384
    assert [toy_tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(384 - 5, 384))  # after the BPE
    toy_tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    texts = synthetic_texts(100) + [chat_prompt(q) for q in synthetic_texts(30)] + ["caf\u00e9 \U0001F600 x\ty  z"]
    for text in texts:
        ids = again.encode(text)
        assert again.decode(ids, skip_special_tokens=False) == text and ids == toy_tok.encode(text)
    prompt = chat_prompt("What color is the shape?", image=True)
    ids = again.encode_with_image(prompt, 1)
    assert ids.count(-200) == 1 and ids[0] == again.chat_start and ids.count(again.chat_end) == 2
    assert ids[ids.index(-200) - 1] == again.image_start and ids[ids.index(-200) + 1] == again.image_end
    caption = "Can you generate a photo of two small red circles on the left?"
    assert len(again.encode(caption)) < len(caption) / 3  # merges learned: about a token per word
    # The training pipeline accepts it: the chat turns tokenize with labels, <image> expands to its slots.
    ids, labels, is_target = data.encode_conversation(again, [{"from": "human", "value": "Show me a red circle."},
                                                              {"from": "gpt", "value": "Here you go:\n<image>"}],
                                                      True, 400)
    assert is_target and ids.count(data.IMAGE_TOKEN) == 256 and again.image_end in ids


def test_toy_tokenizer_refuses_what_the_texts_cannot_fill():
    with pytest.raises(ValueError, match="support only"):
        train_tokenizer(synthetic_texts(50), 4096)
    with pytest.raises(ValueError, match="256 bytes"):
        train_tokenizer(["a b"], 100)
    assert IMAGE_PLACEHOLDER not in train_tokenizer(synthetic_texts(50), 300).tok.get_vocab()


# ---- evaluate.py end to end ----

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_siglip_dir, toy_tok):
    """A tiny random Scale-RAE checkpoint in the official layout (config.json, model.safetensors) with the toy
    tokenizer, shipping its own encoder (`encoder/`, named relative to the folder) and decoder (`decoder/`), as the
    toy model does. Its weights make <im_start> the first answer token for any prompt (as in tests/test_sample.py)."""
    from test_rae import write_decoder
    from test_sample import official_config
    folder = tmp_path_factory.mktemp("evaluate") / "model"
    shutil.copytree(tiny_siglip_dir, folder / "encoder")
    write_decoder(folder / "decoder")
    cfg = official_config("encoder", vocab_size=len(toy_tok))
    (folder / "config.json").write_text(json.dumps(cfg))
    model = random_scale_rae(cfg)
    opens_an_image_first(model, toy_tok.image_start)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    toy_tok.save(folder)
    return folder


def test_evaluate_end_to_end_writes_table_json_and_grid(checkpoint, tmp_path, capsys):
    evaluate.main(["--model-path", str(checkpoint), "--device", "cpu",
                   "--num-prompts", "6", "--num-questions", "5", "--steps", "2", "--batch-size", "4", "--seed", "1",
                   "--grid", str(tmp_path / "out" / "grid.png"), "--json", str(tmp_path / "out" / "eval.json")])
    out = capsys.readouterr().out
    for word in ("generation", "seen", "held-out", "overall", "understanding", "real", "generated"):
        assert word in out
    out = json.loads((tmp_path / "out" / "eval.json").read_text())
    gen, und = out["generation"], out["understanding"]
    assert gen["seen"]["n"] == gen["held-out"]["n"] == 3 and gen["all"]["n"] == 6
    assert gen["all"]["image"] == 1.0  # the weights open an image for every prompt
    assert und["real"]["n"] == 5 and und["generated"]["n"] == 6
    numbers = [v for row in [*gen.values(), *und.values()] for k, v in row.items() if k != "n" and v is not None]
    assert numbers and all(0.0 <= v <= 1.0 for v in numbers)
    assert len(out["samples"]) == 6 and len(out["questions"]) == 11 and out["holdout"] == [list(p) for p in TOY_HOLDOUT]
    assert [s["prompt"] for s in out["samples"]] == [r["prompt"] for r in evaluate.prompt_set(1, 6)]
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.width == 6 * 160 and grid.height > 160  # one row of 6 cells, prompts below


def test_best_of_k_keeps_one_of_the_candidates_the_toy_ranks(checkpoint, tmp_path, monkeypatch):
    def run(name, *args):
        evaluate.main(["--model-path", str(checkpoint), "--device", "cpu", "--num-prompts", "4", "--num-questions", "0",
                       "--steps", "2", "--json", str(tmp_path / name), *args])
    run("all.json", "--n-samples", "2")  # both candidates of each prompt: seeds seed + 2 i + k, as best-of-2 draws them
    ranked = []
    monkeypatch.setattr(evaluate, "select", lambda scores, metric, n: ranked.append(scores) or [1])
    run("best.json", "--scaling-rounds", "2", "--metric", "loss")
    every, best = (json.loads((tmp_path / name).read_text()) for name in ("all.json", "best.json"))
    assert len(every["samples"]) == 8 and len(best["samples"]) == 4 and best["scaling_rounds"] == 2
    assert [len(s) for s in ranked] == [2] * 4 and all(s[0]["responses"] and "prompt_loss" in s[0] for s in ranked)
    assert [s["found"] for s in best["samples"]] == [s["found"] for s in every["samples"][1::2]]  # the one chosen


@pytest.mark.parametrize("args,message", [
    (["--num-prompts", "0"], "--num-prompts: must be >= 1"),
    (["--num-questions", "-1"], "--num-questions: must be >= 0"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--grid", "grid.jpg"], "must name a .png"),
    (["--json", "/proc/eval.json"], "cannot write in /proc"),
    (["--device", "cuda:99"], "--device: cuda:99: no such device here"),
])
def test_bad_input_fails_fast_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--model-path", "/nonexistent/model", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_checkpoint_is_one_clear_message(tmp_path):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model-path", str(tmp_path / "nothing")])
    assert str(e.value).startswith("error:") and "nothing" in str(e.value)


def test_existing_results_are_never_overwritten_silently(tmp_path, capsys):
    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "grid.png").write_bytes(b"")
    for flag, name in (("--json", "eval.json"), ("--grid", "grid.png")):
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args([flag, str(tmp_path / name)])
        assert e.value.code == 2 and "exists; choose another name or pass --force" in capsys.readouterr().err
        assert evaluate.parse_args([flag, str(tmp_path / name), "--force"]).force
