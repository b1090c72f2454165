"""Chat templates: each checkpoint's own, recognised from its jinja text and rendered as token
ids, as transformers' apply_chat_template(add_generation_prompt=True) gives them. A reader of the
paper can skip this file: data.py's render_chat calls are all the method needs from it.
"""
from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: plumbing.tokenizer imports this module
    from plumbing.tokenizer import Tokenizer


# Each style's end-of-turn token ends a response (eos); None: the tokenizer's eos_token, which
# those templates put after an assistant turn themselves.
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
    ("gemma", ["'<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else",
               "messages[0]['content'] + '\n\n'", "'<start_of_turn>model\n'"]),  # Gemma 3
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
    if tok.chat_bos is None:
        raise ValueError(f"tokenizer {tok.name!r}: its chat template starts with bos_token, but "
                         "neither tokenizer_config.json's bos_token nor its post_processor names "
                         "a beginning-of-text token")
    return tok.chat_bos


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
    # Gemma 3's template puts a system turn's text (untrimmed) and a blank line before the first
    # user turn's; Gemma 2's refuses one, and gets Gemma 3's way here
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
