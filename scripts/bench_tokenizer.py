"""Tokenizer speed: our plain-Python SentencePiece-style BPE (plumbing.tokenizer.SentencePiece,
the path that Mistral-7B-v0.1 and Llama-2 tokenizers take) against the tokenizers library (Rust)
on the same tokenizer.json, and our tiktoken path on a byte-level tokenizer.json beside it for
scale.

The rows: N GSM-style question + answer pairs, the 2,700 of assets/gsm cycled with every number
redrawn (seeded), so rows differ as GSM8K's do and the per-word cache meets new numbers and
words at the rate real data has. The SentencePiece tokenizer is trained by sentencepiece on
assets/gsm/train.jsonl (byte fallback, digits split, as Mistral's) and written in Mistral-7B-v0.1's
tokenizer.json form. Each tokenizer starts with an empty cache. Needs the test-only packages:

    pip install -r requirements-test.txt
    python scripts/bench_tokenizer.py            # 50,000 rows, vocabulary 6,000
"""
import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from plumbing.tokenizer import load_tokenizer  # noqa: E402


def gsm_rows(n, seed=0):
    rows = []
    for split in ("train", "dev", "test"):
        for line in (ROOT / "assets" / "gsm" / f"{split}.jsonl").read_text().splitlines():
            ex = json.loads(line)
            rows.append(ex["question"] + "\n" + ex["answer"])
    rng = random.Random(seed)
    return [re.sub(r"\d+", lambda m: str(rng.randint(1, 10 ** len(m.group()))), rows[i % len(rows)])
            for i in range(n)]


def sentencepiece_folder(folder: Path, vocab_size: int) -> Path:
    import sentencepiece as spm
    from test_tokenizers import sentencepiece_json
    texts = gsm_rows(2000)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(folder / "m"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "m.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {p: (sp.get_score(i), i) for p, i in vocab.items()
              if not (sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i))}
    merges = sorted((-normal[p][0], normal[p][1], p[:k], p[k:]) for p in normal
                    for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal)
    tj = sentencepiece_json("legacy")  # its normalizer, decoder and <s> post-processor
    tj["model"].update(vocab=vocab, merges=[[a, b] for _, _, a, b in merges])
    tj["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False,
                           "rstrip": False, "normalized": False, "special": True}
                          for i, c in enumerate(["<unk>", "<s>", "</s>"])]
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return folder


def rate(encode, rows):
    t0 = time.perf_counter()
    n = sum(len(encode(r)) for r in rows)
    dt = time.perf_counter() - t0
    return len(rows) / dt, n, dt


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--vocab", type=int, default=6000)
    args = p.parse_args()
    import tokenizers
    from test_tokenizers import byte_level_json
    rows = gsm_rows(args.rows, seed=1)
    with tempfile.TemporaryDirectory() as d:
        sp_dir = sentencepiece_folder(Path(d), args.vocab)
        ours = load_tokenizer(sp_dir)
        hf = tokenizers.Tokenizer.from_file(str(sp_dir / "tokenizer.json"))
        ours_rate, n_ours, dt = rate(ours.encode, rows)
        hf_rate, n_hf, _ = rate(lambda r: hf.encode(r, add_special_tokens=False).ids, rows)
        assert n_ours == n_hf, (n_ours, n_hf)
        bl = Path(d) / "bl"
        bl.mkdir()
        (bl / "tokenizer.json").write_text(json.dumps(byte_level_json("qwen2")))
        (bl / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
        tik_rate, _, _ = rate(load_tokenizer(bl).encode, rows)
    print(f"{args.rows} GSM-style rows, {n_ours} SentencePiece tokens (vocabulary {args.vocab})")
    print(f"ours, plain-Python SentencePiece BPE: {ours_rate:,.0f} rows/s ({dt:.1f} s, cache "
          f"{len(ours.enc.cache):,} words)")
    print(f"tokenizers (Rust), same tokenizer.json: {hf_rate:,.0f} rows/s "
          f"(ours / tokenizers = {ours_rate / hf_rate:.2f})")
    print(f"ours, tiktoken byte-level (NFC, Qwen2 regex, 300 merges): {tik_rate:,.0f} rows/s")


if __name__ == "__main__":
    main()
