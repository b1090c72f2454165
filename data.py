"""Data: the paper's prompt templates, encoding examples into token rows, batching with loss
masks, the built-in arithmetic task and the evaluation helpers (exact match, ROUGE); then the
tokenizers and the JSONL readers they are fed by.

Paper: Cen et al., "Bridging the Training-Inference Gap in LLMs by Leveraging
Self-Generated Tokens". Templates are appendix A.1; batching follows A.2
(right padding, no packing).
"""
from __future__ import annotations

import os
import random
import re
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

# r50k_base (the GPT-2 vocabulary) is read from assets/ so no network is needed.
os.environ.setdefault("TIKTOKEN_CACHE_DIR",
                      str(Path(__file__).resolve().parent / "assets" / "tiktoken"))

import tiktoken  # noqa: E402  (must come after the cache dir is set)
import torch  # noqa: E402

from plumbing.checks import (inside, is_int, json_object, parse_json, read_json,  # noqa: E402
                             regular_lines)


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


# Chat templates: the checkpoint's own, recognised from its jinja text and rendered here. Each
# style's end-of-turn token ends a response (eos); None: the tokenizer's eos_token, which those
# templates put after an assistant turn themselves.
CHAT_STYLES = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>",
               "llama3.2": "<|eot_id|>",
               "mistral": None, "zephyr": None, "gemma": "<end_of_turn>", "phi3": "<|end|>",
               "phi3.5": "<|end|>"}
# (style, marks its jinja text has, with "\n" for a newline) in the order they are tried
TEMPLATE_MARKS = [
    ("chatml", ["<|im_start|>", "<|im_end|>", "'<|im_start|>assistant\n'"]),
    ("llama3.2", ["<|start_header_id|>", "Cutting Knowledge Date: December 2023\n",
                  "Today Date: ", "strftime_now", "<|eot_id|>"]),
    ("llama3.1", ["<|start_header_id|>", "Cutting Knowledge Date: December 2023\n",
                  "Today Date: ", "<|eot_id|>"]),
    ("llama3", ["<|start_header_id|>", "'<|end_header_id|>\n\n'+ message['content'] | trim",
                "<|eot_id|>"]),
    ("mistral", ["' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]'",
                 "' ' + message['content'] + eos_token"]),
    ("zephyr", ["'<|user|>\n' + message['content'] + eos_token", "'<|assistant|>'"]),
    ("gemma", ["'<start_of_turn>' + role + '\n' + message['content'] | trim + "
               "'<end_of_turn>\n'", "'<start_of_turn>model\n'"]),
    ("phi3.5", ["message['role'] == 'system' and message['content'] %}{{'<|system|>\n'",
                "'<|user|>\n' + message['content'] + '<|end|>\n'"]),
    ("phi3", ["{{'<|system|>\n' + message['content'] + '<|end|>\n'}}",
              "'<|user|>\n' + message['content'] + '<|end|>\n'"]),
]


def chat_style(template: str) -> str | None:
    """The CHAT_STYLES key of a chat template's jinja text, or None if it is none we know."""
    text = template.replace("\\n", "\n")
    return next((style for style, marks in TEMPLATE_MARKS if all(m in text for m in marks)),
                None)


def default_system(template: str) -> str | None:
    """The system turn a ChatML template inserts when the conversation has none (Qwen2.5's
    "You are Qwen, created by Alibaba Cloud...", SmolLM2's), or None (Qwen3 inserts none)."""
    m = re.search(r"'<\|im_start\|>system(?:\n|\\n)([^'+]*)<\|im_end\|>", template)
    return m.group(1) if m else None


def render_chat(turns: list[dict], tok: Tokenizer) -> list[int]:
    """Token ids of the turns followed by the opening of the assistant's turn, as transformers'
    apply_chat_template(add_generation_prompt=True) gives them for the checkpoint's template.

    Special tokens come from tok.special and text from tok.encode, so text in a turn can never
    become a special token. Without a template (our byte and GPT-2 tokenizers, Pythia): zephyr,
    the role tags plain text and each turn ended by eos (the paper's </s>).
    """
    if tok.bad_template:
        raise ValueError(f"{tok.bad_template}: chat template not recognised (known: ChatML, "
                         "Llama-3, Mistral [INST], zephyr, Gemma, Phi-3); use --task plain")
    style = tok.chat or "zephyr"
    return _template_ids(RENDERERS[style](turns, tok), tok)


def _template_ids(parts: list, tok: Tokenizer) -> list[int]:
    # parts: special ids and text; the text between two specials is encoded as one string, as
    # transformers does with the rendered template (only the first starts the string)
    ids, text = [], ""
    for p in parts + [None]:
        if isinstance(p, str):
            text += p
            continue
        if text:
            ids += tok.encode(text, first=not ids)
            text = ""
        if p is not None:
            ids.append(p)
    return ids


def _tag(s: str, tok: Tokenizer):
    # a role tag is a special token where the tokenizer has one (Phi-3), else text (zephyr)
    return tok.special(s) if s in tok.enc.special_tokens_set else s


def _need_bos(tok: Tokenizer) -> int:
    if tok.bos_id is None:
        raise ValueError(f"tokenizer {tok.name!r}: its chat template starts with bos_token, but "
                         "its post_processor names no beginning-of-text token")
    return tok.bos_id


def _alternating(turns: list[dict]) -> tuple[str | None, list[dict]]:
    # Mistral's and Gemma's templates: an optional system turn, then user/assistant/user/...
    system, rest = (turns[0]["content"], turns[1:]) if turns[0]["role"] == "system" else \
        (None, turns)
    for i, t in enumerate(rest):
        if t["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"turn {i + 1} has role {t['role']!r}: after an optional system "
                             "turn this chat template needs user/assistant/user/... turns")
    return system, rest


def _chatml(turns, tok):
    s, e = tok.special("<|im_start|>"), tok.special("<|im_end|>")
    parts = []
    if tok.system is not None and turns[0]["role"] != "system":
        parts += [s, f"system\n{tok.system}", e, "\n"]
    for t in turns:
        parts += [s, f"{t['role']}\n{t['content']}", e, "\n"]
    return parts + [s, "assistant\n"]


def _llama3(turns, tok, date=None):
    head, end_head, eot = (tok.special(t) for t in
                           ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    parts = [_need_bos(tok)]
    if date:  # Llama-3.1/3.2: always a system turn, with a date in it
        system, turns = (turns[0]["content"].strip(), turns[1:]) if turns[0]["role"] == "system" \
            else ("", turns)
        parts += [head, "system", end_head, "\n\nCutting Knowledge Date: December 2023\n"
                  f"Today Date: {date}\n\n{system}", eot]
    for t in turns:
        parts += [head, t["role"], end_head, "\n\n" + t["content"].strip(), eot]
    return parts + [head, "assistant", end_head, "\n\n"]


def _mistral(turns, tok):
    system, rest = _alternating(turns)
    parts = [_need_bos(tok)]
    for i, t in enumerate(rest):
        if t["role"] == "user":
            sys_text = system + "\n\n" if i == 0 and system is not None else ""
            parts += [f" [INST] {sys_text}{t['content']} [/INST]"]
        else:
            parts += [" " + t["content"], tok.eos_id]
    return parts


def _zephyr(turns, tok):
    parts = []
    for t in turns:
        if t["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"role {t['role']!r}: the zephyr template has system, user and "
                             "assistant turns only")
        parts += [_tag(f"<|{t['role']}|>", tok), f"\n{t['content']}", tok.eos_id, "\n"]
    return parts + [_tag("<|assistant|>", tok), "\n"]


def _gemma(turns, tok):
    # Gemma 2's template refuses a system turn; as Gemma 3's does, its text and a blank line go
    # before the first user turn's
    system, rest = _alternating(turns)
    start, end = tok.special("<start_of_turn>"), tok.special("<end_of_turn>")
    parts = [_need_bos(tok)]
    for i, t in enumerate(rest):
        prefix = system + "\n\n" if i == 0 and system is not None else ""
        role = "model" if t["role"] == "assistant" else t["role"]
        parts += [start, f"{role}\n{prefix}{t['content'].strip()}", end, "\n"]
    return parts + [start, "model\n"]


def _phi3(turns, tok, skip_empty_system=False):
    end = _tag("<|end|>", tok)
    parts = []
    for t in turns:
        if t["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"role {t['role']!r}: the Phi-3 template has system, user and "
                             "assistant turns only")
        if t["role"] == "system" and skip_empty_system and not t["content"]:
            continue  # Phi-3.5's template drops an empty system turn
        parts += [_tag(f"<|{t['role']}|>", tok), f"\n{t['content']}", end, "\n"]
    return parts + [_tag("<|assistant|>", tok), "\n"]


RENDERERS = {"chatml": _chatml, "llama3": _llama3,
             "llama3.1": lambda turns, tok: _llama3(turns, tok, "26 Jul 2024"),
             # today's date, as transformers' strftime_now gives it to Llama-3.2's template
             "llama3.2": lambda turns, tok: _llama3(turns, tok, time.strftime("%d %b %Y")),
             "mistral": _mistral, "zephyr": _zephyr, "gemma": _gemma, "phi3": _phi3,
             "phi3.5": lambda turns, tok: _phi3(turns, tok, skip_empty_system=True)}


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
        if ex.shape == "question" and "####" not in y:  # its answer is what exact match scores
            raise DataError(f"line {ex.line}: the answer has no final '#### <number>' "
                            "(the math task scores it)")
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
               ex.response, shape=ex.shape)


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
    """Right-padded (x, y, mask), B x T, no packing (appendix A.2), on `device`.

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
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.float)
    for i, (xi, yi, mi) in enumerate(rows):
        x[i, :len(xi)] = torch.tensor(xi)
        y[i, :len(yi)] = torch.tensor(yi)
        mask[i, :len(mi)] = torch.tensor(mi, dtype=torch.float)
    return x.to(device), y.to(device), mask.to(device)


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


def extract_answer(text: str, strict: bool = True) -> str | None:
    """GSM8K's strict match: the number right after the last '####' (None without one). Not
    strict: that, else the last number in the text (a laxer score, reported apart)."""
    if "####" in text:
        found = re.match(r"\s*(-?\d[\d,]*(?:\.\d+)?)", text.rsplit("####", 1)[1])
        return found[1].replace(",", "") if found else None
    nums = [] if strict else re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", text)
    return nums[-1].replace(",", "") if nums else None


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
# Tokenizers. Byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama-3, GPT-NeoX) is a tiktoken.Encoding;
# SentencePiece-style BPE with byte fallback (Mistral-7B, Llama-2), which tiktoken cannot
# express, is a small BPE in plain Python (SentencePiece below). Around either, as the
# tokenizers library does: the tokenizer.json's normalizer (NFC, or Prepend/Replace of "▁"), its
# non-special added tokens (GPT-NeoX's "  ", split out of the text before BPE), and the
# beginning-of-text token its post-processor puts first (Tokenizer.bos_id).

# The pre-tokenizer regex of r50k_base (GPT-2), as tiktoken writes it.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-2's regex after a Hugging Face Digits(individual_digits) step (SmolLM2):
# every digit is its own piece, and whitespace before a digit ends a piece,
# as it would at the end of the stretch the Digits step cut off.
DIGITS_PAT = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++|\p{N}| ?[^\s\p{L}\p{N}]++|\s++(?:$|(?=\p{N}))"""
              r"""|\s+(?!\S)|\s""")
MAX_ID = 1 << 20  # the largest vocabulary model.py accepts (plumbing/hf_families.LIMITS)
BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")  # SentencePiece's byte-fallback pieces


@dataclass
class Tokenizer:
    enc: tiktoken.Encoding | SentencePiece  # the BPE of one stretch of normalized text
    eos_id: int  # appended to every response; generation stops on it
    chat: str | None  # a CHAT_STYLES key, or None (no template: zephyr-style text)
    name: str  # "bytes", "r50k_base" or "tokenizer.json"
    bos_id: int | None = None  # put first by the post-processor (Mistral <s>, Llama-3)
    normalizer: tuple = ()  # tokenizer.json normalizer steps, applied between added tokens
    raw_added: re.Pattern | None = None  # non-special added tokens matched before normalizing
    norm_added: re.Pattern | None = None  # ... and those matched after
    added_ids: dict = field(default_factory=dict)  # their ids
    system: str | None = None  # the system turn a ChatML template inserts when there is none
    bad_template: str = ""  # the file of a chat template we cannot render (refused in render_chat)
    # byte-level: the bytes that have a token, when not all do (SmolLM2 has none for 0x04 ...)
    spelled: bytes | None = None
    source: str = ""  # the tokenizer.json, for messages

    def encode(self, text: str, first: bool = True) -> list[int]:
        """tokenizers' encode(text, add_special_tokens=False) with special-token strings kept as
        text: specials only enter through special(), never through text. first: the text starts
        the string (a Metaspace "first" pre-tokenizer prepends "▁" only there)."""
        ids = []
        for at, stretch, tid in _split_added(text, self.raw_added, self.added_ids, 0):
            if tid is not None:
                ids.append(tid)
                continue
            for at2, s, tid2 in _split_added(_normalize(stretch, self.normalizer),
                                             self.norm_added, self.added_ids, at):
                if tid2 is not None:
                    ids.append(tid2)
                elif isinstance(self.enc, SentencePiece):
                    ids += self.enc.encode(s, first and at2 == 0)
                else:
                    if self.spelled is not None and s.encode().translate(None, self.spelled):
                        self.unspellable(s)
                    ids += self.enc.encode_ordinary(s)
        return ids

    def unspellable(self, s: str):
        # tiktoken would panic on a byte without a token (tokenizers drops it silently)
        b = s.encode().translate(None, self.spelled)[0]
        c = next(c for c in s if b in c.encode())
        raise ValueError(f"{self.source}: the text has {c!r} (U+{ord(c):04X}), whose byte "
                         f"0x{b:02X} has no token in this tokenizer")

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def special(self, s: str) -> int:
        if s not in self.enc.special_tokens_set:
            raise KeyError(f"tokenizer {self.name!r} has no special token {s!r}; it has "
                           f"{sorted(self.enc.special_tokens_set)}")
        return self.enc.encode_single_token(s)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab


def with_bos(ids: list[int], tok: Tokenizer) -> list[int]:
    """ids with the tokenizer's beginning-of-text token first, once (a template may have put it)."""
    return ids if tok.bos_id is None or ids[:1] == [tok.bos_id] else [tok.bos_id] + ids


def _split_added(text: str, pattern, ids: dict, at: int) -> list[tuple]:
    """(offset, stretch, None) for the text between added tokens, (offset, token, id) for each
    one; pattern alternates the tokens longest first, so the leftmost longest one matches."""
    if pattern is None:
        return [(at, text, None)] if text else []
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append((at + pos, text[pos:m.start()], None))
        out.append((at + m.start(), m.group(), ids[m.group()]))
        pos = m.end()
    return out + ([(at + pos, text[pos:], None)] if pos < len(text) else [])


def _normalize(text: str, steps: tuple) -> str:
    for kind, a, b in steps:
        if kind == "NFC":
            text = unicodedata.normalize("NFC", text)
        elif kind == "Prepend":
            text = a + text if text else text
        else:  # Replace
            text = text.replace(a, b)
    return text


@dataclass
class SentencePiece:
    """SentencePiece-style BPE with byte fallback, the model half of a tokenizer.json: BPE over
    characters by merge rank; a character outside the vocabulary becomes its UTF-8 bytes as
    <0xNN> tokens. The same attributes as the tiktoken.Encoding that Tokenizer uses."""
    vocab: dict  # piece -> id
    ranks: dict  # (left, right) -> rank, the merges list
    pieces: dict  # id -> piece, added tokens included
    special_tokens: dict  # every added token -> id
    metaspace: tuple | None  # (prepend_scheme, split) of a Metaspace pre-tokenizer
    decoder: tuple  # tokenizer.json decoder steps
    unk_id: int | None
    byte_fallback: bool
    ignore_merges: bool
    # Where no merge can join the characters on both sides: a split there changes nothing, so
    # BPE runs (and is cached) per word instead of per text.
    boundary: re.Pattern | None
    cache: dict = field(default_factory=dict)

    def encode(self, text: str, first: bool = True) -> list[int]:
        if self.metaspace:
            scheme, split = self.metaspace
            text = text.replace(" ", "▁")
            if (scheme == "always" or scheme == "first" and first) and not text.startswith("▁"):
                text = "▁" + text
            words = re.split(r"(?=▁)", text) if split else [text]
        else:
            words = [text]
        ids = []
        for word in words:
            if self.ignore_merges and word in self.vocab:
                ids.append(self.vocab[word])
                continue
            for chunk in self.boundary.split(word) if self.boundary else [word]:
                if chunk not in self.cache:
                    if len(self.cache) > 100_000:
                        self.cache.clear()
                    self.cache[chunk] = self.bpe(chunk)
                ids += self.cache[chunk]
        return ids

    def bpe(self, chunk: str) -> list[int]:
        parts = list(chunk)
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(p, MAX_ID), p) for p in zip(parts, parts[1:]))
            if rank == MAX_ID:
                break
            merged, i = [], 0
            while i < len(parts):  # every occurrence of the pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = []
        for p in parts:
            if p in self.vocab:
                ids.append(self.vocab[p])
            elif self.byte_fallback and all(f"<0x{b:02X}>" in self.vocab for b in p.encode()):
                ids += [self.vocab[f"<0x{b:02X}>"] for b in p.encode()]
            elif self.unk_id is not None:
                ids.append(self.unk_id)
            else:
                raise ValueError(f"character {p!r} has no token and the tokenizer has no unk")
        return ids

    def decode(self, ids: list[int]) -> str:
        tokens = [self.pieces[i] for i in ids]
        for kind, a, b in self.decoder:
            if kind == "Replace":
                tokens = [t.replace(a, b) for t in tokens]
            elif kind == "ByteFallback":
                tokens = _fuse_bytes(tokens)
            elif kind == "Fuse":
                tokens = ["".join(tokens)]
            elif kind == "Strip":  # up to a leading and b trailing spaces of each token
                tokens = [_strip(t, a, b) for t in tokens]
            else:  # Metaspace: "▁" is a space, and none of them in the first token
                tokens = [t.replace("▁", "" if i == 0 and a != "never" else " ")
                          for i, t in enumerate(tokens)]
        return "".join(tokens)

    def decode_single_token_bytes(self, i: int) -> bytes:
        m = BYTE_TOKEN.fullmatch(self.pieces[i])
        return bytes([int(m.group(1), 16)]) if m else self.pieces[i].replace("▁", " ").encode()

    @property
    def special_tokens_set(self) -> set:
        return set(self.special_tokens)

    def encode_single_token(self, s: str) -> int:
        return self.special_tokens[s]

    @property
    def n_vocab(self) -> int:
        return max(self.pieces) + 1


def _fuse_bytes(tokens: list[str]) -> list[str]:
    # tokenizers' ByteFallback: a run of <0xNN> tokens is one UTF-8 string, or one U+FFFD each.
    out, run = [], []
    for t in tokens + [""]:
        m = BYTE_TOKEN.fullmatch(t)
        if m:
            run.append(int(m.group(1), 16))
            continue
        if run:
            try:
                out.append(bytes(run).decode("utf-8"))
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(run)
            run = []
        out.append(t)
    return out[:-1]


def _strip(t: str, start: int, stop: int) -> str:
    lead = len(t) - len(t.lstrip(" "))
    trail = len(t) - len(t.rstrip(" "))
    return t[min(lead, start):len(t) - min(trail, stop)]


def byte_tokenizer() -> Tokenizer:
    # 256 byte tokens and no merges: any UTF-8 text round-trips, vocab 257.
    enc = tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]",
                            mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|endoftext|>": 256})
    return Tokenizer(enc, eos_id=256, chat=None, name="bytes")


def gpt2_tokenizer() -> Tokenizer:
    return Tokenizer(tiktoken.get_encoding("r50k_base"), eos_id=50256, chat=None, name="r50k_base")


def bytes_to_unicode() -> dict[int, str]:
    # GPT-2's table: byte-level BPE vocabularies spell every byte as a printable character.
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _steps(spec: dict | None, key: str) -> list[dict]:
    """The steps of a tokenizer.json normalizer/pre_tokenizer/decoder/post_processor."""
    if spec is None:
        return []
    return spec[key] if spec.get("type") == "Sequence" else [spec]


def _pattern(pre: dict | None, path: Path) -> str:
    """The regex that reproduces a byte-level tokenizer.json pre_tokenizer, or ValueError."""
    pat, digits, split = None, False, False
    for s in _steps(pre, "pretokenizers"):
        kind = s.get("type")
        if kind == "ByteLevel" and not s.get("add_prefix_space", False):
            pat = pat or (GPT2_PAT if s.get("use_regex", True) else None)
        elif (kind == "Split" and "Regex" in s.get("pattern", {}) and not s.get("invert")
              and s.get("behavior", "Isolated") == "Isolated" and not split):
            pat, split = s["pattern"]["Regex"], True
        elif kind == "Digits" and s.get("individual_digits"):
            digits = True
        else:
            raise ValueError(f"{path}: unsupported pre_tokenizer step {s}")
    if split and any(s.get("type") == "ByteLevel" and s.get("use_regex", True)
                     for s in _steps(pre, "pretokenizers")):
        raise ValueError(f"{path}: a Split regex followed by ByteLevel's own regex is not "
                         "supported (set ByteLevel use_regex false)")
    if digits and pat != GPT2_PAT:
        raise ValueError(f"{path}: Digits together with a Split regex is not supported")
    return DIGITS_PAT if digits else pat or r"[\s\S]+"


def _normalizer(spec: dict | None, path: Path) -> tuple:
    steps = []
    for s in _steps(spec, "normalizers"):
        kind = s.get("type")
        if kind == "NFC":
            steps.append(("NFC", "", ""))
        elif kind == "Prepend" and isinstance(s.get("prepend"), str):
            steps.append(("Prepend", s["prepend"], ""))
        elif kind == "Replace" and isinstance(s.get("pattern", {}).get("String"), str):
            steps.append(("Replace", s["pattern"]["String"], s["content"]))
        else:
            raise ValueError(f"{path}: unsupported normalizer step {s}")
    return tuple(steps)


def _decoder(spec: dict | None, path: Path) -> tuple:
    steps = []
    for s in _steps(spec, "decoders"):
        kind = s.get("type")
        if kind == "Replace" and isinstance(s.get("pattern", {}).get("String"), str):
            steps.append(("Replace", s["pattern"]["String"], s["content"]))
        elif kind in ("ByteFallback", "Fuse"):
            steps.append((kind, "", ""))
        elif kind == "Strip" and s.get("content", " ") == " ":
            steps.append(("Strip", s.get("start", 0), s.get("stop", 0)))
        elif kind == "Metaspace" and s.get("replacement", "▁") == "▁":
            steps.append(("Metaspace", _prepend_scheme(s), ""))
        else:
            raise ValueError(f"{path}: unsupported decoder step {s}")
    return tuple(steps)


def _prepend_scheme(s: dict) -> str:
    # older tokenizer.json files say add_prefix_space instead of prepend_scheme
    return s.get("prepend_scheme") or ("always" if s.get("add_prefix_space", True) else "never")


def _vocab(tj: dict, path: Path) -> tuple[dict, dict]:
    """The vocabulary and the added tokens {content: token entry}, ids checked: integers in
    [0, MAX_ID), each id one token, an added token's id not another vocabulary token's."""
    vocab, added, at = tj["model"]["vocab"], {}, {}
    for piece, i in vocab.items():
        if not is_int(i) or not 0 <= i < MAX_ID:
            raise ValueError(f"{path}: token {piece!r} has id {i!r}, expected an integer in "
                             f"[0, {MAX_ID})")
        if i in at:
            raise ValueError(f"{path}: id {i} is given to both {at[i]!r} and {piece!r}")
        at[i] = piece
    seen = {}
    for t in tj.get("added_tokens", []):
        i, content = t.get("id"), t.get("content")
        if not is_int(i) or not 0 <= i < MAX_ID or not isinstance(content, str) or not content:
            raise ValueError(f"{path}: added token {t} needs a text 'content' and an integer "
                             f"'id' in [0, {MAX_ID})")
        if i in seen or content in added:
            raise ValueError(f"{path}: added token {content!r} (id {i}) repeats "
                             f"{seen.get(i, content)!r}")
        if i in at and at[i] != content:
            raise ValueError(f"{path}: added token {content!r} has id {i}, which the vocabulary "
                             f"gives to {at[i]!r}")
        if not t.get("special") and (t.get("lstrip") or t.get("rstrip") or t.get("single_word")):
            raise ValueError(f"{path}: added token {content!r}: lstrip, rstrip and single_word "
                             "are not supported")
        seen[i], added[content] = content, t
    return vocab, added


def _byte_level(tj: dict, vocab: dict, added: dict, path: Path) -> tiktoken.Encoding:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added_ids = {t["id"] for t in added.values()}
    ranks = {}
    for s, i in vocab.items():
        if i in added_ids:
            continue
        if any(c not in byte_of for c in s):
            raise ValueError(f"{path}: vocabulary is not byte-level (token {s!r} has a "
                             "character that is no byte)")
        ranks[bytes(byte_of[c] for c in s)] = i
    try:
        return tiktoken.Encoding(name="tokenizer.json", pat_str=_pattern(tj.get("pre_tokenizer"),
                                 path), mergeable_ranks=ranks,
                                 special_tokens={c: t["id"] for c, t in added.items()})
    except ValueError as e:  # e.g. a Split regex that tiktoken's regex engine cannot compile
        raise ValueError(f"{path}: tiktoken refuses it ({' '.join(str(e).split())})") from None


def _sentencepiece(tj: dict, vocab: dict, added: dict, path: Path) -> SentencePiece:
    model = tj["model"]
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("dropout"):
        raise ValueError(f"{path}: BPE continuing_subword_prefix, end_of_word_suffix and dropout "
                         "are not supported")
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    ranks = {}
    for r, m in enumerate(merges):
        if len(m) != 2 or any(p not in vocab for p in m) or "".join(m) not in vocab:
            raise ValueError(f"{path}: merge {r} {m!r} is not a pair of vocabulary tokens "
                             "whose join is one")
        if any(BYTE_TOKEN.fullmatch(p) for p in m):
            raise ValueError(f"{path}: merge {r} {m!r} joins a byte-fallback token "
                             "(not supported)")
        ranks.setdefault(tuple(m), r)
    pre = _steps(tj.get("pre_tokenizer"), "pretokenizers")
    if any(s.get("type") != "Metaspace" or s.get("replacement", "▁") != "▁" for s in pre) \
            or len(pre) > 1:
        raise ValueError(f"{path}: unsupported pre_tokenizer {tj.get('pre_tokenizer')} for a "
                         "SentencePiece-style BPE (expected none or Metaspace)")
    metaspace = (_prepend_scheme(pre[0]), pre[0].get("split", True)) if pre else None
    unk = model.get("unk_token")
    if unk is not None and unk not in vocab:
        raise ValueError(f"{path}: unk_token {unk!r} is not in the vocabulary")
    # a character x before "▁" is never merged with it unless some merge ends in x and the next
    # part starts with "▁"
    joined = "".join(sorted({a[-1] for a, b in ranks if b.startswith("▁")}))
    boundary = re.compile(f"(?<![{re.escape(joined)}])(?=▁)" if joined else "(?=▁)")
    return SentencePiece(vocab, ranks, {**{i: s for s, i in vocab.items()},
                                        **{t["id"]: c for c, t in added.items()}},
                         {c: t["id"] for c, t in added.items()}, metaspace,
                         _decoder(tj.get("decoder"), path), vocab.get(unk),
                         bool(model.get("byte_fallback")), bool(model.get("ignore_merges")),
                         boundary)


def _bos(post: dict | None, added: dict, path: Path) -> int | None:
    """The token a TemplateProcessing post-processor puts before the text, if any. What it puts
    after is left out: a response gets eos from encode_example, a prompt nothing."""
    bos = None
    for s in _steps(post, "processors"):
        kind = s.get("type")
        if kind == "ByteLevel":
            continue  # offsets only
        if kind != "TemplateProcessing":
            raise ValueError(f"{path}: unsupported post_processor {kind!r}")
        first = s["single"][0]
        if "SpecialToken" in first:
            name = first["SpecialToken"]["id"]
            ids = s["special_tokens"][name]["ids"]
            if len(ids) != 1 or name not in added or added[name]["id"] != ids[0]:
                raise ValueError(f"{path}: post_processor puts {name!r} first, which is not one "
                                 "added token")
            bos = ids[0]
    return bos


def _tokenizer_from_json(folder: Path) -> Tokenizer:
    """A Hugging Face tokenizer.json (BPE) as a Tokenizer, checked before tiktoken sees it.

    Byte-level (a ByteLevel pre-tokenizer): tiktoken merges the adjacent pair whose
    concatenation has the lowest id; HF merges by the order of the merges list. The two agree
    when ids follow merge order, which holds for vocabularies trained by BPE (GPT-2, SmolLM2);
    tests/test_tokenizers.py checks each style against the tokenizers library.
    """
    path = inside(folder, "tokenizer.json")
    tj = read_json(path)
    model = tj.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: needs a 'model' object with a 'vocab' (a tokenizer.json)")
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: only BPE models are supported, got {model.get('type')!r}")
    try:
        return _encoding(tj, folder, path)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a field of the wrong shape
        raise ValueError(f"{path}: malformed tokenizer ({type(e).__name__}: {e})") from None


def _encoding(tj: dict, folder: Path, path: Path) -> Tokenizer:
    vocab, added = _vocab(tj, path)
    normalizer = _normalizer(tj.get("normalizer"), path)
    byte_level = any(s.get("type") == "ByteLevel"
                     for s in _steps(tj.get("pre_tokenizer"), "pretokenizers"))
    enc = (_byte_level if byte_level else _sentencepiece)(tj, vocab, added, path)
    plain = {c: t for c, t in added.items() if not t.get("special")}
    if any(t.get("normalized", True) for t in plain.values()) \
            and any(kind != "NFC" for kind, _, _ in normalizer):
        raise ValueError(f"{path}: normalized added tokens with a Prepend/Replace normalizer "
                         "are not supported")

    def alternation(tokens):  # longest first: the leftmost longest token matches
        return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) \
            if tokens else None
    raw = alternation([c for c, t in plain.items() if not t.get("normalized", True)])
    norm = {_normalize(c, normalizer): t["id"] for c, t in plain.items()
            if t.get("normalized", True)}
    ids = {**{c: t["id"] for c, t in plain.items()}, **norm}
    tok = Tokenizer(enc, eos_id=-1, chat=None, name="tokenizer.json",
                    bos_id=_bos(tj.get("post_processor"), added, path), normalizer=normalizer,
                    raw_added=raw, norm_added=alternation(list(norm)), added_ids=ids,
                    source=str(path))
    if byte_level:  # Tokenizer.encode refuses text with a byte that has no token
        added_ids = {t["id"] for t in added.values()}
        spelled = bytes(sorted(b for b, c in bytes_to_unicode().items()
                               if c in vocab and vocab[c] not in added_ids))
        tok.spelled = spelled if len(spelled) < 256 else None
    return _with_template(tok, folder, path, added)


def _with_template(tok: Tokenizer, folder: Path, path: Path, added: dict) -> Tokenizer:
    """eos and the chat style from tokenizer_config.json (or chat_template.jinja beside it)."""
    cfg_path = inside(folder, "tokenizer_config.json")
    cfg = read_json(cfg_path) if cfg_path.exists() else {}
    # Newer transformers save the chat template beside the config.
    jinja = inside(folder, "chat_template.jinja")
    source, template = (jinja, jinja.read_text(encoding="utf-8")) if jinja.exists() else \
        (cfg_path, cfg.get("chat_template") or "")
    if isinstance(template, list):  # the older list of named templates
        template = next((t.get("template", "") for t in template if t.get("name") == "default"),
                        "")
    eos = cfg.get("eos_token") or "<|endoftext|>"
    eos = eos["content"] if isinstance(eos, dict) else eos
    if template:
        tok.chat = chat_style(str(template))
        tok.bad_template = "" if tok.chat else str(source)
        tok.system = default_system(str(template)) if tok.chat == "chatml" else None
        eos = CHAT_STYLES.get(tok.chat) or eos
    if eos not in added:
        raise ValueError(f"{path}: eos token {eos!r} is not among the added tokens "
                         f"{sorted(added)}")
    tok.eos_id = added[eos]["id"]
    return tok


def load_tokenizer(ckpt_dir) -> Tokenizer:
    folder = Path(ckpt_dir)
    cfg_path = inside(folder, "config.json")
    cfg = read_json(cfg_path) if cfg_path.exists() else {}
    if "tiktoken" in cfg:  # our own checkpoints
        makers = {"bytes": byte_tokenizer, "r50k_base": gpt2_tokenizer}
        if not isinstance(cfg["tiktoken"], str) or cfg["tiktoken"] not in makers:
            raise ValueError(f"{cfg_path}: unknown tiktoken {cfg['tiktoken']!r}, "
                             f"expected one of {list(makers)}")
        return makers[cfg["tiktoken"]]()
    if inside(folder, "tokenizer.json").exists():
        return _tokenizer_from_json(folder)
    if cfg.get("model_type") == "gpt2":
        return gpt2_tokenizer()
    raise ValueError(f"{folder}: no tokenizer found: need config.json with 'tiktoken', "
                     f"a tokenizer.json, or config.json with model_type 'gpt2'")


def check_vocab(tok: Tokenizer, vocab_size: int, where):
    """A token id past the model's embedding would fail mid-run (or decode garbage): refuse it."""
    if tok.vocab_size > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model's "
                         f"embedding only {vocab_size} (use the tokenizer the model was made with)")


# -----------------------------------------------------------------------------
# Data sets: JSONL files of examples.


class DataError(ValueError):
    pass


@dataclass
class Example:
    prompt: str | list[dict]  # plain text, or the chat turns before the target
    response: str  # the reference continuation y, without end-of-text
    answer: str | None = None  # final answer for exact match
    line: int = 0  # line in the source file, for error messages (0: not from a file)
    shape: str = "prompt"  # which JSONL shape it came from: "prompt", "messages" or "question"
    rejected: str | None = None  # a preference pair's rejected response (read_jsonl(pairs=True))


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
        r = turns[-1]["content"]
        ex = Example(turns[:-1], r, answer=final_answer(r), line=line, shape="messages")
    elif "question" in obj:
        q, a = _field(obj, "question", str, where), _field(obj, "answer", str, where)
        ex = Example(q, a, answer=extract_answer(a), line=line, shape="question")
    elif "prompt" in obj or "response" in obj:
        r = _field(obj, "response", str, where)
        ex = Example(_field(obj, "prompt", str, where), r, answer=final_answer(r), line=line)
    else:
        raise DataError(f"{where}: unknown shape with keys {sorted(obj)}; expected "
                        "prompt/response, messages, or question/answer")
    if not ex.response.strip():
        raise DataError(f"{where}: empty response")
    return ex


def final_answer(response: str) -> str | None:
    """A response with a final answer after '####' is scored by exact match, as GSM8K is."""
    return extract_answer(response) if "####" in response else None


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
