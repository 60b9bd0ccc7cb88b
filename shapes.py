"""The toy world: synthetic captioned shapes, rendered on the toy encoder's token grid, their analyzer, and the toy's
tokenizer and encoder. A dataset with no download in the official JSONL format: generation samples ("Can you generate
two small red circles on the left?") and understanding ones (image + question -> one word). The analyzer reads the
attributes back from any image without learning, so evaluate.py scores generated images GenEval-style. The core never
imports this file."""

import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, pre_tokenizers, trainers
from torch import nn

from encoders import SiglipVisionConfig
from tokenizer import IMAGE_PLACEHOLDER, SPECIAL_TOKENS, Tokenizer, build_bpe
from weights import save_safetensors, write_atomic


SHAPES = ("circle", "square", "triangle")
# Every shape color has a channel <= 60, no background one below 200: the colors are far apart, easy to tell apart.
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
          "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20)}
BACKGROUNDS = {"white": (250, 250, 250), "light gray": (218, 218, 218), "pale blue": (215, 228, 245),
               "cream": (245, 238, 210), "pale green": (220, 240, 220), "pale pink": (245, 222, 228)}
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
ANSWERS = {"color": tuple(COLORS), "shape": SHAPES, "count": tuple(COUNT_WORDS.values()), "position": POSITIONS,
           "size": SIZES}

ANCHORS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78), "center": (0.5, 0.5)}
# Shapes sit on a GRID x GRID grid of cells, the toy encoder's 8 x 8 tokens: a small shape fills a cell, a large one
# 2 x 2, and a two-tone background splits on a cell edge, so a token holds a background, a whole shape or a quarter
# of one: few enough token contents for a toy DiT to learn (README, "Toy recipe").
GRID = 8
SIZE_CELLS = {"small": 1, "large": 2}
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
    what = f"{s.size} {s.color} {s.shape}" + ("s" if s.count > 1 else "")
    return f"{'a' if s.count == 1 else COUNT_WORDS[s.count]} {what} {WHERE[s.position]}"


def generation_prompt(s, phrasing=0):
    return REQUESTS[phrasing % len(REQUESTS)].format(describe(s))


def generation_answer(s):
    """'Here are two small red circles on the left:\n<image>' (official data: 'Here you go:\n<image>'): a toy LLM
    from scratch needs the request restated right before <im_start> (README, "Toy recipe")."""
    return f"Here {'is' if s.count == 1 else 'are'} {describe(s)}:\n{IMAGE_PLACEHOLDER}"


def shapes_question(s, attribute, phrasing=0):
    """(question, answer) about attribute `attribute` of Shapes `s`, worded as in the training data."""
    one = s.count == 1
    agree = {"is": "is" if one else "are", "Is": "Is" if one else "Are", "noun": "shape" if one else "shapes"}
    phrasings = QUESTIONS[attribute]
    answer = COUNT_WORDS[s.count] if attribute == "count" else getattr(s, attribute)
    return phrasings[phrasing % len(phrasings)].format(**agree), answer


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
    return replace(s, background=tuple(rng.sample(list(BACKGROUNDS), 2)), split=rng.choice(("vertical", "horizontal")))


def layout(s):
    """The grid cells (top-left corners (x0, y0)) of s's shapes: s.count in a line, one cell apart, centered on the
    position's anchor. One layout per (count, size, position), so the prompt alone says where each shape token goes."""
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
    if s.split:
        edge = rng.randint(3, 5) * cell
        draw.rectangle((edge, 0, W, W) if s.split == "vertical" else (0, edge, W, W), fill=BACKGROUNDS[s.background[1]])
    side = SIZE_CELLS[s.size] * cell
    boxes = []
    for cx0, cy0 in layout(s):
        x0, y0 = cx0 * cell, cy0 * cell
        x1, y1 = x0 + side - 1, y0 + side - 1  # PIL's boxes include their last pixel: the shape stays in its cells
        if s.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=COLORS[s.color])
        else:  # a circle or a square fills the same box
            (draw.ellipse if s.shape == "circle" else draw.rectangle)((x0, y0, x1, y1), fill=COLORS[s.color])
        boxes.append([round(v / 2) for v in (x0, y0, x0 + side, y0 + side)])
    return img.resize((image_size, image_size), Image.LANCZOS), boxes


def shapes_sample(seed, index, image_size=224, understanding_fraction=0.5, holdout=()):
    """(official-format record, image) of sample `index`: the same for a given seed whatever the dataset size."""
    rng = random.Random(seed * 1_000_003 + index)
    s = random_shapes(rng, holdout)
    image, boxes = render_shapes(s, rng, image_size)
    meta = dict(asdict(s), background=list(s.background), boxes=boxes)
    if rng.random() < understanding_fraction:
        attr = rng.choice(list(QUESTIONS))
        question, answer = shapes_question(s, attr, rng.randrange(len(QUESTIONS[attr])))
        human = f"{IMAGE_PLACEHOLDER}\n{question}"
        meta.update(task="understanding", question=attr, answer=answer)
    else:
        human, answer = generation_prompt(s, rng.randrange(len(REQUESTS))), generation_answer(s)
        meta.update(task="generation")
    conversations = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return dict(conversations=conversations, metadata=meta), image


def write_shapes_dataset(folder, n, seed=0, image_size=224, understanding_fraction=0.5, holdout=()):
    """Write n synthetic samples in the official JSONL format: `data.jsonl` + `images/*.png`, every file atomically.
    Returns the path of data.jsonl (what open_source and train_tpu.py --data take)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        record, image = shapes_sample(seed, i, image_size, understanding_fraction, holdout)
        name = f"images/sample_{i:06d}.png"
        write_atomic(folder / name, lambda tmp: image.save(tmp, format="PNG"))
        lines.append(json.dumps(dict(image=name, **record)))
    write_atomic(folder / "data.jsonl", ("\n".join(lines) + "\n").encode())
    return folder / "data.jsonl"


def train_tokenizer(texts, vocab_size):
    """Qwen2's byte-level BPE (tokenizer.build_bpe) trained on `texts`, then SPECIAL_TOKENS (ids vocab_size - 5 ...,
    after the BPE as in Qwen), so the chat template and `Tokenizer` work unchanged: exactly vocab_size tokens, or
    ValueError. Special tokens and <image> are cut out of the texts first: they must never become merges."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} < {256 + len(SPECIAL_TOKENS)} (256 bytes + the special tokens)")
    cut = re.compile("|".join(map(re.escape, SPECIAL_TOKENS + (IMAGE_PLACEHOLDER,))))
    tok = build_bpe({}, [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((piece for text in texts for piece in cut.split(text) if piece), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the texts support only {tok.get_vocab_size()} tokens (256 bytes, "
                         f"{tok.get_vocab_size() - 256 - len(SPECIAL_TOKENS)} merges, {len(SPECIAL_TOKENS)} special); "
                         f"ask for at most that, or give more varied texts")
    return Tokenizer(tok)


# The toy encoder: 64 px in patches of 8 -> GRID x GRID tokens (every stage trains on a CPU) of 96 channels.
TOY_ENCODER = SiglipVisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=64, patch_size=8)


@torch.no_grad()
def init_siglip(encoder):
    """SigLIP's own initialization (transformers' SiglipPreTrainedModel) of a new SigLIP2Encoder (its LayerNorms are
    already 1 and 0). Unlike PyTorch's positions ~ N(0, 1), it lets image content, not position, dominate the tokens."""
    emb = encoder.embeddings
    nn.init.normal_(emb.position_embedding.weight, std=encoder.hidden_size ** -0.5)
    fan_in = emb.patch_embedding.weight[0].numel()
    nn.init.trunc_normal_(emb.patch_embedding.weight, std=fan_in ** -0.5 / 0.87962566103423978)  # lecun_normal
    nn.init.zeros_(emb.patch_embedding.bias)
    for layer in encoder.encoder.layers:
        a, m = layer.self_attn, layer.mlp
        for linear in (a.q_proj, a.k_proj, a.v_proj, a.out_proj, m.fc1, m.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        for linear in (m.fc1, m.fc2):  # the MLP's biases ~ N(0, 1e-6), drawn after every weight
            nn.init.normal_(linear.bias, std=1e-6)
    return encoder


def save_siglip(encoder, folder):
    """Write a SigLIP2Encoder in the Hub layout load_encoder reads (a vision-only SigLIP checkpoint)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({encoder.prefix + k: v for k, v in encoder.state_dict().items()}, folder / "model.safetensors",
                     metadata={"format": "pt"})
    p = encoder.processing
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="SiglipImageProcessor", do_resize=True, size=dict(height=p.size[0], width=p.size[1]),
        resample=p.resample, do_rescale=True, rescale_factor=p.rescale_factor, do_normalize=True,
        image_mean=list(p.image_mean), image_std=list(p.image_std)), indent=2))
    (folder / "config.json").write_text(json.dumps(dict(architectures=["SiglipModel"], model_type="siglip",
                                                        vision_config=asdict(encoder.config)), indent=2))


# Analyzer. TOY_HOLDOUT: evaluate.py's held-out (color, shape) pairs (each color and shape is trained with others).
TOY_HOLDOUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
SCORED = ("color", "shape", "position", "count")  # what a prompt is scored on (GenEval-like); size is reported too

PALETTE = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)  # (12, 3) shapes first
NOISE_AREA = 0.002  # components smaller than this fraction of the image (~1/4 of a small triangle) are noise
EDGE = 0.2  # coverage below EDGE counts as 0, above 1 - EDGE as 1: ringing, noise and JPEG leave the shape's size
FILL_TRIANGLE, FILL_SQUARE = 0.69, 0.87  # bounding-box fill: triangle 1/2 < 0.69 < circle π/4 < 0.87 < square 1


def connected_components(mask):
    """(labels, n): the 4-connected components of a boolean (H, W) mask, labelled 1..n (0 = background). Flat pixel
    indices propagate as the minimum over 4-neighbours, with pointer jumping, until stable: a few dozen numpy passes."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)  # p[:-2, 1:-1] is each pixel's upper neighbour, and so on
        lowest = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, lowest, big).ravel()
        for _ in range(4):
            fg = new < big
            new[fg] = new[new[fg]]
        new = new.reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, labels = np.unique(lab, return_inverse=True)
    labels = np.where(mask, labels.reshape(h, w) + 1, 0)
    return labels, int((roots < big).sum())


def blend(pixels, color):
    """(coverage, residual) of pixels (..., 3) as blends a·color + (1 - a)·B, a in [0, 1], B the best-fitting
    background: anti-aliased or blurred edges get their partial coverage; the residual: how well `color` fits at all."""
    bg = PALETTE[len(COLORS):]                                    # (6, 3)
    d = np.asarray(color, np.float32) - bg                        # (6, 3) background -> color
    pd = pixels @ d.T - (bg * d).sum(-1)                          # (..., 6) (p - B)·d, as matrix products
    dd = (d * d).sum(-1)
    a = (pd / dd).clip(0, 1)
    pb = (pixels ** 2).sum(-1, keepdims=True) - 2 * pixels @ bg.T + (bg ** 2).sum(-1)  # |p - B|^2
    residual = pb - 2 * a * pd + a * a * dd                       # |p - B - a·d|^2
    best = residual.argmin(-1)[..., None]
    return np.take_along_axis(a, best, -1)[..., 0], np.take_along_axis(residual, best, -1)[..., 0]


def analyze_shapes(image):
    """dict(color, shape, position, count, size) of a shapes image, None where unreadable (no shapes: count 0); from
    48 px, through blur, noise and stray pixels. color: the shape color whose blends with the backgrounds best fit most
    pixels nearest a shape color; the 4-connected components of those, minus noise, are the shapes (count), each
    measured on its sub-pixel coverage (shape: by fill = area / (width x height), majority vote)."""
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
        p = np.pad(component, 1)
        grown = component | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]  # by a pixel (4-neighbours)
        a = np.where(grown & ~(mask & ~component), alpha, 0)  # never another shape's pixels
        if not a.any():  # a shape of another color (generated images): measured on its own pixels
            a = component.astype(np.float32)
        cols, rows = a.max(0), a.max(1)
        width, height = cols.sum(), rows.sum()
        fill = a.sum() / (width * height)
        shape = "triangle" if fill < FILL_TRIANGLE else "circle" if fill < FILL_SQUARE else "square"
        votes[shape] += 1 + a.sum() / (h * w)  # a vote per shape; area breaks ties
        xs, ys = np.arange(w), np.arange(h)
        centers.append((((cols * xs).sum() / width + 0.5) / w, ((rows * ys).sum() / height + 0.5) / h))
        sides.append((width / w + height / h) / 2)
    out["shape"] = votes.most_common(1)[0][0]
    cx, cy = np.mean(centers, 0)
    out["position"] = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)
    side = float(np.median(sides))
    out["size"] = min(SIZE_CELLS, key=lambda s: abs(SIZE_CELLS[s] / GRID - side))
    return out


def read_answer(text, attribute):
    """The first word of `text` answering `attribute` ('Two circles.': 'two' for count, 'circle' for shape), or None."""
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        word = COUNT_WORDS.get(int(word), word) if word.isdigit() else word
        for candidate in (word, word[:-1] if word.endswith("s") else None):
            if candidate in ANSWERS[attribute]:
                return candidate
    return None
