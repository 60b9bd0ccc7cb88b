"""Evaluate a Scale-RAE checkpoint on the synthetic shapes: GenEval-like generation accuracy on seen and held-out
attribute combinations, and understanding accuracy on real and generated images. Deterministic.

    python evaluate.py --model-path toy --num-prompts 100 --seed 0 --grid eval.png --json eval.json
    python evaluate.py --scaling-rounds 4 --metric loss   # test-time scaling: the model keeps the best of 4

Half the prompts ask for a (color, shape) pair seen in training, half for one of shapes.TOY_HOLDOUT; each image is
read back by shapes.analyze_shapes ("overall": color, shape, position and count right). Understanding: the training
questions about rendered images, and about each generated latent fed back (README, "Toy recipe"). --scaling-rounds K
keeps the best of K candidates, as the toy itself verifies them (verify.py; README, "Test-time scaling").
"""

import argparse
import json
import random
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from model import at_least, available_device, load_pipeline
from shapes import (ANSWERS, COLORS, COUNT_WORDS, POSITIONS, QUESTIONS, SCORED, SHAPES, SIZES, TOY_HOLDOUT, Shapes,
                    analyze_shapes, generation_prompt, random_shapes, read_answer, render_shapes, shapes_question)
from verify import METRICS, select, verify
from weights import WeightsError, check_writable, write_atomic

ATTRIBUTES = SCORED + ("size",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default="toy", help="Scale-RAE checkpoint (default: the shipped toy model)")
    p.add_argument("--decoder-repo", help="RAE decoder (default: the checkpoint's decoder/ or its encoder's)")
    p.add_argument("--seed", type=at_least(0, hi=2**63 - 1), default=0, help="of the prompts, questions and noise")
    p.add_argument("--num-prompts", type=at_least(1), default=100, help="generation prompts (half seen, half held-out)")
    p.add_argument("--num-questions", type=at_least(0), help="about real images (default: --num-prompts; 0: no encoder)")
    p.add_argument("--steps", type=at_least(1), help="Euler steps (default: the official 49-evaluation schedule)")
    p.add_argument("--guidance-level", "--cfg", dest="guidance_level", type=at_least(0, float), default=1.0)
    p.add_argument("--max-new-tokens", type=at_least(1), default=32, help="per answer, and before an image opens")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="prompts per LLM batch and images per DiT batch")
    p.add_argument("--n-samples", type=at_least(1), default=1, help="images scored per prompt")
    p.add_argument("--scaling-rounds", type=at_least(1), default=1, help="draw n-samples x this, keep the best")
    p.add_argument("--metric", choices=METRICS, default="loss", help="how the candidates are ranked")
    p.add_argument("--device", type=available_device, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--grid", help="write a PNG grid of the samples with their prompts here")
    p.add_argument("--json", help="write the numbers and every sample here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --grid or --json")
    args = p.parse_args(argv)
    args.num_questions = args.num_prompts if args.num_questions is None else args.num_questions
    if args.grid and not args.grid.lower().endswith(".png"):
        p.error(f"--grid must name a .png file, got {args.grid}")
    for out in filter(None, (args.grid, args.json)):  # checked now, not after the whole evaluation
        if Path(out).exists() and not args.force:
            p.error(f"{out} exists; choose another name or pass --force")
        try:
            check_writable(Path(out).parent)
        except ValueError as e:
            p.error(str(e))
    return args


def prompt_set(seed, n, holdout=TOY_HOLDOUT):
    """n prompts {shapes, prompt, split}: odd ones ask for a held-out (color, shape) pair, even ones a seen one."""
    rng = random.Random(f"evaluate/prompts/{seed}")
    seen = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in holdout]
    out = []
    for i in range(n):
        split = "held-out" if i % 2 and holdout else "seen"
        color, shape = holdout[i // 2 % len(holdout)] if split == "held-out" else rng.choice(seen)
        s = Shapes(shape, color, rng.randint(1, 3), rng.choice(SIZES), rng.choice(POSITIONS))
        out.append(dict(shapes=s, prompt=generation_prompt(s, i), split=split))
    return out


def question_set(seed, n, image_size, holdout=TOY_HOLDOUT):
    """n questions {shapes, image, attribute, question, answer} about images drawn as the training data draws them."""
    rng = random.Random(f"evaluate/questions/{seed}")
    out = []
    for i in range(n):
        s = random_shapes(rng, holdout)
        image, _ = render_shapes(s, rng, image_size)
        attribute = list(QUESTIONS)[i % len(QUESTIONS)]
        question, answer = shapes_question(s, attribute, rng.randrange(len(QUESTIONS[attribute])))
        out.append(dict(shapes=s, image=image, attribute=attribute, question=question, answer=answer))
    return out


def ask(model, tokenizer, texts, features, args):
    """Greedy answers [(text, DiT condition or None)] to user turns `texts` (about images: features (N, 256, C))."""
    return [(tokenizer.decode(ids), cond) for ids, cond in
            model.chat(tokenizer, texts, features, args.max_new_tokens, args.batch_size)]


def score(shapes, image):
    """(what the analyzer reads in `image` or None, {image, each attribute, overall: right?}); no image is all wrong."""
    found = analyze_shapes(image) if image is not None else None
    right = dict(image=found is not None,
                 **{k: found is not None and found[k] == getattr(shapes, k) for k in ATTRIBUTES})
    right["overall"] = all(right[k] for k in SCORED)
    return found, right


def summarize(samples, real, generated):
    """The numbers of the JSON file from the scored rows: fractions right (None for no rows)."""
    def right(rows, key):
        return float(np.mean([r["right"][key] for r in rows])) if rows else None

    gen = {}
    for split in ("seen", "held-out", "all"):
        rows = [r for r in samples if split in (r["split"], "all")]
        gen[split] = dict(n=len(rows), **{k: right(rows, k) for k in ("image",) + ATTRIBUTES + ("overall",)})
    understanding = {}
    for name, rows in (("real", real), ("generated", generated)):
        understanding[name] = dict(n=len(rows), accuracy=right(rows, "answer"),
                                   **{a: right([r for r in rows if r["attribute"] == a], "answer") for a in QUESTIONS})
    agree = [r for r in generated if r["right"]["analyzer"] is not None]
    understanding["generated"]["agrees_with_analyzer"] = right(agree, "analyzer")
    return dict(generation=gen, understanding=understanding)


def format_table(summary, header=""):
    pct = lambda v: "   -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731
    tables = []
    for table, keys in (("generation", ("image",) + SCORED + ("overall", "size")),
                        ("understanding", ("accuracy",) + tuple(QUESTIONS))):
        tables.append("\n".join([f"{table:<13}     n" + "".join(f"{k:>9}" for k in keys)] +
                                [f"{name:<13}{row['n']:>6}" + "".join(f"{pct(row[k]):>9}" for k in keys)
                                 for name, row in summary[table].items()]))
    agree = summary["understanding"]["generated"]["agrees_with_analyzer"]
    return "\n".join([header, "\n\n".join(tables),
                      f"answers about generated images that agree with the analyzer: {pct(agree).strip()}"])


def save_grid(path, samples, columns=8, cell=160, text_lines=5):
    """A PNG grid: each sample's image (gray when there is none) with its prompt below, then the verdict: green when
    all scored attributes are right, else red with the wrong ones listed."""
    font = ImageFont.load_default()
    columns = min(columns, len(samples))
    line_h, pad = 12, 3
    height = cell + text_lines * line_h + pad
    grid = Image.new("RGB", (columns * cell, -(-len(samples) // columns) * height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, r in enumerate(samples):
        x, y = i % columns * cell, i // columns * height
        image = r["image"] if r["image"] is not None else Image.new("RGB", (cell, cell), (128, 128, 128))
        side = cell - 2 * pad  # enlarge small images without smoothing: the pixels are the result
        resample = Image.NEAREST if image.width < side else Image.LANCZOS
        grid.paste(image.resize((side, side), resample), (x + pad, y + pad))
        wrong = [k for k in SCORED if not r["right"][k]]
        verdict = textwrap.wrap(f"{r['split']}: " + ("no image" if r["image"] is None else "wrong " + ", ".join(wrong)
                                                     if wrong else "ok"), side // 6)  # ~6 px a character
        prompt = textwrap.wrap(r["prompt"], side // 6)[:text_lines - len(verdict)]
        for j, line in enumerate(prompt + verdict):
            fill = (0, 0, 0) if j < len(prompt) else (200, 0, 0) if wrong else (0, 140, 0)
            draw.text((x + pad, y + cell + j * line_h), line, fill=fill, font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), lambda tmp: grid.save(tmp, format="PNG"))


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tokenizer, rae = load_pipeline(args.model_path, args.decoder_repo, args.dtype, args.device)
    except WeightsError as e:
        sys.exit(f"error: {e}")
    dtype = model.model.norm.weight.dtype

    # Generation: n-samples x scaling-rounds candidates per prompt, candidate k of prompt i from seed + i * per + k.
    t0, per, n = time.perf_counter(), args.n_samples * args.scaling_rounds, args.batch_size
    prompts = prompt_set(args.seed, args.num_prompts)
    for r, (text, cond) in zip(prompts, ask(model, tokenizer, [r["prompt"] for r in prompts], None, args)):
        r.update(text=text, cond=cond, kept=[(None, None)] * args.n_samples)
    drawn = [(i * per + k, r) for i, r in enumerate(prompts) if r["cond"] is not None for k in range(per)]
    if drawn:
        latents = model.sample_latents(torch.stack([r["cond"] for _, r in drawn]), [args.seed + i for i, _ in drawn],
                                       args.steps, args.guidance_level, batch_size=n)
        images = [im for i in range(0, len(latents), n) for im in rae.to_pil(rae.decode(latents[i:i + n].to(dtype)))]
        if args.scaling_rounds > 1:  # the toy asks its questions about each latent, expecting the prompt's answers
            checks = [[shapes_question(r["shapes"], a) + (ANSWERS[a],) for a in SCORED] for _, r in drawn]
            described = [[c[:2] for c in q] for q in checks]  # the expected answers' loss: metric "loss"
            scores = verify(model, tokenizer, latents.to(dtype), checks, described, args.max_new_tokens, n)
        for j in range(0, len(drawn), per):  # one prompt's candidates, the best first
            best = select(scores[j:j + per], args.metric, args.n_samples) if args.scaling_rounds > 1 else range(per)
            drawn[j][1]["kept"] = [(latents[j + k], images[j + k]) for k in best]
    samples = [dict(r, latent=x, image=image) for r in prompts for x, image in r["kept"]]
    for r in samples:
        r["found"], r["right"] = score(r["shapes"], r["image"])
    seconds = time.perf_counter() - t0
    print(f"generation: {len(prompts)} prompts, {len(drawn)} images, {len(samples)} kept in {seconds:.1f}s "
          f"({seconds / len(prompts):.2f}s a prompt)")

    # Understanding: questions about real images, and about the generated latents fed back as image features.
    t0 = time.perf_counter()
    real = []
    if args.num_questions:
        try:
            real = question_set(args.seed, args.num_questions, rae.encoder.image_size)
        except (WeightsError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        features = torch.cat([rae.encode([q["image"] for q in real[i:i + args.batch_size]])
                              for i in range(0, len(real), args.batch_size)]).to(dtype)
        answers = ask(model, tokenizer, [q["question"] for q in real], features, args)
        for q, (text, _) in zip(real, answers):
            q.update(text=text, right=dict(answer=read_answer(text, q["attribute"]) == q["answer"]))
    generated, made = [], [r for r in samples if r["latent"] is not None]  # the kept images
    for k, r in enumerate(made):
        attribute = list(QUESTIONS)[k % len(QUESTIONS)]
        question, answer = shapes_question(r["shapes"], attribute)
        found = r["found"][attribute]  # what the analyzer reads, as an answer word
        generated.append(dict(attribute=attribute, question=question, answer=answer,
                              analyzer=COUNT_WORDS.get(found) if attribute == "count" else found))
    if generated:
        features = torch.stack([r["latent"] for r in made]).to(dtype)
        answers = ask(model, tokenizer, [q["question"] for q in generated], features, args)
        for q, (text, _) in zip(generated, answers):
            said = read_answer(text, q["attribute"])
            q.update(text=text, right=dict(answer=said == q["answer"],
                                           analyzer=None if q["analyzer"] is None else said == q["analyzer"]))
    print(f"understanding: {len(real)} real and {len(generated)} generated images in {time.perf_counter() - t0:.1f}s")

    summary = summarize(samples, real, generated)
    print(format_table(summary, f"{args.model_path}: seed {args.seed}, held-out (color, shape) pairs "
                                f"{', '.join('/'.join(p) for p in TOY_HOLDOUT)}"))
    if args.grid:
        save_grid(args.grid, samples)
        print(f"wrote {args.grid}")
    if args.json:
        out = dict(model_path=args.model_path, decoder_repo=args.decoder_repo, seed=args.seed, steps=args.steps,
                   n_samples=args.n_samples, scaling_rounds=args.scaling_rounds, metric=args.metric,
                   seconds_per_prompt=seconds / len(prompts),
                   guidance_level=args.guidance_level, dtype=str(dtype).split(".")[-1], holdout=TOY_HOLDOUT, **summary,
                   samples=[dict(prompt=r["prompt"], split=r["split"], target={k: getattr(r["shapes"], k) for k in
                                 ATTRIBUTES}, text=r["text"], image=r["image"] is not None, found=r["found"],
                                 right=r["right"]) for r in samples],
                   questions=[dict(source=source, question=q["question"], attribute=q["attribute"],
                                   expected=q["answer"], analyzer=q.get("analyzer"), text=q["text"], right=q["right"])
                              for source, rows in (("real", real), ("generated", generated)) for q in rows])
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.json), lambda tmp: tmp.write_text(json.dumps(out, indent=1)))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
