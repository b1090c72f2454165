"""Each tokenizer.json style against the tokenizers library, each chat template against
transformers' apply_chat_template, and the hub-cache rule of plumbing.checks.inside.

The tokenizer.json files are trained here, offline, with the tokenizers library (tiny vocabularies
in the shape of the real ones: Mistral-7B-v0.1's SentencePiece BPE in both its forms, Qwen2's NFC
byte-level BPE, GPT-NeoX's added whitespace tokens, Llama-3's beginning-of-text post-processor and
the first Llama-3 release's lack of one, Gemma 3's Split pre-tokenizer and added tokens);
the chat templates are the real ones, stored in tests/chat_templates/.
"""
import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest

from data import Example, encode_example
from plumbing.chat_templates import render_chat
from plumbing.tokenizer import check_vocab, load_tokenizer, with_bos

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

TEMPLATES = Path(__file__).parent / "chat_templates"
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's what they'll say, isn't it?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "  indented   text\twith tabs\nand new lines\n\n  and 123 numbers 4567, 89.5 -12",
    "Café naïve résumé façade über straße 日本語のテキスト emoji 🙂 done.",
    "def f(x):\n    return x * 2  # code with    spaces\n",
    "Betty has 5 apples. She buys 3 more, so 5 + 3 = 8.\n#### 8",
] * 4
PIECES = ["a", "Z", "the", " ", "  ", "   ", "\n", "\n\n", "\t", "1", "09", "12345", ".", ",", "'s", "'LL", "é",
          "e\u0301", "Å", "A\u030a", "ﬁ", "日本", "語", "😀", "🙂👍🏽", "²", "\u00a0", "\u3000", "$", "ing", "▁", "▁▁x",
          "<s>", "</s>", "<unk>", "<0x41>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "[INST]", "\r\n",
          "Ω", "ǅ", "\x00", "\x7f", "✓", "Hello", " world", "x  y", "    ", "z\t\t", "#### 72"]


def texts(n=1000, seed=0):
    """n varied strings: fixed edge cases, then random joins of the pieces above."""
    fixed = ["", " ", "  ", "\n", "Hello world", " leading space", "trailing space ", "a  b   c    d",
             "tabs\tand\nnew\r\nlines", "Café ñ 日本語 🙂", "e\u0301 A\u030a (not NFC)", "<s> [INST] hi [/INST]",
             "<|im_start|>user\nhi<|im_end|>", "<0xE6><0x97> bytes?", "123 4567 89.5 -12", "\t\t", "▁x ▁ y"]
    rng = random.Random(seed)
    return fixed + ["".join(rng.choices(PIECES, k=rng.randint(1, 12))) for _ in range(n - len(fixed))]


# --- tokenizer.json files in each style -----------------------------------------------------------

def sentencepiece_json(form: str, trained_split=True) -> dict:
    """A SentencePiece-style BPE with byte fallback, as Mistral-7B-v0.1 / Llama-2 ship it.

    form "legacy": the Prepend("▁")/Replace normalizer and no pre-tokenizer (Mistral-7B-v0.1's
    tokenizer.json); "first": transformers' non-legacy conversion (Metaspace, prepend_scheme
    first, split false); "always": Metaspace always/split with a Metaspace decoder.
    trained_split False: the merges were learned across word boundaries too.
    """
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=trained_split)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40,
                                  show_progress=False)
    hf.train_from_iterator(CORPUS, trainer)
    tj = json.loads(hf.to_str())
    vocab = tj["model"]["vocab"]
    for b in range(256):  # the byte-fallback pieces, in the vocabulary as in Mistral's
        vocab[f"<0x{b:02X}>"] = len(vocab)
    strip = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
             {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]
    if form == "legacy":
        tj["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        tj["pre_tokenizer"], tj["decoder"] = None, {"type": "Sequence", "decoders": strip}
    elif form == "first":
        tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
        tj["decoder"] = {"type": "Sequence", "decoders": strip}
    else:
        tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        tj["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"},
                                                          {"type": "Metaspace", "replacement": "▁",
                                                           "prepend_scheme": "always", "split": True}]}
    bos = vocab["<s>"]
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                     {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}}}
    return tj


def byte_level_json(style: str, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")) -> dict:
    """Byte-level BPE: "qwen2" (NFC, Qwen2's Split regex), "neox" (NFC, GPT-2's regex, added
    whitespace tokens as GPT-NeoX-20B/Pythia have), "llama3" (Llama-3's regex, ignore_merges,
    <|begin_of_text|> put first by the post-processor)."""
    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "neox")
    if style == "neox":
        hf.pre_tokenizer = byte_level
    else:
        pat = QWEN2_PAT if style == "qwen2" else LLAMA3_PAT
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(pat), "isolated"), byte_level])
    if style != "llama3":
        hf.normalizer = normalizers.NFC()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + len(specials) + 300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(CORPUS, trainer)
    if style == "neox":  # Pythia's tokens for runs of spaces: added, not special, normalized
        hf.add_tokens([AddedToken(" " * n, normalized=True, special=False) for n in (2, 3, 4, 8)])
    if style == "llama3":
        bos = hf.token_to_id(specials[0])
        hf.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B",
                                          special_tokens=[(specials[0], bos)])])
    return json.loads(hf.to_str())


GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                   "<start_of_image>", "<end_of_image>"]
# Gemma 3's added tokens that are not special: matched in the raw text before BPE, as runs of newlines,
# of "▁" and of tabs, and HTML tags are in its tokenizer.json
GEMMA3_PLAIN = ["\n\n", "\n\n\n", "▁▁", "\t\t", "<h1>"]


def gemma3_json() -> dict:
    """Gemma 3's tokenizer.json shape (transformers' GemmaConverter): a BPE with byte fallback and no
    "▁" put first, a normalizer that makes spaces "▁", a Split on " " merged with the piece before (so a
    no-op after that normalizer, but a step tokenizers runs), <bos> put first by the post-processor; its
    specials in Gemma's order (pad 0, eos 1, bos 2, unk 3), non-special added tokens, and
    <image_soft_token> after the whole vocabulary, as at 262,144 in Gemma 3's."""
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # pieces start at a "▁", as SentencePiece's
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=GEMMA3_SPECIALS, limit_alphabet=40, show_progress=False)
    hf.train_from_iterator(CORPUS, trainer)
    tj = json.loads(hf.to_str())
    vocab = tj["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tj["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    tj["pre_tokenizer"] = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                           "invert": False}
    tj["decoder"] = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                      {"type": "ByteFallback"}, {"type": "Fuse"}]}
    tj["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]).__getstate__())
    hf = tokenizers.Tokenizer.from_str(json.dumps(tj))
    hf.add_tokens([AddedToken(t, normalized=False, special=False) for t in GEMMA3_PLAIN])
    hf.add_special_tokens([AddedToken("<image_soft_token>", normalized=False, special=True)])
    return json.loads(hf.to_str())


def llama3_first_release_json() -> dict:
    """The first Llama-3 release's tokenizer.json: as Llama-3's, but a post-processor of ByteLevel alone,
    which puts no <|begin_of_text|> first (tokenizer_config.json's bos_token names it)."""
    tj = byte_level_json("llama3", LLAMA3_SPECIALS)
    tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    return tj


def sentencepiece_model(tmp_path: Path):
    """A BPE trained by sentencepiece itself (byte fallback, digits split, as Mistral's and
    Llama-2's), converted to tokenizer.json in Mistral-7B-v0.1's form: the vocabulary and ids as
    sentencepiece has them, the merges ranked by the merged piece's score (transformers' rule)."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "m"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {p: (sp.get_score(i), i) for p, i in vocab.items() if sp.is_unknown(i) is False
              and not sp.is_control(i) and not sp.is_byte(i)}
    merges = sorted((-normal[p][0], normal[p][1], p[:k], p[k:]) for p in normal for k in range(1, len(p))
                    if p[:k] in normal and p[k:] in normal)
    tj = sentencepiece_json("legacy")
    tj["model"].update(vocab=vocab, merges=[[a, b] for _, _, a, b in merges])
    tj["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                           "normalized": False, "special": True} for i, c in enumerate(["<unk>", "<s>", "</s>"])]
    return sp, tj


def test_sentencepiece_trained_model_matches_sentencepiece(tmp_path):
    sp, tj = sentencepiece_model(tmp_path)
    tok = load_tokenizer(write(tmp_path / "ck", tj))
    assert tok.bos_id == sp.bos_id() and tok.eos_id == sp.eos_id() and tok.vocab_size == sp.get_piece_size()
    hf = tokenizers.Tokenizer.from_str(json.dumps(tj))
    hf.encode_special_tokens = True
    bad = [s for s in texts() if not with_bos(tok.encode(s), tok) == [sp.bos_id()] + sp.encode(s) == hf.encode(s).ids
           or tok.decode(tok.encode(s)) != sp.decode(sp.encode(s))]
    assert sum(sp.is_byte(i) for s in texts(100) for i in sp.encode(s)) > 50  # byte fallback is exercised
    print(f"sentencepiece-trained (legacy form): {len(bad)} mismatches with sentencepiece in 1000 strings")
    assert bad == []


STYLES = {
    "sentencepiece-legacy": lambda: sentencepiece_json("legacy"),
    "sentencepiece-metaspace-first": lambda: sentencepiece_json("first"),
    "sentencepiece-metaspace-always": lambda: sentencepiece_json("always"),
    "sentencepiece-merges-across-words": lambda: sentencepiece_json("first", trained_split=False),
    "byte-level-nfc-qwen2": lambda: byte_level_json("qwen2"),
    "byte-level-neox": lambda: byte_level_json("neox", ("<|endoftext|>", "<|padding|>")),
    "byte-level-llama3-bos": lambda: byte_level_json("llama3", ("<|begin_of_text|>", "<|end_of_text|>",
                                                                "<|eot_id|>")),
    "byte-level-llama3-first-release": lambda: llama3_first_release_json(),
    "sentencepiece-gemma3": gemma3_json,
}
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def write(folder: Path, tj: dict, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    specials = [t["content"] for t in tj["added_tokens"] if t["special"]]
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": specials[-1],
           "clean_up_tokenization_spaces": False, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("style", list(STYLES))
def test_tokenizer_style_matches_tokenizers(tmp_path, style):
    tj = STYLES[style]()
    tok = load_tokenizer(write(tmp_path, tj))
    hf = tokenizers.Tokenizer.from_str(json.dumps(tj))
    hf.encode_special_tokens = True  # special-token strings in text stay text, as for us
    assert len(hf.get_vocab()) > 300 and tok.vocab_size == hf.get_vocab_size()
    assert (tok.bos_id is not None) == (tj["post_processor"] is not None and "Template" in json.dumps(tj["post_processor"]))
    bad_encode, bad_decode = [], []
    extra = [f"a{t}b {t} {t}{t}x" for t in GEMMA3_SPECIALS + GEMMA3_PLAIN] if "gemma3" in style else []
    for s in texts() + extra:
        ids = tok.encode(s)
        if with_bos(ids, tok) != hf.encode(s).ids:
            bad_encode.append(s)
        if tok.decode(ids) != hf.decode(ids, skip_special_tokens=False):
            bad_decode.append(s)
    print(f"{style}: {len(bad_encode)} encode and {len(bad_decode)} decode mismatches in "
          f"{len(texts()) + len(extra)} strings")
    assert bad_encode == [] and bad_decode == []


def test_gemma3_added_tokens_and_byte_fallback(tmp_path):
    tj = gemma3_json()
    tok = load_tokenizer(write(tmp_path, tj, eos_token="<eos>"))
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    assert tok.vocab_size == ids["<image_soft_token>"] + 1 > max(tj["model"]["vocab"].values()) + 1
    assert tok.bos_id == ids["<bos>"] == 2 and tok.eos_id == ids["<eos>"] == 1
    assert tok.encode("a\n\nb") == tok.encode("a") + [ids["\n\n"]] + tok.encode("b")
    assert ids["<start_of_image>"] not in tok.encode("<start_of_image>")  # special: text stays text
    assert tok.special("<start_of_image>") == ids["<start_of_image>"]
    vocab = tj["model"]["vocab"]
    assert tok.encode("🐙") == [vocab[f"<0x{b:02X}>"] for b in "🐙".encode()] and tok.decode(tok.encode("🐙")) == "🐙"
    assert tok.enc.pieces[tok.encode("the fox")[-1]].startswith("▁")  # no "▁" first, one for each space


def test_a_special_token_past_the_embedding_is_refused_only_when_used(tmp_path):
    """Gemma 3's <image_soft_token> is one past gemma-3-1b's embedding: text never becomes it."""
    folder = write(tmp_path, gemma3_json(), eos_token="<eos>", bos_token="<bos>",
                   chat_template=(TEMPLATES / "gemma3.jinja").read_text())
    tok = load_tokenizer(folder)
    embedding = tok.special("<image_soft_token>")
    check_vocab(tok, embedding, "ckpt")
    assert max(render_chat([SYSTEM] + DIALOGUE, tok)) < embedding
    with pytest.raises(ValueError, match="special token '<image_soft_token>' has id .*past the model's embedding"):
        tok.special("<image_soft_token>")
    with pytest.raises(ValueError, match="ckpt: the tokenizer has .* tokens but the model's embedding only"):
        check_vocab(load_tokenizer(folder), embedding - 1, "ckpt")  # a non-special added token lies past it


def test_byte_level_styles_round_trip_and_split_added_tokens(tmp_path):
    tj = STYLES["byte-level-neox"]()
    tok = load_tokenizer(write(tmp_path, tj))
    two = tj["added_tokens"][-4]
    assert two["content"] == "  " and not two["special"]
    assert tok.encode("a  b") == tok.encode("a") + [two["id"]] + tok.encode("b")
    for s in texts(200):
        assert tok.decode(tok.encode(s)) == unicodedata.normalize("NFC", s)


def test_sentencepiece_byte_fallback_and_bos(tmp_path):
    tok = load_tokenizer(write(tmp_path / "sp", sentencepiece_json("legacy")))
    vocab = json.loads((tmp_path / "sp" / "tokenizer.json").read_text())["model"]["vocab"]
    ids = tok.encode("🐙")  # not in the training text, so not in the vocabulary: its four UTF-8 bytes
    assert ids[-4:] == [vocab[f"<0x{b:02X}>"] for b in "🐙".encode()] and tok.decode(ids) == "🐙"
    assert tok.bos_id == vocab["<s>"] and tok.eos_id == vocab["</s>"]
    row = encode_example(Example("The fox?", "4"), tok, "plain")
    assert row.prompt == [tok.bos_id] + tok.encode("The fox?") and tok.enc.pieces[tok.encode("the")[0]].startswith("▁")
    assert row.ref_prompt[0] == tok.bos_id and tok.bos_id not in row.response
    assert row.response[-1] == tok.eos_id


def test_sentencepiece_speed_is_cached_per_word(tmp_path):
    tok = load_tokenizer(write(tmp_path, sentencepiece_json("first")))
    tok.encode(CORPUS[0] + " " + CORPUS[1])
    assert 0 < len(tok.enc.cache) < 40  # one entry per word, not per text


def test_a_byte_without_a_token_is_one_line_not_a_panic(tmp_path):
    # SmolLM2's vocabulary has no token for 0x04 and some others; tiktoken would panic on them
    tj = byte_level_json("qwen2")
    tj["model"]["vocab"].pop("Ā")
    tok = load_tokenizer(write(tmp_path, tj))
    assert tok.decode(tok.encode("fine text")) == "fine text"
    with pytest.raises(ValueError, match=r"tokenizer.json: the text has '\\x00' \(U\+0000\), whose byte 0x00 has no token"):
        tok.encode("a\x00b")


@pytest.mark.parametrize("mutate, message", [
    (lambda tj: tj["model"]["vocab"].update(zz=tj["model"]["vocab"]["a"]), "is given to both"),
    (lambda tj: tj["added_tokens"][0].update(id=tj["model"]["vocab"]["a"]), "which the vocabulary gives to 'a'"),
    (lambda tj: tj["model"]["vocab"].update(zz=1 << 30), "has id 1073741824"),
    (lambda tj: tj["added_tokens"].append({**tj["added_tokens"][0], "content": "<x>"}), "repeats"),
])
def test_bad_tokenizer_json_is_one_line_naming_the_token(tmp_path, mutate, message):
    tj = byte_level_json("qwen2")
    mutate(tj)
    with pytest.raises(ValueError, match=message) as e:
        load_tokenizer(write(tmp_path, tj))
    assert "tokenizer.json" in str(e.value) and "\n" not in str(e.value)


# --- chat templates ---------------------------------------------------------------------------

# (template file, the specials its family's tokenizer has, bos, eos_token in tokenizer_config.json)
FAMILIES = {
    "smollm2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "qwen2.5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.1": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                 "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.2": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                 "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-instruct": (["<unk>", "<s>", "</s>"], "<s>", "</s>"),
    "zephyr": (["<unk>", "<s>", "</s>"], "<s>", "</s>"),
    "gemma2": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "phi3": (["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
             "<s>", "<|endoftext|>"),
    "phi3.5": (["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
               "<s>", "<|endoftext|>"),
    "gemma3": (GEMMA3_SPECIALS, "<bos>", "<eos>"),  # on gemma3_json, Gemma 3's own shape
}
STYLE = {"smollm2": "chatml", "qwen2.5": "chatml", "qwen3": "chatml", "llama3": "llama3", "llama3.1": "llama3.1",
         "llama3.2": "llama3.2",
         "mistral-instruct": "mistral", "zephyr": "zephyr", "gemma2": "gemma", "phi3": "phi3", "phi3.5": "phi3.5",
         "gemma3": "gemma"}
EOS = {"smollm2": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>",
       "llama3.1": "<|eot_id|>", "llama3.2": "<|eot_id|>", "mistral-instruct": "</s>", "zephyr": "</s>", "gemma2": "<end_of_turn>",
       "phi3": "<|end|>", "phi3.5": "<|end|>", "gemma3": "<end_of_turn>"}
SYSTEM = {"role": "system", "content": "You are terse. 日本語 ok."}
DIALOGUE = [{"role": "user", "content": "Hi there, 2 + 2?"}, {"role": "assistant", "content": "  4, of course.\n"},
            {"role": "user", "content": "And\ttimes 3?\n\nExplain  it. 🙂"}]
CONVERSATIONS = [DIALOGUE, [SYSTEM] + DIALOGUE, [{"role": "user", "content": "One turn."}],
                 [{"role": "system", "content": ""}, {"role": "user", "content": "Q?\nLet's think step by step."}]]


def family_folder(tmp_path, family, sentencepiece=None):
    specials, bos, eos = FAMILIES[family]
    if family == "gemma3":
        tj = gemma3_json()
    elif sentencepiece:
        tj = sentencepiece_json(sentencepiece)
    else:
        tj = byte_level_json("qwen2", specials)
        if bos:
            tj["post_processor"] = json.loads(processors.TemplateProcessing(
                single=f"{bos} $A", special_tokens=[(bos, specials.index(bos))]).__getstate__())
    folder = write(tmp_path / family, tj, chat_template=(TEMPLATES / f"{family}.jinja").read_text(),
                   eos_token=eos, **({"bos_token": bos} if bos else {}))
    from transformers import AutoTokenizer
    return load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chat_template_matches_transformers(tmp_path, family):
    tok, ref = family_folder(tmp_path, family)
    assert tok.chat == STYLE[family] and tok.eos_id == ref.convert_tokens_to_ids(EOS[family])
    for turns in CONVERSATIONS:
        if family == "gemma2" and turns[0]["role"] == "system":
            continue  # gemma2 refuses a system turn (test_gemma_system_turn)
        text = ref.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        ids = render_chat(turns, tok)
        assert tok.decode(ids) == text, turns
        assert ids == ref.apply_chat_template(turns, tokenize=True, add_generation_prompt=True,
                                              return_dict=False), turns
    row = encode_example(Example(DIALOGUE, "Fine."), tok, "chat")  # BOS once, from the template or added
    assert row.prompt == with_bos(render_chat(DIALOGUE, tok), tok) and row.response == tok.encode("Fine.") + [tok.eos_id]
    for ids in (row.prompt, row.ref_prompt):
        assert (ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1) if tok.bos_id is not None else True


@pytest.mark.parametrize("family", ["mistral-instruct", "zephyr"])
@pytest.mark.parametrize("form", ["legacy", "first"])
def test_templates_on_a_sentencepiece_tokenizer(tmp_path, form, family):
    # text after a special token gets no "▁" from a Metaspace "first" pre-tokenizer (zephyr's
    # "\n" after </s>), but one from the legacy normalizer, which prepends it to every stretch
    tok, ref = family_folder(tmp_path, family, sentencepiece=form)
    for turns in CONVERSATIONS:
        ids = render_chat(turns, tok)
        assert ids == ref.apply_chat_template(turns, tokenize=True, add_generation_prompt=True,
                                              return_dict=False), turns
        assert with_bos(ids, tok)[0] == tok.bos_id and with_bos(ids, tok).count(tok.bos_id) == 1


@pytest.mark.parametrize("form", ["legacy", "first", "always"])
def test_text_after_a_special_token(tmp_path, form):
    tj = sentencepiece_json(form)
    tok = load_tokenizer(write(tmp_path, tj))
    hf = tokenizers.Tokenizer.from_str(json.dumps(tj))
    for s in texts(100):
        if any(t in s for t in ("<s>", "</s>", "<unk>")):
            continue  # tokenizers would take those for the special tokens here
        assert [tok.eos_id] + tok.encode(s, first=False) == hf.encode("</s>" + s, add_special_tokens=False).ids, s


@pytest.mark.parametrize("family", ["llama3", "mistral-instruct"])
def test_bos_token_from_tokenizer_config_where_the_post_processor_has_none(tmp_path, family):
    """The first Llama-3 release (and Mistral files alike): no post-processor puts a beginning-of-text
    token first, but the template renders tokenizer_config.json's bos_token, as transformers does."""
    specials, bos, eos = FAMILIES[family]
    if family == "llama3":
        tj = llama3_first_release_json()
    else:
        tj = sentencepiece_json("first")
        tj["post_processor"] = None
    folder = write(tmp_path / family, tj, chat_template=(TEMPLATES / f"{family}.jinja").read_text(),
                   eos_token=eos, bos_token=bos)
    from transformers import AutoTokenizer
    tok, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert tok.bos_id is None and ref("Hi there")["input_ids"] == tok.encode("Hi there")  # none for plain text
    for turns in CONVERSATIONS:
        ids = render_chat(turns, tok)
        assert ids == ref.apply_chat_template(turns, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ids[0] == tj["model"]["vocab"].get(bos, ref.convert_tokens_to_ids(bos))
    row = encode_example(Example(DIALOGUE, "Fine."), tok, "chat")
    assert row.prompt == render_chat(DIALOGUE, tok) and row.prompt.count(row.prompt[0]) == 1


def test_default_system_turns(tmp_path):
    qwen, _ = family_folder(tmp_path, "qwen2.5")
    assert qwen.system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    smol, _ = family_folder(tmp_path, "smollm2")
    assert smol.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert family_folder(tmp_path, "qwen3")[0].system is None


def test_gemma_system_turn(tmp_path):
    # Gemma 2's template refuses a system turn; ours puts it before the first user turn, as
    # Gemma 3's template does
    tok, _ = family_folder(tmp_path, "gemma2")
    ids = render_chat([SYSTEM] + DIALOGUE, tok)
    assert tok.decode(ids) == ("<bos><start_of_turn>user\nYou are terse. 日本語 ok.\n\nHi there, 2 + 2?<end_of_turn>\n"
                               "<start_of_turn>model\n4, of course.<end_of_turn>\n<start_of_turn>user\n"
                               "And\ttimes 3?\n\nExplain  it. 🙂<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ValueError, match="user/assistant/user"):
        render_chat([{"role": "assistant", "content": "x"}], tok)


def test_turn_text_never_becomes_a_special_token(tmp_path):
    tok, _ = family_folder(tmp_path, "qwen3")
    ids = render_chat([{"role": "user", "content": "<|im_end|><|im_start|>"}], tok)
    assert ids.count(tok.special("<|im_end|>")) == 1 and ids.count(tok.special("<|im_start|>")) == 2


def test_unknown_template_is_refused_when_rendered(tmp_path):
    tj = byte_level_json("qwen2")
    folder = write(tmp_path, tj, chat_template="{% for m in messages %}### {{ m['content'] }}{% endfor %}")
    tok = load_tokenizer(folder)  # --task plain still works
    assert tok.encode("hi") and tok.bad_template
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat template not recognised.*--task plain"):
        encode_example(Example("Q?", "A"), tok, "math")


# --- a Hugging Face hub cache snapshot as --init --------------------------------------------------

def hub_cache(root: Path, source: Path, repo="models--org--tiny") -> Path:
    """source's files laid out as the hub cache does: blobs/HASH, snapshots/REV/FILE -> ../../blobs/HASH."""
    blobs, snap = root / repo / "blobs", root / repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(source.iterdir())):
        shutil.copy(f, blobs / f"hash{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"hash{i}")
    return snap


def test_hub_cache_snapshot_loads(tmp_path, hf_checkpoint):
    import torch

    from model import from_pretrained
    ck = hf_checkpoint("gpt2")
    src = tmp_path / "src"
    shutil.copytree(ck.path, src)
    write(src, byte_level_json("qwen2"))
    snap = hub_cache(tmp_path / "hub", src)
    model = from_pretrained(snap)
    assert torch.equal(model.state_dict()["lm_head.weight"], from_pretrained(ck.path).state_dict()["lm_head.weight"])
    assert load_tokenizer(snap).encode("Hello world") == load_tokenizer(src).encode("Hello world")


def test_hub_cache_link_out_of_its_repository_is_refused(tmp_path, hf_checkpoint):
    from model import from_pretrained
    src = tmp_path / "src"
    shutil.copytree(hf_checkpoint("gpt2").path, src)
    write(src, byte_level_json("qwen2"))
    snap = hub_cache(tmp_path / "hub", src)
    other = hub_cache(tmp_path / "hub", src, repo="models--org--other")
    outside = tmp_path / "outside.json"
    shutil.copy(src / "config.json", outside)
    for target in (outside, other.parent.parent / "blobs" / "hash0"):  # elsewhere; another repository
        (snap / "config.json").unlink()
        (snap / "config.json").symlink_to(target)
        with pytest.raises(ValueError, match="config.json: is a symbolic link"):
            from_pretrained(snap)
        with pytest.raises(ValueError, match="config.json: is a symbolic link"):
            load_tokenizer(snap)


def test_generate_cli_prompt_starts_with_bos(tmp_path, monkeypatch, capsys):
    import generate
    from model import GPT, GPTConfig, save_pretrained
    folder = write(tmp_path, STYLES["byte-level-llama3-bos"]())
    tok = load_tokenizer(folder)
    save_pretrained(GPT(GPTConfig(arch="llama", vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                                  n_embd=16)), folder)
    prompts, real = [], generate.generate
    monkeypatch.setattr(generate, "generate", lambda model, p, *a, **k: prompts.append(p) or real(model, p, *a, **k))
    generate.main(["--init", str(folder), "--prompt", "Hello world", "--num-samples", "2", "--max-new-tokens", "2"])
    assert prompts[0] == [[tok.bos_id] + tok.encode("Hello world")] * 2
    assert capsys.readouterr().out.count("--- sample") == 2
