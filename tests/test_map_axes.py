"""scripts/map_axes.py: the slip statistics and the edit distance against hand-made cases and a
plain computation, the context it sizes per length, and a tiny run of both axes end to end."""
import json
import random
from types import SimpleNamespace
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import map_axes  # noqa: E402
import study  # noqa: E402
from data import load_rows  # noqa: E402
from plumbing.tokenizer import byte_tokenizer  # noqa: E402
from test_study import one_thread  # noqa: E402,F401  (its autouse fixture: one thread)

REF = "5+4=9,9-4=5,5+8=13 #### 13"


@pytest.mark.parametrize("reply, slip", [
    (REF, None),
    ("5+4=8,8-4=4,4+8=12 #### 12", 0),    # the first step wrong, the rest right from there on
    ("5+4=9,9-4=6,6+8=14 #### 14", 1),
    ("5+4=9,9-4=5,5+8=12 #### 13", 2),    # a wrong step, the right final answer
    ("5+4=9,9-4=5 #### 5", 2),            # a step missing
    ("5+4=9,9-4=5,5+8=13,13+1=14 #### 14", 3),  # a step too many
    ("5+4=9,9-4=5,5+8=13 #### 12", 3),    # every step right, the final answer wrong
    ("5+4=9,9-4=5,5+8=13", 3),            # no final answer
])
def test_first_slip_by_hand(reply, slip):
    assert map_axes.first_slip(reply, REF) == slip


def test_slip_stats_counts_recoveries_and_positions():
    rows = [SimpleNamespace(reference=REF, answer="13")] * 4
    texts = [REF, "5+4=8,8-4=4,4+8=12 #### 12", "5+4=9,9-4=5,5+8=12 #### 13",
             "5+4=9,9-4=5,5+8=13 #### 12"]
    s = map_axes.slip_stats(texts, rows)
    assert s["slip_share"] == 0.75
    assert s["slip_position"] == pytest.approx((0 / 4 + 2 / 4 + 3 / 4) / 3)
    assert s["recovered_share"] == pytest.approx(1 / 3)  # the third: a slip, the right answer
    assert sum(s["slip_hist"]) == 3 and s["slip_hist"][0] == 1 and s["slip_hist"][5] == 1


def plain_levenshtein(a, b):
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def test_edit_distance_is_levenshtein():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        assert map_axes.edit_distance(a, b) == plain_levenshtein(a, b), (a, b)


@pytest.mark.parametrize("length", [4, 32])
def test_the_context_holds_every_warmup_row(tmp_path, length):
    args = map_axes.get_args(["--train-size", "300", "--dev-size", "50", "--test-size", "50"])
    a = map_axes.at_length(args, length)
    data = study.write_splits(tmp_path, "chain", a)
    tok = byte_tokenizer()
    rows, _ = load_rows(data["warmup"], tok, "arith", a.block_size, "fail", True)
    assert len(rows) == 600  # "fail": a row longer than the context would have raised
    longest = max(len(tok.encode(r.reference)) for r in rows)
    assert longest + 1 <= a.max_new_tokens < 2 * longest
    assert all(r.reference.count(",") == length - 1 for r in rows)


def test_both_axes_end_to_end_tiny(tmp_path):
    out = tmp_path / "axes"
    map_axes.main(["--lengths", "2", "3", "--data-length", "2", "--shares", "0.5", "1",
                   "--seeds", "0", "--train-size", "16", "--dev-size", "4", "--test-size",
                   "4", "--warmup-epochs", "2", "--warmup-eval-every", "1", "--n-layer", "1",
                   "--n-embd", "16", "--batch-size", "8", "--micro-batch-size", "8",
                   "--spread-length", "3", "--spread-problems", "2", "--spread-samples", "3",
                   "--out", str(out), "--to", str(tmp_path / "docs")])
    for length in (2, 3):
        st = json.loads((out / f"length-L{length}.json").read_text())
        assert [e for e, _ in st["curve"]] == [1, 2] and st["stage"] == 1  # never the last
        res = st["results"]
        for m in ("sft", "bash", "rac"):
            r = res[f"test|1|{m}|0"]
            assert 0 <= r["slip_share"] <= 1 and sum(r["slip_hist"]) == round(4 * r["slip_share"])
        assert "label_precision" in res["test|1|rac|0"]
    spread = json.loads((out / "length-L3.json").read_text())["spread"]
    assert sorted(spread) == ["bash", "rac", "sft", "stage"]
    assert all(len(p) == 3 for name in spread for p in spread[name]) and len(spread["sft"]) == 2
    d = json.loads((out / "data.json").read_text())
    res = d["results"]
    assert sorted(res) == sorted(f"test|{s}|{m}|{seed}" for s in ("0.5", "1")
                                 for m in ("sft", "bash", "rac") for seed in (0,))
    # the same number of steps: half the pool for twice the epochs
    assert res["test|0.5|bash|0"]["steps"] == res["test|1|bash|0"]["steps"]
    assert res["test|0.5|sft|0"]["settings"]["epochs"] == 2 * res["test|1|sft|0"]["settings"][
        "epochs"]
    pool = {json.loads(line)["prompt"] for line in
            (out / "data-axis" / "share1.jsonl").read_text().splitlines()}
    half = {json.loads(line)["prompt"] for line in
            (out / "data-axis" / "share0.5.jsonl").read_text().splitlines()}
    seen = {json.loads(line)["prompt"] for s in ("train", "dev", "test") for line in
            (out / "chain-L2" / "data" / f"{s}.jsonl").read_text().splitlines()}
    assert len(pool) == 16 and len(half) == 8 and half < pool and not pool & seen
    assert "| 0.5 | bash |" in (out / "data.md").read_text()
    assert "| 3 | 1 (" in (out / "length.md").read_text()
    for name in ("map_length", "map_data", "map_spread"):
        assert (tmp_path / "docs" / f"{name}.png").exists()
