"""Test-time scaling: the model verifies its own candidate images and the best are kept (the official
inference/scaling_experiment.py and verify_results.py). Used by sample.py and evaluate.py --scaling-rounds.

The model reads a candidate as any image, through mm_projector (its latent, or its decoded pixels encoded again),
and answers questions about it, each expecting one of a few choices (official: "yes" to "Does this image align with
the prompt: ...?"); the texts of descriptions (official: the prompt, after "Describe this image.") are scored given
it. Per candidate, with the official names (where they differ from the official definitions: README):
  answer, score        "yes" when every answer is the expected choice, "no" when one is another, else "uncertain";
                       score: the fraction answered as expected
  yes_logit, no_logit  at the answer position (the first answer token that begins a choice), the highest logit of
                       the expected choice's spellings and of the others', averaged over the questions (0: no choice)
  yes_conf_score       p(expected) / p(any choice) there, multiplied over the questions (0: no choice); no: 1 - it
  response_conf_score  the official confidence -mean_v log(V p_v) (0 for a uniform p) over the answer's tokens
  prompt_loss          the mean cross-entropy of each description's tokens; prompt_conf_score: their confidence
"""

import math

import torch
import torch.nn.functional as F

from tokenizer import chat_prompt

ALIGN_QUESTION = "Does this image align with the prompt: {prompt}?"  # what the official code asks in the end
DESCRIBE = "Describe this image."  # the official prompt_loss question; the prompt is the description scored
YES_NO = ("yes", "no")

METRICS = {  # name -> sort key of a candidate's scores, best first (official verify_results.py's orders)
    "loss": lambda s: (s["prompt_loss"], -s["score"], -s["yes_logit"], s["no_logit"]),
    "answer_logits": lambda s: (-s["score"], -s["yes_logit"], s["no_logit"]),
    "answer_conf": lambda s: (-s["score"], -s["yes_conf_score"], s["no_conf_score"]),
    "prompt_conf": lambda s: (-s["prompt_conf_score"], -s["yes_logit"], s["no_logit"]),
    "response_conf": lambda s: (-s["response_conf_score"], -s["yes_logit"], s["no_logit"]),
}


def official_checks(prompt, question=ALIGN_QUESTION, qa=None):
    """(questions, descriptions) for a candidate of `prompt`, as the official script verifies: `question` with
    {prompt} filled in (a text without it gets the prompt on a line of its own) or the prompt's questions from a QA
    dictionary, each expecting yes; the description is the prompt itself, after DESCRIBE."""
    question = question if "{prompt}" in question else question.rstrip() + "\nThe prompt: {prompt}"
    return [(q, "yes", YES_NO) for q in qa or [question.replace("{prompt}", prompt)]], [(DESCRIBE, prompt)]


def select(scores, metric, n):
    """The indices of the n best candidates under `metric`; ties keep the order in which they were drawn."""
    return sorted(range(len(scores)), key=lambda i: METRICS[metric](scores[i]))[:n]


def confidence(logits):  # (n, V) -> the mean over positions of -mean_v log(V p_v)
    return -(logits.log_softmax(-1).mean(-1) + math.log(logits.shape[-1])).mean().item()


def judge(tokenizer, ids, logits, expected, choices):
    """(verdict, yes_logit, no_logit, yes_conf) of one answer: its token ids and their logits (len(ids), V)."""
    starts = {c: {tokenizer.encode(s + w)[0] for w in (c, c.capitalize(), c.upper()) for s in ("", " ")}
              for c in choices}  # the first token of each spelling: yes, Yes, YES, with or without a space
    pos = next((j for j, t in enumerate(ids) if any(t in s for s in starts.values())), None)
    if pos is None:
        return "uncertain", 0.0, 0.0, 0.0
    yes = sorted(starts[expected])
    no = sorted(set().union(*(starts[c] for c in choices if c != expected)) - starts[expected])
    p = logits[pos].softmax(-1)
    return ("yes" if ids[pos] in yes else "no", logits[pos, yes].max().item(), logits[pos, no].max().item(),
            (p[yes].sum() / p[yes + no].sum()).item())


@torch.no_grad()
def answer_logits(model, tokenizer, questions, answers, image_features, batch_size=None):
    """Teacher forcing: for chat-templated question i about image i (features (N, 256, C)) followed by the token ids
    answers[i], the float32 vocabulary logits (len(answers[i]), V) that predict those tokens, batch_size at a time."""
    n, out = batch_size or len(questions), []
    for s in range(0, len(questions), n):
        heads = [tokenizer.encode_with_image(chat_prompt(q, image=True), model.config.image_tokens)
                 for q in questions[s:s + n]]
        rows = [h + a for h, a in zip(heads, answers[s:s + n])]
        width = max(map(len, rows))  # right padding with 0: no real position attends to it
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=image_features.device)
        h = model(inputs_embeds=model.embed(ids, image_features[s:s + n], None))  # (B, L, H)
        out += [model.logits(h[b, len(head) - 1:len(row) - 1]) for b, (head, row) in enumerate(zip(heads, rows))]
    return out

@torch.no_grad()
def verify(model, tokenizer, features, questions, descriptions, max_new_tokens=64, batch_size=None):
    """The scores (above) of N candidates seen as image features (N, 256, C). questions[i]: the (question, expected
    answer, choices) asked about candidate i; descriptions[i]: its (question, text) pairs."""
    asked = [(i, *q) for i, qs in enumerate(questions) for q in qs]
    told = [(i, q, tokenizer.encode(text)) for i, ds in enumerate(descriptions) for q, text in ds]
    answers = [ids for ids, _ in model.chat(tokenizer, [q for _, q, _, _ in asked], features[[a[0] for a in asked]],
                                            max_new_tokens, batch_size)]
    logits = answer_logits(model, tokenizer, [x[1] for x in asked + told], answers + [ids for *_, ids in told],
                           features[[x[0] for x in asked + told]], batch_size)
    judged, scored = [[] for _ in features], [[] for _ in features]
    for (i, _, expected, choices), ids, lg in zip(asked, answers, logits):
        judged[i].append((*judge(tokenizer, ids, lg, expected, choices), confidence(lg), tokenizer.decode(ids)))
    for (i, _, ids), lg in zip(told, logits[len(asked):]):
        scored[i].append((F.cross_entropy(lg, torch.tensor(ids, device=lg.device)).item(), confidence(lg)))
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    out = []
    for js, ss in zip(judged, scored):
        verdicts, yes_logit, no_logit, yes_conf, conf, texts = zip(*js) if js else [()] * 6
        loss, prompt_conf = zip(*ss) if ss else [()] * 2
        out.append(dict(answer=min(verdicts, key=["no", "uncertain", "yes"].index, default="yes"),
                        score=mean([v == "yes" for v in verdicts]), yes_logit=mean(yes_logit), no_logit=mean(no_logit),
                        yes_conf_score=math.prod(yes_conf), no_conf_score=1 - math.prod(yes_conf),
                        response_conf_score=mean(conf), prompt_loss=mean(loss), prompt_conf_score=mean(prompt_conf),
                        responses=list(texts)))
    return out
