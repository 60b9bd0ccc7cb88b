"""Test-time scaling (verify.py, sample.py --scaling-rounds): the scores equal a hand computation from the model's
logits, each metric orders candidates as it says, and the GenEval layout is complete, split over processes without
gaps or overlaps, and resumable. Tiny random checkpoints in the official layout (tests/test_sample.py)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from helpers import random_scale_rae
from test_rae import write_decoder
from test_sample import official_config, write_model
from tokenizer import chat_prompt
from verify import DESCRIBE, METRICS, YES_NO, answer_logits, official_checks, select, verify


def by_hand(model, tok, question, answer, features):
    """The vocabulary logits predicting `answer` after the chat-templated question, from one unpadded forward."""
    head = tok.encode_with_image(chat_prompt(question, image=True), 256)
    ids = torch.tensor([head + answer])
    h = model(inputs_embeds=model.embed(ids, features[None], None))[0]
    return (h @ model.lm_head_weight.T)[len(head) - 1:-1]


def test_scores_equal_a_hand_computation_from_the_logits(tiny_siglip_dir, tok, monkeypatch):
    model = random_scale_rae(official_config(tiny_siglip_dir)).eval()
    features = torch.randn(3, 256, 32)
    # What the model generates is checked elsewhere; here each candidate's answers are given: a yes (in the official
    # template's words), a no and one naming no choice.
    said = {"Is it red?": ' "Answer": "yes"', "Is it round?": "No, it is not.", "Is it big?": "Maybe."}
    answers = {q: tok.encode(a) + [tok.chat_end] for q, a in said.items()}
    monkeypatch.setattr(model, "chat", lambda tok_, qs, *a, **k: [(answers[q], None) for q in qs])
    questions = [[("Is it red?", "yes", YES_NO), ("Is it round?", "yes", YES_NO)], [("Is it round?", "no", YES_NO)],
                 [("Is it big?", "yes", YES_NO)]]
    descriptions = [[(DESCRIBE, "a red ball")], [(DESCRIBE, "a red ball"), ("Which?", "the cat")], []]
    scores = verify(model, tok, features, questions, descriptions, batch_size=2)

    def expect(i, q, expected):  # (said, yes logit, no logit, yes conf, mean confidence) computed by hand
        ids, logits = answers[q], by_hand(model, tok, q, answers[q], features[i]).double()
        yes = {tok.encode(s + w)[0] for w in ("yes", "Yes", "YES") for s in ("", " ")}
        no = {tok.encode(s + w)[0] for w in ("no", "No", "NO") for s in ("", " ")}
        pos = next((j for j, t in enumerate(ids) if t in yes | no), None)
        logp = logits.log_softmax(-1)
        conf = (-(logp.mean(-1) + math.log(logp.shape[-1]))).mean().item()
        if pos is None:
            return None, 0.0, 0.0, 0.0, conf
        good, bad = (yes, no) if expected == "yes" else (no, yes)
        p = logp[pos].exp()
        return ("yes" if ids[pos] in yes else "no", logits[pos, list(good)].max().item(),
                logits[pos, list(bad)].max().item(), (p[list(good)].sum() / p[list(yes | no)].sum()).item(), conf)

    def loss(i, q, text):
        ids = tok.encode(text)
        logits = by_hand(model, tok, q, ids, features[i]).double()
        logp = logits.log_softmax(-1)
        return -logp[range(len(ids)), ids].mean().item(), (-(logp.mean(-1) + math.log(logp.shape[-1]))).mean().item()

    red, round_yes = expect(0, "Is it red?", "yes"), expect(0, "Is it round?", "yes")
    assert red[0] == "yes" and round_yes[0] == "no"  # the hand computation found the answer tokens
    assert scores[0]["answer"] == "no" and scores[0]["score"] == 0.5
    assert scores[0]["yes_logit"] == pytest.approx((red[1] + round_yes[1]) / 2, rel=1e-5)
    assert scores[0]["no_logit"] == pytest.approx((red[2] + round_yes[2]) / 2, rel=1e-5)
    assert scores[0]["yes_conf_score"] == pytest.approx(red[3] * round_yes[3], rel=1e-5)
    assert scores[0]["no_conf_score"] == pytest.approx(1 - red[3] * round_yes[3], rel=1e-5)
    # Confidences average log p over the vocabulary, in float32: about 1e-5 of rounding.
    assert scores[0]["response_conf_score"] == pytest.approx((red[4] + round_yes[4]) / 2, rel=1e-4)
    assert (scores[0]["prompt_loss"], scores[0]["prompt_conf_score"]) == pytest.approx(loss(0, DESCRIBE, "a red ball"),
                                                                                       rel=1e-4)
    assert scores[0]["responses"] == [said["Is it red?"], said["Is it round?"]]  # decoded without the end token
    round_no = expect(1, "Is it round?", "no")  # "no" expected: the answer is right, p(no) is the confidence
    assert scores[1]["answer"] == "yes" and scores[1]["score"] == 1.0
    assert (scores[1]["yes_logit"], scores[1]["no_logit"], scores[1]["yes_conf_score"]) == pytest.approx(round_no[1:4])
    both = [loss(1, DESCRIBE, "a red ball"), loss(1, "Which?", "the cat")]
    assert scores[1]["prompt_loss"] == pytest.approx((both[0][0] + both[1][0]) / 2, rel=1e-5)
    assert scores[1]["prompt_conf_score"] == pytest.approx((both[0][1] + both[1][1]) / 2, rel=1e-4)
    big = expect(2, "Is it big?", "yes")
    assert scores[2]["answer"] == "uncertain" and scores[2]["score"] == 0.0 and big[0] is None
    assert (scores[2]["yes_logit"], scores[2]["yes_conf_score"], scores[2]["prompt_loss"]) == (0.0, 0.0, 0.0)
    assert scores[2]["response_conf_score"] == pytest.approx(big[4], rel=1e-4)


def test_teacher_forced_logits_are_those_generation_chose_from(tiny_siglip_dir, tok):
    model = random_scale_rae(official_config(tiny_siglip_dir)).eval()
    features, questions = torch.randn(3, 256, 32), ["What is it?", "Is it red?", "Describe this image please."]
    answers = [ids for ids, _ in model.chat(tok, questions, features, 6)]
    logits = answer_logits(model, tok, questions, answers, features, batch_size=2)  # padded batches
    assert [lg.argmax(-1).tolist() for lg in logits] == answers
    for q, a, f, lg in zip(questions, answers, features, logits):
        torch.testing.assert_close(lg, by_hand(model, tok, q, a, f), atol=1e-4, rtol=1e-4)


def test_each_metric_orders_the_candidates_as_it_defines():
    def s(score, yes_logit, no_logit, yes_conf, loss, prompt_conf, response_conf):
        return dict(score=score, yes_logit=yes_logit, no_logit=no_logit, yes_conf_score=yes_conf,
                    no_conf_score=1 - yes_conf, prompt_loss=loss, prompt_conf_score=prompt_conf,
                    response_conf_score=response_conf)
    scores = [s(0.0, 0.0, 3.0, 0.1, 1.0, 5.0, 1.0),   # 0: said no
              s(1.0, 2.0, 1.0, 0.7, 3.0, 2.0, 4.0),   # 1: yes, less sure
              s(1.0, 4.0, 0.5, 0.9, 2.0, 2.0, 2.0),   # 2: yes, surest
              s(0.5, 1.0, 1.0, 0.5, 0.5, 1.0, 3.0),   # 3: one of two questions yes
              s(1.0, 2.0, 1.0, 0.7, 3.0, 2.0, 4.0)]   # 4: a tie with 1: the earlier candidate first
    expected = {"loss": [3, 0, 2, 1, 4], "answer_logits": [2, 1, 4, 3, 0], "answer_conf": [2, 1, 4, 3, 0],
                "prompt_conf": [0, 2, 1, 4, 3], "response_conf": [1, 4, 3, 2, 0]}
    assert set(expected) == set(METRICS)
    for metric, order in expected.items():
        assert select(scores, metric, 5) == order, metric
        assert select(scores, metric, 2) == order[:2]


def test_official_checks_ask_about_the_prompt():
    questions, descriptions = official_checks("a red ball")
    assert questions == [("Does this image align with the prompt: a red ball?", "yes", YES_NO)]
    assert descriptions == [(DESCRIBE, "a red ball")]
    template = 'Compare the image with the prompt. Respond "Answer": "yes" / "no".\n'
    assert official_checks("a cat", template)[0][0][0] == template.rstrip() + "\nThe prompt: a cat"
    assert [q for q, _, _ in official_checks("a cat", qa=["Is there a cat?", "Only one?"])[0]] == ["Is there a cat?",
                                                                                                  "Only one?"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_siglip_dir):
    root = tmp_path_factory.mktemp("scaling")
    return dict(model=write_model(root / "model", tiny_siglip_dir, True), decoder=write_decoder(root / "decoder"),
                chat=write_model(root / "chat", tiny_siglip_dir, False))


def scale(dirs, out, *args, model="model"):
    sample.main(["--model-path", str(dirs[model]), "--decoder-repo", str(dirs["decoder"]), "--device", "cpu",
                 "--steps", "2", "--output-dir", str(out), *args])


def test_a_prompt_that_opens_no_image_is_recorded_as_done(dirs, tmp_path, capsys):
    scale(dirs, tmp_path, "--prompt", "a cat", "--scaling-rounds", "2", "--max-new-tokens", "3", model="chat")
    for folder in (tmp_path / "candidates" / "00000", tmp_path / "answer_conf" / "00000"):
        meta = json.loads((folder / "metadata.jsonl").read_text())
        assert meta["n_samples_generated"] == 0 and meta["selected"] == [] and not any((folder / "samples").iterdir())
    assert not list(tmp_path.glob("*manifest*"))
    scale(dirs, tmp_path, "--prompt", "a cat", "--scaling-rounds", "2", model="chat")
    assert "nothing to do" in capsys.readouterr().out


def test_best_of_n_writes_the_geneval_layout_split_over_processes_and_resumes(dirs, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    lines = [dict(prompt=f"a photo of {n} cats", tag="counting", include=[dict(cls="cat", count=n)]) for n in range(3)]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["--metadata-file", str(prompts), "--n-samples", "2", "--scaling-rounds", "2", "--metric", "loss"]
    for rank in (0, 1):  # two processes, as torchrun starts them
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        scale(dirs, tmp_path / "two", *args, "--post-qa-mode", ["latent", "image"][rank])  # image: the PNG re-encoded
        assert sorted(p.name for p in (tmp_path / "two" / "candidates").iterdir()) == [
            f"{i:05d}" for i in range(3) if i % 2 == rank or rank]  # rank 1 adds the odd ones, no prompt twice
    meta = json.loads((tmp_path / "two" / "candidates" / "00001" / "metadata.jsonl").read_text())
    assert meta["post_qa_mode"] == "image" and len(meta["text_responses"]["0"]["responses"]) == 1
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    scale(dirs, tmp_path / "one", *args)
    for i, line in enumerate(lines):
        folder = tmp_path / "one" / "candidates" / f"{i:05d}"
        meta = json.loads((folder / "metadata.jsonl").read_text())
        assert {k: meta[k] for k in line} == line and meta["index"] == i and meta["metric"] == "loss"
        assert meta["n_samples_generated"] == 4 and len(meta["selected"]) == 2
        assert [meta["text_responses"][str(k)]["seed"] for k in range(4)] == [42 + 4 * i + k for k in range(4)]
        names = ("answer", "score", "yes_logit", "no_logit", "yes_conf_score", "no_conf_score", "prompt_loss",
                 "prompt_conf_score", "response_conf_score", "responses")
        assert all(set(names) <= set(c) for c in meta["text_responses"].values())
        losses = [meta["text_responses"][str(k)]["prompt_loss"] for k in range(4)]
        assert meta["selected"] == sorted(range(4), key=lambda k: losses[k])[:2]  # the lowest prompt loss first
        pngs = sorted((folder / "samples").iterdir())
        assert [p.name for p in pngs] == [f"{k:05d}.png" for k in range(4)]
        kept = tmp_path / "one" / "loss" / f"{i:05d}"
        assert [p.read_bytes() for p in sorted((kept / "samples").iterdir())] == [pngs[k].read_bytes()
                                                                                 for k in meta["selected"]]
        assert json.loads((kept / "metadata.jsonl").read_text())["text_responses"]["0"] == \
            meta["text_responses"][str(meta["selected"][0])]
        assert [p.read_bytes() for p in pngs] == [p.read_bytes() for p in
                                                 sorted((tmp_path / "two" / "candidates" / f"{i:05d}" / "samples").iterdir())]
    # Any candidate is drawn again alone from its recorded seed.
    seed = json.loads((folder / "metadata.jsonl").read_text())["text_responses"]["3"]["seed"]  # the last prompt's
    scale(dirs, tmp_path / "alone", "--prompt", lines[-1]["prompt"], "--seed", str(seed))
    [png] = (tmp_path / "alone").glob("*.png")
    alone, drawn = (np.asarray(Image.open(p), dtype=int) for p in (png, folder / "samples" / "00003.png"))
    assert np.abs(alone - drawn).max() <= 1  # the same image (an LLM batch of one may round differently)
    # A second run finds every prompt done and writes nothing.
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*"))
    capsys.readouterr()
    scale(dirs, tmp_path / "one", *args)
    assert "nothing to do" in capsys.readouterr().out
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*")) == before


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a cat", "--metric", "loss"], "add --scaling-rounds"),
    (["--prompt", "a cat", "--scaling-rounds", "2", "--skip-decoder"], "--scaling-rounds writes PNGs"),
    (["--prompt", "a cat", "--scaling-rounds", "2", "--save-latent"], "no --image, --latent, --skip-decoder or --save"),
    (["--prompt", "a cat", "--scaling-rounds", "2", "--metric", "best"], "invalid choice"),
])
def test_bad_scaling_input_fails_before_loading(args, message, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(args)
    assert message in capsys.readouterr().err


def test_a_qa_dict_must_cover_every_prompt(tmp_path, capsys):
    (tmp_path / "qa.json").write_text(json.dumps({"a cat": ["Is there a cat?"]}))
    assert sample.parse_args(["--prompt", "a cat", "--scaling-rounds", "2", "--qa-dict", str(tmp_path / "qa.json")])
    with pytest.raises(SystemExit):
        sample.parse_args(["--prompt", "a dog", "--scaling-rounds", "2", "--qa-dict", str(tmp_path / "qa.json")])
    assert "no list of questions for the prompt 'a dog'" in capsys.readouterr().err
