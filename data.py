"""Data: the paper's prompt templates, encoding examples into token rows, batching with loss
masks, the built-in arithmetic task, the evaluation helpers (exact match, ROUGE) and reading
JSONL data sets. Tokenizers are in plumbing/tokenizer.py, chat templates in
plumbing/chat_templates.py: a reader of the paper can skip both.

Paper: Cen et al., "Bridging the Training-Inference Gap in LLMs by Leveraging
Self-Generated Tokens". Templates are appendix A.1; batching follows A.2
(right padding, no packing).
"""
from __future__ import annotations

import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from plumbing.chat_templates import render_chat
from plumbing.checks import json_object, parse_json, regular_lines
from plumbing.device import to_device
from plumbing.math_answers import normalize_math
from plumbing.tokenizer import Tokenizer, with_bos


# -----------------------------------------------------------------------------
# Prompt templates (appendix A.1) and encoding examples into token rows.

QA_SYSTEM = ("You are a helpful assistant to answer user's question. Your will be given both a "
             "question and reference response. You need to give a new response to the question "
             "and contain the main content in the reference response.")
QA_REF = "{x}\nAnswer this question based on the following reference response: {y}"
MATH_PROMPT = "{x}\nLet's think step by step."
TLDR_PROMPT = "{x}\nTL;DR:"
TLDR_REF = ("[POST]: {x} [REFERENCE SUMMARY]: {y}\n\nRe-write a new summary of the post and cover "
            "the main content in the reference summary. TL;DR:")
TASKS = ("plain", "chat", "math", "summarize", "arith")


class DataError(ValueError):
    """A data file or an example that cannot be used; the message says which."""


@dataclass
class Example:
    prompt: str | list[dict]  # plain text, or the chat turns before the target
    response: str  # the reference continuation y, without end-of-text
    answer: str | None = None  # final answer for exact match
    line: int = 0  # line in the source file, for error messages (0: not from a file)
    shape: str = "prompt"  # which JSONL shape it came from: "prompt", "messages" or "question"
    rejected: str | None = None  # a preference pair's rejected response (read_jsonl(pairs=True))
    boxed: bool = False  # the answer is MATH's last \boxed{...}, not GSM8K's '#### N'


@dataclass
class Row:
    prompt: list[int]  # x: prompt ids, template applied
    response: list[int]  # y: response ids + [eos_id]
    # f(x, y): the RAC reference prompt; the model continues it with a new response
    ref_prompt: list[int]
    answer: str | None  # for exact match
    reference: str  # response text, for ROUGE
    rejected: list[int] | None = None  # a preference pair's rejected response ids + [eos_id]
    shape: str = "prompt"  # the JSONL shape it came from (Example.shape)
    boxed: bool = False  # MATH: a reply's answer is its last \boxed{...} (Example.boxed)


def _qa_ref_turns(turns: list[dict], y: str) -> list[dict]:
    # f(x, y) for QA: the paper's system prompt, and the reference appended to the last user turn.
    *before, last = [t for t in turns if t["role"] != "system"]
    return [{"role": "system", "content": QA_SYSTEM}, *before,
            {"role": last["role"], "content": QA_REF.format(x=last["content"], y=y)}]


def encode_example(ex: Example, tok: Tokenizer, task: str) -> Row:
    x, y = ex.prompt, ex.response
    if task != "chat" and not isinstance(x, str):
        raise DataError(f"line {ex.line}: task {task!r} needs a text prompt, got chat turns")
    if task == "plain":
        prompt = tok.encode(x)
        ref = tok.encode(f"{QA_SYSTEM}\n{QA_REF.format(x=x, y=y)}\n")
    elif task == "chat":
        turns = [{"role": "user", "content": x}] if isinstance(x, str) else x
        prompt = render_chat(turns, tok)
        ref = render_chat(_qa_ref_turns(turns, y), tok)
    elif task == "math":
        if ex.shape == "question" and "####" not in y and not ex.boxed:  # exact match scores it
            raise DataError(f"line {ex.line}: the answer has no final '#### <number>' (GSM8K) "
                            "or \\boxed{...} (MATH), which the math task scores")
        # The paper's evaluation prompt has an empty system turn.
        prompt = render_chat([{"role": "system", "content": ""},
                              {"role": "user", "content": MATH_PROMPT.format(x=x)}], tok)
        ref = render_chat(_qa_ref_turns([{"role": "user", "content": x}], y), tok)
    elif task == "summarize":
        prompt = tok.encode(TLDR_PROMPT.format(x=x))
        ref = tok.encode(TLDR_REF.format(x=x, y=y.strip()))
        y = " " + y.lstrip()  # a summary follows "TL;DR:" after one space, as in the TL;DR data
    elif task == "arith":
        prompt = tok.encode(x)
        ref = tok.encode(f"ref {y}\n{x}")  # the reference answer, then the question again
    else:
        raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")
    return Row(with_bos(prompt, tok), tok.encode(y) + [tok.eos_id], with_bos(ref, tok), ex.answer,
               ex.response, shape=ex.shape, boxed=ex.boxed)


def encode_rows(examples: list[Example], tok: Tokenizer, task: str, max_len: int,
                overflow: str = "truncate", need_ref: bool = True) -> list[Row]:
    """Encode and fit every row into max_len tokens: x ++ y, and (need_ref, for RAC) f(x, y)
    plus one token.

    f(x, y) holds the reference y, so whenever x ++ y overflows it overflows
    too; "truncate" therefore cuts y inside f(x, y) as well, by the same rule
    as the response. A prompt x that leaves no room is always an error.
    """
    assert overflow in ("truncate", "fail"), \
        f"overflow must be 'truncate' or 'fail', got {overflow!r}"
    rows, cut = [], 0
    for i, ex in enumerate(examples, 1):
        r = encode_example(ex, tok, task)
        where = f"example {i}" + (f" (line {ex.line})" if ex.line else "")
        if len(r.prompt) + 1 > max_len:
            raise DataError(f"{where}: prompt has {len(r.prompt)} tokens, leaving no room for a "
                            f"response in max_len={max_len}")
        n_ref = len(r.ref_prompt) if need_ref else 0
        if overflow == "fail" and max(len(r.prompt) + len(r.response), n_ref + 1) > max_len:
            raise DataError(f"{where}: prompt+response ({len(r.prompt) + len(r.response)}) or "
                            f"reference prompt+1 ({n_ref + 1}) tokens > max_len={max_len}")
        y_ids = tok.encode(ex.response)
        # each pass drops the reference tokens that overflowed
        while need_ref and len(r.ref_prompt) + 1 > max_len:
            y_ids = y_ids[:len(y_ids) - (len(r.ref_prompt) + 1 - max_len)]
            if not y_ids:
                raise DataError(f"{where}: reference prompt has {n_ref} tokens and cannot fit "
                                f"max_len={max_len}")
            r.ref_prompt = encode_example(Example(ex.prompt, tok.decode(y_ids)),
                                          tok, task).ref_prompt
        if len(r.prompt) + len(r.response) > max_len or len(r.ref_prompt) < n_ref:
            r.response = r.response[:max_len - len(r.prompt)]  # the eos goes with the cut
            cut += 1
        rows.append(r)
    if cut:
        print(f"truncated {cut} of {len(rows)} rows to max_len", file=sys.stderr)
    return rows


def encode_pairs(examples: list[Example], tok: Tokenizer, task: str, max_len: int,
                 overflow: str = "truncate") -> list[Row]:
    """Preference pairs as rows (x, chosen) whose Row.rejected holds the rejected ids: each
    reply is fitted to max_len with x by encode_rows' rule for a response."""
    rows = encode_rows(examples, tok, task, max_len, overflow, need_ref=False)
    rejected = encode_rows([replace(e, response=e.rejected) for e in examples], tok, task,
                           max_len, overflow, need_ref=False)
    for row, rej in zip(rows, rejected):
        row.rejected = rej.response
    return rows


# -----------------------------------------------------------------------------
# Batching: one function for SFT, BASH and RAC.


def collate(prompts: list[list[int]], inputs: list[list[int]], targets: list[list[int]],
            pad_id: int, masks: list[list[int]] | None = None, device="cpu"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (x, y, mask), B x T, no packing (appendix A.2), on `device` (copied from
    pinned memory on CUDA: plumbing/device.to_device).

    Row i reads x = prompt + inputs[:-1]; position P-1+j predicts targets[j].
    SFT: inputs = targets = y. BASH: inputs = mixed ŷ, targets = y.
    RAC: inputs = sampled z, targets = labels z̄, masks = (z̄ != z).
    Prompt and padding positions have mask 0 (their y is pad_id, never scored).
    """
    rows = []
    for i, (p, inp, tgt) in enumerate(zip(prompts, inputs, targets, strict=True)):
        assert len(p) >= 1 and len(inp) >= 1, f"row {i}: needs >= 1 prompt and >= 1 response token"
        assert len(inp) == len(tgt), \
            f"row {i}: inputs ({len(inp)}) and targets ({len(tgt)}) differ in length"
        m = [1] * len(tgt) if masks is None else masks[i]
        assert len(m) == len(tgt), \
            f"row {i}: mask ({len(m)}) and targets ({len(tgt)}) differ in length"
        rows.append((p + inp[:-1], [pad_id] * (len(p) - 1) + tgt, [0] * (len(p) - 1) + list(m)))
    T = max(len(x) for x, _, _ in rows)
    x, y, m = ([r[k] + [fill] * (T - len(r[k])) for r in rows] for k, fill in
               enumerate((pad_id, pad_id, 0)))
    xy = to_device([x, y], device)
    return xy[0], xy[1], to_device(m, device, torch.float)


# -----------------------------------------------------------------------------
# The built-in tasks: chains of additions and subtractions, solved step by step.

BUILTIN_FORMS = ("chain", "totals")


def builtin_task(n: int, seed: int, terms: tuple[int, int] = (3, 5), digits: int = 2,
                 form: str = "chain") -> list[Example]:
    """n problems such as x = "5+4-4+8=", evaluated left to right, never negative. Two ways to
    write the solution y, which differ in what a correction after a slip means:

    chain:  "5+4=9,9-4=5,5+8=13 #### 13". Each step starts from the previous result, so after a
            slip (9 written as 8) the reference's next step "9-4=5" is not a correct step from
            the model's own prefix "8-4=".
    totals: "+4=9,-4=5,+8=13 #### 13". The k-th element is the running total after k+1
            numbers, a function of x and k alone: after any slip, the reference's next element
            is still the right one.
    """
    assert 2 <= terms[0] <= terms[1] and digits >= 1, \
        f"need 2 <= terms[0] <= terms[1] and digits >= 1, got {terms}, {digits}"
    assert form in BUILTIN_FORMS, f"form must be one of {BUILTIN_FORMS}, got {form!r}"
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1  # no leading zeros
    examples = []
    for _ in range(n):
        nums = [rng.randint(lo, hi) for _ in range(rng.randint(*terms))]
        value, prompt, steps = nums[0], str(nums[0]), []
        for b in nums[1:]:
            op = "-" if value - b >= 0 and rng.random() < 0.5 else "+"
            new = value - b if op == "-" else value + b
            steps.append(f"{value}{op}{b}={new}" if form == "chain" else f"{op}{b}={new}")
            prompt += f"{op}{b}"
            value = new
        examples.append(Example(prompt + "=", ",".join(steps) + f" #### {value}",
                                answer=str(value)))
    return examples


# -----------------------------------------------------------------------------
# Evaluation: exact match on final answers, ROUGE F1 on summaries.


def extract_answer(text: str, strict: bool = True, boxed: bool = False) -> str | None:
    """GSM8K's strict match: the number right after the last '####' (None without one); boxed,
    MATH's: what the last \\boxed{...} holds, in MATH's normal form (plumbing/math_answers.py).
    Not strict: that, else the last number in the text (a laxer score, reported apart)."""
    if boxed and (found := last_boxed(text)):
        return normalize_math(found) or None
    if "####" in text and not boxed:
        found = re.match(r"\s*(-?\d[\d,]*(?:\.\d+)?)", text.rsplit("####", 1)[1])
        return found[1].replace(",", "") if found else None
    nums = [] if strict else re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", text)
    last = nums[-1].replace(",", "") if nums else None
    return normalize_math(last) if boxed and last else last


def last_boxed(text: str) -> str | None:
    """What the last \\boxed{...} (or \\fbox{...}) holds, nested braces and all ('\\boxed 5': up
    to the next '$'); None without one, or where its braces do not close."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):
        return rest.split("$")[0].strip() or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for j, c in enumerate(rest):
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return rest[1:j].strip() or None
    return None


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge(pred: str, ref: str) -> dict:
    """ROUGE-1/2/L F1 on lowercased alphanumeric tokens."""
    a, b = re.findall(r"[a-z0-9]+", pred.lower()), re.findall(r"[a-z0-9]+", ref.lower())
    out = {}
    for n in (1, 2):
        ga, gb = Counter(zip(*[a[i:] for i in range(n)])), Counter(zip(*[b[i:] for i in range(n)]))
        out[f"rouge{n}"] = _f1(sum((ga & gb).values()), sum(ga.values()), sum(gb.values()))
    # Longest common subsequence, one DP row at a time.
    prev = [0] * (len(b) + 1)
    for ta in a:
        cur = [0]
        for j, tb in enumerate(b):
            cur.append(prev[j] + 1 if ta == tb else max(prev[j + 1], cur[j]))
        prev = cur
    out["rougeL"] = _f1(prev[-1], len(a), len(b))
    return out


# -----------------------------------------------------------------------------
# Data sets: JSONL files of examples.


def _field(obj: dict, key: str, kind: type, where: str):
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(obj[key], kind):
        raise DataError(f"{where}: field {key!r} must be {kind.__name__}, "
                        f"got {type(obj[key]).__name__}")
    return obj[key]


def _example(obj, where: str, line: int) -> Example:
    json_object(obj, where, DataError)
    if "messages" in obj:
        turns = _field(obj, "messages", list, where)
        for t in turns:
            if (not isinstance(t, dict) or not isinstance(t.get("role"), str)
                    or not isinstance(t.get("content"), str)):
                raise DataError(f"{where}: field 'messages' must hold objects with string "
                                "'role' and 'content'")
        check_turns(turns, where)
        ex = Example(turns[:-1], turns[-1]["content"], line=line, shape="messages")
    elif "question" in obj:
        q, a = _field(obj, "question", str, where), _field(obj, "answer", str, where)
        ex = Example(q, a, line=line, shape="question")
    elif "prompt" in obj or "response" in obj:
        r = _field(obj, "response", str, where)
        ex = Example(_field(obj, "prompt", str, where), r, line=line)
    else:
        raise DataError(f"{where}: unknown shape with keys {sorted(obj)}; expected "
                        "prompt/response, messages, or question/answer")
    if not ex.response.strip():
        raise DataError(f"{where}: empty response")
    ex.answer, ex.boxed = final_answer(ex.response)
    return ex


def final_answer(response: str) -> tuple[str | None, bool]:
    """(the answer exact match scores, whether it is MATH's): a response with a final answer
    after '####' is scored as GSM8K is; else one with a \\boxed{...} answer as MATH is."""
    boxed = "####" not in response and last_boxed(response) is not None
    return (extract_answer(response, boxed=boxed) if "####" in response or boxed else None), boxed


ROLES = ("system", "user", "assistant")


def check_turns(turns: list[dict], where: str):
    """A conversation the chat templates can render: known roles, a system turn only first, and
    the reply (the target) an assistant turn that answers a user turn."""
    for i, t in enumerate(turns):
        if t["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {t['role']!r}, expected one of "
                            f"{list(ROLES)}")
        if t["role"] == "system" and i > 0:
            raise DataError(f"{where}: messages[{i}] is a system turn; only the first may be")
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise DataError(f"{where}: field 'messages' must end with a user turn and the "
                        "assistant's reply to it")


def _pair(obj, where: str, line: int) -> Example:
    """A preference pair: {"prompt", "chosen", "rejected"}, or {"messages": the turns before the
    reply, "chosen", "rejected"}; chosen and rejected are the replies' text. The chosen reply is
    read as the response of the prompt/response or messages shape, with the same checks."""
    json_object(obj, where, DataError)
    if "prompt" not in obj and "messages" not in obj:
        raise DataError(f"{where}: unknown shape with keys {sorted(obj)}; expected "
                        "prompt/chosen/rejected or messages/chosen/rejected")
    chosen, rejected = _field(obj, "chosen", str, where), _field(obj, "rejected", str, where)
    if "messages" in obj:
        if not _field(obj, "messages", list, where):
            raise DataError(f"{where}: field 'messages' must hold the turns before the reply")
        ex = _example({"messages": obj["messages"] + [{"role": "assistant", "content": chosen}]},
                      where, line)
    else:
        ex = _example({"prompt": obj["prompt"], "response": chosen}, where, line)
    if not rejected.strip():
        raise DataError(f"{where}: empty rejected response")
    ex.rejected = rejected
    return ex


def read_jsonl(path, pairs: bool = False, digest=None) -> list[Example]:
    """One Example per non-blank line of a regular file, read once; pairs: preference pairs
    (see _pair); digest: a hashlib object fed the bytes read."""
    path = Path(path)
    examples = []
    for line, raw in regular_lines(path, digest, DataError):  # binary: bad bytes get a line
        where = f"{path}:{line}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            continue
        obj = parse_json(text, where, DataError)
        examples.append((_pair if pairs else _example)(obj, where, line))
        first = examples[0]
        if examples[-1].shape != first.shape:  # one template per file: never switch silently
            raise DataError(f"{where}: a {{{examples[-1].shape}, ...}} row, but line "
                            f"{first.line} is a {{{first.shape}, ...}} row "
                            "(one shape per file)")
    if not examples:
        raise DataError(f"{path}: no examples (file is empty)")
    return examples


def load_rows(path, tok, task, max_len, overflow, need_ref, pairs=False, digest=None):
    """Rows and the task; pairs: preference pairs, rows (x, chosen) with Row.rejected; digest:
    a hashlib object fed the file's bytes as they are read."""
    examples = read_jsonl(path, pairs=pairs, digest=digest)
    if task == "auto":
        shapes = {e.shape for e in examples}
        task = "chat" if "messages" in shapes else "math" if "question" in shapes else "plain"
    try:
        if pairs:
            return encode_pairs(examples, tok, task, max_len, overflow), task
        return encode_rows(examples, tok, task, max_len, overflow, need_ref=need_ref), task
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
