"""shapes.py: the synthetic samples are deterministic, say what they show, sit on the token grid, and never draw a
held-out pair."""

import json
import random
from itertools import combinations, product

import numpy as np

import shapes


def test_synthetic_samples_are_deterministic_and_match_their_attributes():
    assert len(shapes.COLORS) >= 6 and set(shapes.SHAPES) >= {"circle", "square", "triangle"}
    # Background and shape colors never collide: every shape color has a channel <= 60, backgrounds none < 200.
    assert all(min(c) <= 60 for c in shapes.COLORS.values()) and all(min(c) >= 200 for c in shapes.BACKGROUNDS.values())
    seen = set()
    for i in range(60):
        record, image = shapes.shapes_sample(11, i, image_size=96)
        again, image2 = shapes.shapes_sample(11, i, image_size=96)
        assert record == again and image.tobytes() == image2.tobytes()
        m = record["metadata"]
        seen |= {m["shape"], m["color"], m["position"], m["size"], m["count"], m["task"]}
        assert len(m["boxes"]) == m["count"]
        pixels = np.asarray(image).astype(int)
        for x0, y0, x1, y1 in m["boxes"]:
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2 + (1 if m["shape"] == "triangle" else 0)
            assert np.abs(pixels[cy, cx] - shapes.COLORS[m["color"]]).max() <= 8  # the shape is drawn there
        human, gpt = (t["value"] for t in record["conversations"])
        if m["task"] == "generation":
            described = shapes.describe(shapes.Shapes(m["shape"], m["color"], m["count"], m["size"], m["position"]))
            assert described in human and gpt == f"Here {'is' if m['count'] == 1 else 'are'} {described}:\n<image>"
        else:
            assert human.startswith("<image>\n") and gpt == m["answer"]
            assert gpt == ({1: "one", 2: "two", 3: "three"}[m["count"]] if m["question"] == "count" else m[m["question"]])
    assert seen >= set(shapes.SHAPES) | set(shapes.COLORS) | set(shapes.POSITIONS) | {1, 2, 3, "generation", "understanding"}
    assert shapes.shapes_sample(12, 0)[0] != shapes.shapes_sample(11, 0)[0]
    assert shapes.describe(shapes.Shapes("circle", "red", 2, "small", "left")) == "two small red circles on the left"


def test_shapes_sit_on_the_token_grid():
    """Every (count, size, position) layout: boxes on cell edges (at 64 px the cells are the toy encoder's 8 x 8
    tokens), inside the image, at least one cell apart; a two-tone split on a cell edge. So each cell shows one
    background tone, alone or under one shape: the small vocabulary of token contents a toy DiT can learn."""
    cell = 64 // shapes.GRID
    for count, size, position, shape in product((1, 2, 3), shapes.SIZES, shapes.POSITIONS, shapes.SHAPES):
        s = shapes.Shapes(shape, "red", count, size, position, ("cream", "pale blue"), "vertical")
        image, boxes = shapes.render_shapes(s, random.Random(count), 64)
        assert all(v % cell == 0 and 0 <= v <= 64 for box in boxes for v in box), boxes
        for a, b in combinations(boxes, 2):
            assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= cell, boxes
        covered = {(x // cell, y // cell) for x0, y0, x1, y1 in boxes for x in range(x0, x1) for y in range(y0, y1)}
        pixels = np.asarray(image, dtype=np.float32)
        for cx, cy in product(range(shapes.GRID), repeat=2):
            c = pixels[cy * cell:(cy + 1) * cell, cx * cell:(cx + 1) * cell]  # (8, 8, 3)
            if (cx, cy) in covered:  # blends of the shape's color and a background (smooth edges)
                assert shapes.blend(c, shapes.COLORS["red"])[1].max() <= 40 ** 2, (s, cx, cy)
            else:  # one background tone, up to the resampling's ringing next to an edge
                tones = [np.abs(c - shapes.BACKGROUNDS[b]).max() for b in s.background]
                assert min(tones) <= 40, (s, cx, cy, tones)


def test_holdout_pairs_are_never_drawn():
    holdout = {("red", "circle"), ("blue", "square")}
    pairs = {(m["color"], m["shape"]) for m in (shapes.shapes_sample(0, i, 16, holdout=holdout)[0]["metadata"]
                                                for i in range(200))}
    assert not pairs & holdout and len(pairs) == 18 - 2


def test_writing_is_deterministic(tmp_path):
    a = shapes.write_shapes_dataset(tmp_path / "a", 8, seed=2, image_size=32)
    shapes.write_shapes_dataset(tmp_path / "b", 8, seed=2, image_size=32)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 8 + 1  # images and data.jsonl; no temp files left
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert json.loads(a.read_text().splitlines()[0])["image"] == "images/sample_000000.png"
