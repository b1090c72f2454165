"""docs/adding-a-method.md's code block, exactly as written, registers two methods that train:
the page cannot drift from the code."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from data import encode_rows, read_jsonl  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from plumbing.tokenizer import byte_tokenizer  # noqa: E402
from test_train import TINY, files, one_thread  # noqa: E402,F401  (fixtures)


def page_code() -> str:
    text = (ROOT / "docs" / "adding-a-method.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "the page holds one Python block, the one this test runs"
    return blocks[0]


@pytest.fixture
def registered(monkeypatch):
    """The page's code run as a module named my_methods, into a copy of train.METHODS."""
    monkeypatch.setattr(train, "METHODS", dict(train.METHODS))
    namespace = {"__name__": "my_methods"}
    exec(compile(page_code(), "docs/adding-a-method.md", "exec"), namespace)
    return namespace


def logged_terms(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,term", [("rac0", "j_rac0"), ("bash_greedy", "j_bash_greedy")])
def test_the_pages_methods_train(registered, files, tmp_path, method, term):
    tr, dev = files
    out = tmp_path / method
    args = train.get_args([*TINY, "--data", str(tr), "--eval-data", str(dev), "--out", str(out),
                           "--batch-size", "8", "--micro-batch-size", "4", "--method", method,
                           "--sft-epochs", "1", "--iterations", "1", "--iter-epochs", "1"])
    res, _ = train.run(args)
    assert res["steps"] == 8
    steps = [r for r in logged_terms(out) if r.get("phase") == method]
    assert len(steps) == 4 and all(r[term] > 0 for r in steps)  # the term is trained on
    if method == "rac0":  # Eq. 6: every sampled position is a label, not only z̄ != z
        assert res["corrected_share"] == 1.0 and res["rows_without_correction"] == 0
    else:
        assert 0 < res["model_token_share"] < 0.5  # β = 0.2 of the positions took the model's


def test_greedy_bash_mixes_in_the_argmax(registered, files):
    """build_bash_greedy's model tokens are the argmax of the model at their position."""
    enc = encode_rows(read_jsonl(files[0]), byte_tokenizer(), "arith", 64, "fail")[:6]
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", vocab_size=257, block_size=64, n_layer=1, n_head=2,
                          n_embd=32)).eval()
    r = type("R", (), {"args": type("A", (), {"beta": 0.5})()})()
    made = registered["build_bash_greedy"](r, model, enc, seed=3)
    took_any = False
    for row, x in zip(made, enc):
        for j, (tok_j, took) in enumerate(zip(row.inputs, row.took)):
            if took:
                with torch.no_grad():
                    logits = model(torch.tensor([x.prompt + row.inputs[:j]]))[0, -1]
                assert tok_j == int(logits.argmax())
                took_any = True
            else:
                assert tok_j == x.response[j]
    assert took_any
