"""Tokenizers. A reader of the paper can skip this file: to the method a tokenizer is text to ids
and back (Tokenizer.encode, decode) with an end-of-text id (eos_id).

Byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama-3, GPT-NeoX) is a tiktoken.Encoding;
SentencePiece-style BPE with byte fallback (Mistral-7B, Llama-2, Gemma 3), which tiktoken cannot
express, is a small BPE in plain Python (SentencePiece below). Around either, as the tokenizers
library does: the tokenizer.json's normalizer (NFC, or Prepend/Replace of "▁"), its non-special
added tokens (GPT-NeoX's "  ", split out of the text before BPE), and the beginning-of-text token
its post-processor puts first (Tokenizer.bos_id). Also our own two: the byte tokenizer and GPT-2's
r50k_base.
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken

from plumbing.chat_templates import CHAT_STYLES, chat_style, default_system
from plumbing.checks import inside, is_int, read_json

ROOT = Path(__file__).resolve().parent.parent  # the repository, where assets/ lies

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
    split: re.Pattern | None = None  # a Split pre-tokenizer on a string (Gemma's, on " ")
    cache: dict = field(default_factory=dict)

    def encode(self, text: str, first: bool = True) -> list[int]:
        if self.metaspace:
            scheme, split = self.metaspace
            text = text.replace(" ", "▁")
            if (scheme == "always" or scheme == "first" and first) and not text.startswith("▁"):
                text = "▁" + text
            words = re.split(r"(?=▁)", text) if split else [text]
        else:
            words = [w for w in self.split.split(text) if w] if self.split else [text]
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


@dataclass
class Tokenizer:
    enc: tiktoken.Encoding | SentencePiece  # the BPE of one stretch of normalized text
    eos_id: int  # appended to every response; generation stops on it
    chat: str | None  # a CHAT_STYLES key, or None (no template: zephyr-style text)
    name: str  # "bytes", "r50k_base" or "tokenizer.json"
    bos_id: int | None = None  # put first by the post-processor (Mistral <s>, Llama-3)
    # what a chat template's bos_token is: tokenizer_config.json's, else bos_id (the first
    # Llama-3 release has no post-processor to name it)
    chat_bos: int | None = None
    normalizer: tuple = ()  # tokenizer.json normalizer steps, applied between added tokens
    raw_added: re.Pattern | None = None  # non-special added tokens matched before normalizing
    norm_added: re.Pattern | None = None  # ... and those matched after
    added_ids: dict = field(default_factory=dict)  # their ids
    system: str | None = None  # the system turn a ChatML template inserts when there is none
    bad_template: str = ""  # the file of a chat template we cannot render (refused in render_chat)
    # byte-level: the bytes that have a token, when not all do (SmolLM2 has none for 0x04 ...)
    spelled: bytes | None = None
    source: str = ""  # the tokenizer.json, for messages
    usable: int = MAX_ID  # ids below this only: the model's embedding (check_vocab)

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
        i = self.enc.encode_single_token(s)
        if i >= self.usable:
            raise ValueError(f"{self.source or self.name}: special token {s!r} has id {i}, past "
                             f"the model's embedding of {self.usable}")
        return i

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


def byte_tokenizer() -> Tokenizer:
    # 256 byte tokens and no merges: any UTF-8 text round-trips, vocab 257.
    enc = tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]",
                            mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|endoftext|>": 256})
    return Tokenizer(enc, eos_id=256, chat=None, name="bytes")


def gpt2_tokenizer() -> Tokenizer:
    # r50k_base (the GPT-2 vocabulary) is read from assets/ so no network is needed; the cache
    # folder is set here, not at import, so that importing this module changes nothing
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT / "assets" / "tiktoken"))
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


# a Split pre-tokenizer's behaviors, as the re.split pattern of the escaped string
SPLIT_BEHAVIORS = {"MergedWithPrevious": "(?<={})", "MergedWithNext": "(?={})",
                   "Isolated": "({})"}


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
    metaspace = split = None
    if len(pre) == 1 and pre[0].get("type") == "Metaspace" and \
            pre[0].get("replacement", "▁") == "▁":
        metaspace = (_prepend_scheme(pre[0]), pre[0].get("split", True))
    elif len(pre) == 1 and pre[0].get("type") == "Split" and not pre[0].get("invert") and \
            isinstance(pre[0].get("pattern", {}).get("String"), str) and \
            pre[0].get("behavior") in SPLIT_BEHAVIORS:
        split = re.compile(SPLIT_BEHAVIORS[pre[0]["behavior"]].format(
            re.escape(pre[0]["pattern"]["String"])))
    elif pre:
        raise ValueError(f"{path}: unsupported pre_tokenizer {tj.get('pre_tokenizer')} for a "
                         "SentencePiece-style BPE (expected none, Metaspace, or a Split on a "
                         f"string, {', '.join(SPLIT_BEHAVIORS)})")
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
                         boundary, split)


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
    bos = cfg.get("bos_token")
    bos = bos["content"] if isinstance(bos, dict) else bos
    tok.chat_bos = added[bos]["id"] if isinstance(bos, str) and bos in added else tok.bos_id
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
    """A token id past the model's embedding would fail mid-run (or decode garbage): refuse it,
    but for special tokens that neither text, eos nor a beginning-of-text token becomes (Gemma 3's
    <image_soft_token>, id 262,144, one past gemma-3-1b's embedding: only an image processor puts
    it in); special() then refuses them, should a chat template ask for one."""
    kept = {tok.eos_id, tok.bos_id, tok.chat_bos, *tok.added_ids.values()}
    past = {tok.enc.encode_single_token(s) for s in tok.enc.special_tokens_set} - kept
    top = max((i for i in range(vocab_size, tok.vocab_size) if i not in past), default=None)
    if top is not None:
        raise ValueError(f"{where}: the tokenizer has {top + 1} tokens but the model's "
                         f"embedding only {vocab_size} (use the tokenizer the model was made with)")
    tok.usable = vocab_size

