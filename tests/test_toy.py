"""The toy Scale-RAE (issue 7): the toy recipe learns, and the toy model shipped in `toy/` runs from any directory and
keeps its measured accuracy. The README's quick start runs as a user would, in a subprocess; the recipe and the
evaluation run in this interpreter (the same scripts, without an interpreter start-up each)."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import dit
import model
import rae
from shapes import analyze_shapes

ROOT = Path(__file__).parents[1]


def run(args, cwd, timeout):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def run_here(script, args, monkeypatch):
    """A script's __main__ in this interpreter, as `python script args` (no interpreter start-up)."""
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
    runpy.run_path(str(script), run_name="__main__")


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def logged(folder, key):
    """{step: value} of a train_tpu.py run's log.jsonl."""
    return {r["step"]: r[key] for r in map(json.loads, open(folder / "log.jsonl"))}


def falls(log, window):
    """(mean of the first `window` steps, mean of the last `window` steps) of a loss logged at every step."""
    steps = sorted(log)
    return mean(log[s] for s in steps[:window]), mean(log[s] for s in steps[-window:])


# The toy presets' shapes at a fraction of their width and depth (the same encoder, so the same latents): LLM, DiT,
# decoder, registered in this interpreter for toy.py --presets toy-tiny.
TINY = (model.QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0, initializer_range=64 ** -0.5),
        dit.DiTConfig(hidden_size=64, depth=2, num_heads=2, in_channels=96, z_channels=64, input_size=8),
        rae.DecoderConfig(64, 1, 2, 128, patch_size=8, image_size=64))
# The budgeted recipe: tiny presets in this interpreter, 160 samples, 20 decoder steps, 50 stage-1 and 15 stage-2
# steps of 8 samples.
SMALL_RECIPE = ["--presets", "toy-tiny", "--samples", 160, "--stage2-samples", 40, "--decoder-steps", 20,
                "--stage1-steps", 50, "--stage2-steps", 15, "--batch-size", 8, "--stage2-lr", "1e-3",
                "--eval-prompts", 10, "--log-every", 1]


def test_small_toy_recipe_learns(tmp_path, monkeypatch):
    """Every stage of toy.py on a test's budget (about 10 s on 2 CPU cores: TINY presets, 160 samples;
    20 decoder, 50 stage-1 and 15 stage-2 steps), then its evaluation: each training stage lowers its own loss
    clearly, and the evaluation of the trained model runs to the end. Measured (means of the first and last steps):
    decoder L1 + MSE 0.58 -> 0.11 (5 steps), stage-1 CE 4.6 -> 0.96 and diffusion 1.77 -> 0.95 (10 steps), stage-2
    CE 1.34 -> 0.85 (5 steps). With one stage's learning rate at 0 (--decoder-lr, --lr, --stage2-lr), or 0 steps,
    this test fails (checked for each stage). Reading held-out images takes far longer: understanding rose above
    chance only after 300 stage-1 steps of the toy preset (about 2-3 minutes; smaller models, larger learning rates
    and smaller batches stayed at chance), so that proof is test_toy_recipe_understands_held_out_images, run with
    SCALE_RAE_SLOW_TESTS=1."""
    monkeypatch.chdir(tmp_path)
    for (module, name), preset in zip(((model, "QWEN_PRESETS"), (dit, "DIT_PRESETS"), (rae, "DECODER_PRESETS")), TINY):
        monkeypatch.setitem(getattr(module, name), "toy-tiny", preset)  # what train_tpu.py's --llm, --dit, --decoder read
    run_here(ROOT / "toy.py", ["--out", tmp_path / "run", *SMALL_RECIPE], monkeypatch)
    run = tmp_path / "run"
    first, last = falls(logged(run / "decoder", "loss"), 5)
    assert last < 0.5 * first, ("decoder", first, last)
    first, last = falls(logged(run / "stage1", "ce"), 10)
    assert last < 0.5 * first, ("stage 1 CE", first, last)
    first, last = falls(logged(run / "stage1", "diff"), 10)
    assert last < 0.8 * first, ("stage 1 diffusion", first, last)
    first, last = falls(logged(run / "stage2", "ce"), 5)
    assert last < 0.8 * first, ("stage 2 CE", first, last)
    result = json.loads((run / "eval.json").read_text())
    assert result["generation"]["all"]["n"] == 10 and result["understanding"]["real"]["n"] == 10, result
    assert (run / "grid.png").is_file()


@pytest.mark.skipif(not os.environ.get("SCALE_RAE_SLOW_TESTS"), reason="2-3 minutes on 2 CPU cores: set "
                    "SCALE_RAE_SLOW_TESTS=1")
def test_toy_recipe_understands_held_out_images(tmp_path):
    """Every stage of toy.py at the toy presets, cut to about 2-3 minutes on 2 CPU cores (3000 samples; 100 decoder,
    300 stage-1 and 20 stage-2 steps), then its evaluation. The answers to 40 questions about real images must beat
    chance by a clear margin: chance is 1/6 for color, 1/3 for shape and count, 1/5 for position and 1/2 for size,
    0.31 on average (measured: 0.525, and 0.575 after 400 stage-1 steps; the decoder does not enter understanding).
    Generation needs longer (at chance after 300 and 400 steps; the shipped model trains 2000 + 1000)."""
    run([ROOT / "toy.py", "--out", tmp_path / "run", "--samples", 3000, "--stage2-samples", 200, "--decoder-steps", 100,
         "--stage1-steps", 300, "--stage2-steps", 20, "--eval-prompts", 40], cwd=tmp_path, timeout=900)
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["understanding"]["real"]["accuracy"] >= 0.45, result["understanding"]


def test_readme_quick_start_runs_the_shipped_toy_model(tmp_path):
    """The README's first command, from another directory: it writes an image showing what the prompt asks for."""
    run([ROOT / "sample.py", "--model-path", "toy", "--prompt", "Can you generate a red circle on the left?"],
        cwd=tmp_path, timeout=120)
    images = list((tmp_path / "outputs").glob("*.png"))
    assert len(images) == 1
    found = analyze_shapes(Image.open(images[0]))
    assert (found["color"], found["shape"], found["position"], found["count"]) == ("red", "circle", "left", 1), found


def test_shipped_toy_model_keeps_its_accuracy(tmp_path):
    """evaluate.py on a fixed prompt and question set (seed 1, 40 each): the shipped model's numbers, measured when it
    was shipped (README), less a margin for the arithmetic of other machines."""
    import evaluate
    evaluate.main(["--model-path", "toy", "--num-prompts", "40", "--seed", "1", "--json", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    generated, understood = result["generation"]["seen"], result["understanding"]["real"]
    # measured: color 0.9, shape, position and count 1.0 (chance 1/6, 1/3, 1/5, 1/3) on the 20 seen prompts;
    # understanding 0.875 (chance 0.31). A flipped image moves a generation number by 0.05, an answer by 0.025.
    for attribute, floor in dict(color=0.75, shape=0.85, position=0.9, count=0.9).items():
        assert generated[attribute] >= floor, (attribute, generated)
    assert understood["accuracy"] >= 0.75, understood
