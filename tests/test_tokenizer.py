"""tokenizer.py against transformers' pure-Python Qwen2Tokenizer (the tokenizer official checkpoints were saved
with), on the real Qwen vocabulary."""

import json

import pytest

from helpers import QWEN_ADDED_TOKENS, qwen_tokenizer_files
from tokenizer import IMAGE_TOKEN, SYSTEM_PROMPT, Tokenizer, chat_prompt, turn

STRINGS = [
    "", "a", "Hello, world!", "hello world", "Hello   world", "   leading spaces", "trailing spaces   ",
    "tabs\tand\ttabs", "new\nline", "double\n\nnewline", "\n\n\n", "  \n  \n", "\r\nwindows\r\n", "\u00a0nbsp",
    "12345", "3.14159", "1,000,000 and 2.5e-3", "phone 555-0123", "2024-01-01T12:00:00Z",
    "I'm here, you're there, they'll go, we'd stay", "DON'T SHOUT, I'M FINE", "it's John's",
    "caf\u00e9", "cafe\u0301 (combining accent: NFC makes it one code point)", "na\u00efve r\u00e9sum\u00e9",
    "\u4f60\u597d\uff0c\u4e16\u754c", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\ud55c\uad6d\uc5b4",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629", "\u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442",
    "emoji \U0001F600\U0001F680 and \u2764\ufe0f", "\U0001F468\u200d\U0001F469\u200d\U0001F467 family", "math: \u2211 x\u00b2 \u2264 \u221e",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] = i; }", '{"key": [1, 2, {"b": null}]}',
    "<html><body>hi</body></html>", "C:\\Users\\name\\file.txt", "https://example.com/a?b=c&d=e#frag",
    "##", "# heading\n## sub-heading", "--- *** ___", "!!!???...", "a" * 50, "ab " * 20,
    "<|im_start|>user\nhi<|im_end|>\n", "text before<|im_end|>text after", "<|endoftext|>",
    "<im_start><im_end>", "Here you go:\n<im_start>", "x<im_start>y<im_end>z", "<tool_call>call</tool_call>",
    "<|im_start|> spaced <|im_end|>", "<im_start ", "< im_start>",
    "Can you generate a photo of two small red circles on the left?",
    chat_prompt("Can you generate a photo of a cat on a windowsill?"),
    chat_prompt("What is in this picture?", image=True).replace("<image>", ""),
    turn("assistant", "Here you go:\n<im_start><im_end>"),
]


@pytest.fixture(scope="module")
def folder(tok_dir):
    return tok_dir


@pytest.fixture(scope="module")
def ours(tok):
    return tok


@pytest.fixture(scope="module")
def slow(folder):
    from transformers import Qwen2Tokenizer
    return Qwen2Tokenizer.from_pretrained(str(folder))


def test_enough_varied_strings():
    assert len(STRINGS) >= 50 and len(set(STRINGS)) == len(STRINGS)


def test_ids_equal_slow_qwen2_tokenizer(ours, slow):
    for s in STRINGS:
        assert ours.encode(s) == slow(s, add_special_tokens=False).input_ids, repr(s)


def test_decode_round_trip(ours, slow):
    for s in STRINGS:
        ids = ours.encode(s)
        assert ours.decode(ids, skip_special_tokens=False) == slow.decode(ids), repr(s)
        assert ours.decode(ids) == slow.decode(ids, skip_special_tokens=True), repr(s)


def test_chat_template_prefix_ids(ours):
    prefix = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
    assert ours.encode(prefix) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    assert ours.encode("<|im_end|>\n<|im_start|>assistant\n") == [151645, 198, 151644, 77091, 198]
    assert chat_prompt("hi").startswith(prefix) and chat_prompt("hi").endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_special_tokens_resolved_from_files(ours, slow):
    assert (ours.chat_start, ours.chat_end, ours.pad) == tuple(
        slow.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert (ours.image_start, ours.image_end) == (151665, 151666) == tuple(slow.convert_tokens_to_ids(["<im_start>", "<im_end>"]))
    assert len(ours) == len(slow) == 151667


def test_image_placeholder_becomes_its_slots_between_the_markers(ours):
    text = chat_prompt("Describe it.", image=True)
    ids = ours.encode_with_image(text, 256)
    assert ids.count(-200) == 256 and IMAGE_TOKEN == -200
    i = ids.index(-200)
    assert ids[i - 1] == ours.image_start and ids[i:i + 256] == [-200] * 256 and ids[i + 256] == ours.image_end
    assert [t for t in ids if t != -200] == [t for t in ours.encode_with_image(text, 1) if t != -200]


def test_vocab_and_merges_equal_tokenizer_json(ours, folder, tmp_path):
    """Building from the slow-format files equals loading a tokenizer.json with the same vocabulary."""
    fast = json.loads((qwen_tokenizer_files() / "tokenizer.json").read_text())
    fast["added_tokens"] = fast["added_tokens"][:QWEN_ADDED_TOKENS] + [
        dict(id=151665 + i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
        for i, c in enumerate(["<im_start>", "<im_end>"])]
    (tmp_path / "tokenizer.json").write_text(json.dumps(fast))
    from_json = Tokenizer.from_dir(tmp_path)
    for s in STRINGS:
        assert from_json.encode(s) == ours.encode(s), repr(s)
    (tmp_path / "saved").mkdir()
    ours.save(tmp_path / "saved")
    saved = Tokenizer.from_dir(tmp_path / "saved")
    assert all(saved.encode(s) == ours.encode(s) for s in STRINGS)


def test_saved_slow_files_rebuild_the_same_tokenizer(ours, tmp_path):
    """An export also carries the slow-format files, which the official loader (use_fast=False) reads."""
    ours.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    rebuilt = Tokenizer.from_dir(tmp_path)
    from transformers import Qwen2Tokenizer
    slow = Qwen2Tokenizer.from_pretrained(str(tmp_path))
    for s in STRINGS:
        assert rebuilt.encode(s) == ours.encode(s) == slow(s, add_special_tokens=False).input_ids, repr(s)


def test_missing_files_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        Tokenizer.from_dir(tmp_path)


def test_stage1_adds_the_image_markers_to_a_plain_qwen_tokenizer(tmp_path):
    """Stage 1 starts from Qwen2.5's tokenizer (22 added tokens) and appends <im_start>, <im_end>: 151665, 151666."""
    import shutil
    from helpers import qwen_tokenizer_files
    src = qwen_tokenizer_files()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, tmp_path / name)
    qwen = json.loads((src / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    decoder = {i: t for i, t in qwen.items() if int(i) < 151643 + QWEN_ADDED_TOKENS}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(added_tokens_decoder=decoder)))
    with pytest.raises(ValueError, match="lacks the special tokens"):
        Tokenizer.from_dir(tmp_path)
    tok = Tokenizer.from_dir(tmp_path, add_image_markers=True)
    assert (tok.image_start, tok.image_end, len(tok)) == (151665, 151666, 151667)
    assert Tokenizer.from_dir(tmp_path, add_image_markers=True).encode("<im_start>") == [151665]
