import json
import re
from pathlib import Path

import pytest
import torch

from data import (DataError, Example, builtin_task, collate, encode_example, encode_rows, extract_answer,
                  read_jsonl, rouge)
from plumbing.tokenizer import byte_tokenizer, gpt2_tokenizer, load_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's what they'll say, isn't it?",
    "Bridging the training-inference gap in large language models with self-generated tokens.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "  indented   text\twith tabs\nand new lines\n\n  and 123 numbers 4567, 89.5 -12",
    "Café naïve résumé 日本語 emoji 🙂 done.",
] + [ex.prompt + ex.response for ex in builtin_task(50, seed=0)]
SAMPLES = [
    "Hello world", "The quick brown fox, it's lazy!", "  two  spaces   and\n\nnewlines \n", "x 12 345 6789 -1.5", "a  12\n 3\t\t4",
    "naïve 日本語 🙂", "57+38=95,95-12=83 #### 83", "'ll've're", "trailing space ",
]


def hf_tokenizer(tmp_path, digits=False, chat_template=None):
    """Train a tiny byte-level BPE with the tokenizers library and save it as a checkpoint folder."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if digits else byte_level
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + len(SPECIALS) + 300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS * 3, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>"}
    if chat_template:
        cfg["chat_template"] = chat_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return hf


# --- tokenizers ---------------------------------------------------------------

def test_gpt2_tokenizer():
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>") != [50256]  # user text never becomes a special token
    assert tok.special("<|endoftext|>") == 50256


def test_byte_tokenizer_roundtrip():
    tok = byte_tokenizer()
    text = "héllo wörld 日本語 🙂\n\t<|endoftext|> end"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.eos_id == 256 and tok.vocab_size == 257
    with pytest.raises(KeyError, match="<|im_start|>"):
        tok.special("<|im_start|>")


@pytest.mark.parametrize("digits", [False, True])
def test_tokenizer_json_matches_hf(tmp_path, digits):
    hf = hf_tokenizer(tmp_path, digits=digits)
    assert len(hf.get_vocab()) > 400  # the merges really happened
    tok = load_tokenizer(tmp_path)
    assert tok.name == "tokenizer.json" and tok.chat is None
    assert tok.eos_id == hf.token_to_id("<|im_end|>")
    for s in SAMPLES:
        assert tok.encode(s) == hf.encode(s).ids, s
        assert tok.decode(tok.encode(s)) == s
    # Text that spells a special token stays text for us (HF would match it).
    assert tok.special("<|im_start|>") not in tok.encode("a <|im_start|> b")


def test_load_tokenizer_order(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"tiktoken": "bytes", "model_type": "gpt2"}))
    assert load_tokenizer(tmp_path).name == "bytes"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert load_tokenizer(tmp_path).name == "r50k_base"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)


# --- chat templates -------------------------------------------------------------

def test_chatml_template(tmp_path):
    hf_tokenizer(tmp_path, chat_template=(Path(__file__).parent / "chat_templates" / "qwen3.jinja").read_text())
    tok = load_tokenizer(tmp_path)
    assert tok.chat == "chatml"
    start, end = tok.special("<|im_start|>"), tok.special("<|im_end|>")
    row = encode_example(Example([{"role": "user", "content": "Hi <|im_end|>"}], "Hello"), tok, "chat")
    e = tok.encode
    assert row.prompt == [start] + e("user\nHi <|im_end|>") + [end] + e("\n") + [start] + e("assistant\n")
    assert row.response == e("Hello") + [end]
    assert [i for i, t in enumerate(row.prompt) if t in (start, end)] == [0, len(e("user\nHi <|im_end|>")) + 1,
                                                                             len(row.prompt) - len(e("assistant\n")) - 1]
    # RAC reference prompt: system turn, then the user turn with the reference appended.
    ref = tok.decode(row.ref_prompt)
    assert ref.startswith("<|im_start|>system\nYou are a helpful assistant")
    assert ref.endswith("Hi <|im_end|>\nAnswer this question based on the following reference response: Hello"
                        "<|im_end|>\n<|im_start|>assistant\n")
    assert row.ref_prompt.count(start) == 3 and row.ref_prompt.count(end) == 2


def test_zephyr_template_and_math():
    tok = byte_tokenizer()  # chat None -> zephyr, eos is the paper's </s>
    row = encode_example(Example("What is 2+2?", "4"), tok, "math")
    e, eos = tok.encode, tok.eos_id
    assert row.prompt == (e("<|system|>\n") + [eos] + e("\n") + e("<|user|>\nWhat is 2+2?\nLet's think step by step.")
                          + [eos] + e("\n<|assistant|>\n"))
    assert row.response == e("4") + [eos]
    assert row.ref_prompt.count(eos) == 2
    assert tok.decode([t for t in row.ref_prompt if t != eos]).startswith("<|system|>\nYou are a helpful assistant")


def test_plain_summarize_arith_templates():
    tok = byte_tokenizer()
    row = encode_example(Example("A long post.", "short"), tok, "summarize")
    assert tok.decode(row.prompt) == "A long post.\nTL;DR:" and tok.decode(row.response[:-1]) == " short"
    assert tok.decode(row.ref_prompt) == ("[POST]: A long post. [REFERENCE SUMMARY]: short\n\nRe-write a new summary of "
                                          "the post and cover the main content in the reference summary. TL;DR:")
    assert row.reference == "short"
    row = encode_example(Example("1+2=", "1+2=3 #### 3", answer="3"), tok, "arith")
    assert tok.decode(row.prompt) == "1+2=" and tok.decode(row.ref_prompt) == "ref 1+2=3 #### 3\n1+2="
    assert row.response == tok.encode("1+2=3 #### 3") + [256] and row.answer == "3"
    row = encode_example(Example("Q?", "A."), tok, "plain")
    assert tok.decode(row.prompt) == "Q?" and "Q?\nAnswer this question based on the following reference response: A." in tok.decode(row.ref_prompt)


# --- collate ---------------------------------------------------------------------

def test_collate_by_hand():
    x, y, m = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], [[5, 6], [7, 8, 9]], pad_id=0)
    # row 0: reads 1 2 3 5, position 2 predicts 5, position 3 predicts 6; row 1: reads 4 7 8
    assert x.tolist() == [[1, 2, 3, 5], [4, 7, 8, 0]]
    assert y.tolist() == [[0, 0, 5, 6], [7, 8, 9, 0]]
    assert m.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert x.dtype == y.dtype == torch.long and m.dtype == torch.float


def test_collate_sft_targets_are_response():
    prompts, resp = [[10, 11, 12, 13], [20, 21]], [[30, 31, 32], [40, 41, 42, 43, 44]]
    x, y, m = collate(prompts, resp, resp, pad_id=99)
    for i in range(2):
        P = len(prompts[i])
        assert m[i, :P - 1].sum() == 0 and m[i, P - 1 + len(resp[i]):].sum() == 0
        assert y[i][m[i] == 1].tolist() == resp[i]
        assert (x[i, P + len(resp[i]) - 1:] == 99).all()  # padding


def test_collate_bash_and_rac():
    # BASH: the model reads the mixed ŷ but is scored on y.
    y_ref, mixed = [5, 6, 7], [5, 9, 7]
    x, y, m = collate([[1, 2]], [mixed], [y_ref], pad_id=0)
    assert x.tolist() == [[1, 2, 5, 9]] and y.tolist() == [[0, 5, 6, 7]] and m.tolist() == [[0, 1, 1, 1]]
    # RAC: read z, labels z̄, counted only where they differ.
    z, zbar = [5, 6, 7], [5, 8, 7]
    x, y, m = collate([[1, 2]], [z], [zbar], pad_id=0, masks=[[int(a != b) for a, b in zip(zbar, z)]])
    assert x.tolist() == [[1, 2, 5, 6]] and y.tolist() == [[0, 5, 8, 7]] and m.tolist() == [[0, 0, 1, 0]]
    with pytest.raises(AssertionError, match="differ in length"):
        collate([[1]], [[2, 3]], [[2]], pad_id=0)


# --- read_jsonl ------------------------------------------------------------------

def test_read_jsonl_shapes(tmp_path):
    """Each shape in its own file (a file mixing shapes is refused: tests/test_safety.py)."""
    rows = [json.dumps({"prompt": "2+2=", "response": "4"}),
            json.dumps({"messages": [{"role": "system", "content": "s"},
                                     {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"}]}),
            json.dumps({"question": "How many?", "answer": "3 + 4 = 7\n#### 1,007"})]
    files = []
    for i, row in enumerate(rows):
        files.append(tmp_path / f"d{i}.jsonl")
        files[-1].write_text("\n" * i + row + "\n")  # blank lines first: line numbers count them
    (a,), (b,), (c,) = map(read_jsonl, files)
    assert (a.prompt, a.response, a.answer, a.line) == ("2+2=", "4", None, 1)
    assert b.prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert b.response == "hello" and b.line == 2
    assert (c.prompt, c.response, c.answer, c.line) == ("How many?", "3 + 4 = 7\n#### 1,007",
                                                        "1007", 3)


@pytest.mark.parametrize("line, what", [
    (b'{"prompt": "a", "response": ', "malformed JSON"),
    (b'{"prompt": "a"}', "'response'"),
    (b'{"question": "a"}', "'answer'"),
    (b'{"text": "a"}', "unknown shape"),
    (b'{"prompt": "a", "response": "  "}', "empty response"),
    (b'{"prompt": "a", "response": 3}', "must be str"),
    (b'{"messages": [{"role": "assistant", "content": "x"}]}', "end with a user turn and the"),
    (b'{"prompt": "caf\xe9", "response": "b"}', "not UTF-8"),
])
def test_read_jsonl_errors(tmp_path, line, what):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "ok", "response": "fine"}\n\n' + line + b"\n")
    with pytest.raises(DataError, match=re.escape(f"bad.jsonl:3: ") + ".*" + re.escape(what)):
        read_jsonl(p)


def test_read_jsonl_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl"):
        read_jsonl(p)


# --- encode_rows -----------------------------------------------------------------

def test_encode_rows_overflow(capsys):
    tok = byte_tokenizer()
    exs = [Example("ab", "cdefghij", line=7), Example("ab", "c", line=8)]
    rows = encode_rows(exs, tok, "arith", max_len=10)
    assert rows[0].response == tok.encode("cdefghij") and 256 not in rows[0].response  # eos cut with it
    # f(x, y) = "ref y\nx" (15 tokens) keeps room for one token by cutting the reference inside it
    assert tok.decode(rows[0].ref_prompt) == "ref cd\nab" and rows[0].reference == "cdefghij"
    assert rows[1].response == tok.encode("c") + [256] and tok.decode(rows[1].ref_prompt) == "ref c\nab"
    assert "truncated 1 of 2 rows to max_len" in capsys.readouterr().err
    with pytest.raises(DataError, match="example 1 \\(line 7\\)"):
        encode_rows(exs, tok, "arith", max_len=10, overflow="fail")
    assert len(encode_rows(exs, tok, "arith", max_len=16, overflow="fail")) == 2
    assert capsys.readouterr().err == ""


def test_encode_rows_prompt_too_long():
    tok = byte_tokenizer()
    for overflow in ("truncate", "fail"):
        with pytest.raises(DataError, match="line 3.*prompt has 6 tokens"):
            encode_rows([Example("abcdef", "x", line=3)], tok, "arith", max_len=6, overflow=overflow)
        # "ref " + y + "\n" + "abcd" is 9 tokens before any y: no room even with y cut away
        with pytest.raises(DataError, match="line 3.*reference prompt"):
            encode_rows([Example("abcd", "xyz", line=3)], tok, "arith", max_len=9, overflow=overflow)


# --- evaluation helpers ----------------------------------------------------------

def test_extract_answer():
    assert extract_answer("so 3+4=7\n#### 1,234 ") == "1234"
    assert extract_answer("#### 5 then #### -6") == "-6"
    assert extract_answer("#### 7 <- the sum, not 8") == "7"  # the number right after '####'
    assert extract_answer("#### seven") is None
    # strict (the default, the paper's strict match): no '####', no answer
    assert extract_answer("The answer is 42.") is None
    assert extract_answer("The answer is 42.", strict=False) == "42"
    assert extract_answer("from -3.5 to -12,000.25 degrees", strict=False) == "-12000.25"
    assert extract_answer("no numbers here", strict=False) is None


def test_rouge_by_hand():
    r = rouge("The cat sat on the mat.", "the cat is on the mat")
    # unigrams: pred the,cat,sat,on,the,mat; ref the,cat,is,on,the,mat -> overlap 5 of 6 each
    assert r["rouge1"] == pytest.approx(5 / 6)
    # bigrams: pred {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat is, is on, on the, the mat} -> 3 of 5
    assert r["rouge2"] == pytest.approx(3 / 5)
    # LCS: the cat on the mat = 5 of 6
    assert r["rougeL"] == pytest.approx(5 / 6)
    r = rouge("a b c d", "d c b a")  # P=R=1 for unigrams, no bigram in common, LCS 1
    assert (r["rouge1"], r["rouge2"], r["rougeL"]) == (1.0, 0.0, pytest.approx(0.25))
    assert rouge("", "x") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


# --- built-in task ---------------------------------------------------------------

def test_builtin_task():
    a, b = builtin_task(200, seed=1), builtin_task(200, seed=1)
    assert a == b and a != builtin_task(200, seed=2)
    assert a[0].prompt.endswith("=") and " #### " in a[0].response
    n_terms = set()
    for ex in a:
        nums = [int(t) for t in re.findall(r"\d+", ex.prompt)]
        n_terms.add(len(nums))
        assert all(10 <= t <= 99 for t in nums)
        steps, final = ex.response.split(" #### ")
        value = nums[0]
        for step, (op, b_) in zip(steps.split(","), re.findall(r"([+-])(\d+)", ex.prompt), strict=True):
            lhs, res = step.split("=")
            new = value + int(b_) if op == "+" else value - int(b_)
            assert lhs == f"{value}{op}{b_}" and int(res) == new >= 0
            value = new
        assert final == ex.answer == str(value) == extract_answer(ex.response)
    assert n_terms == {3, 4, 5}
    assert all(len(re.findall(r"\d+", ex.prompt)) == 2 and ex.prompt[:3].isdigit()
               for ex in builtin_task(20, seed=0, terms=(2, 2), digits=3))
