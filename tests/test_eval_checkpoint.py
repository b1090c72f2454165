"""scripts/eval_checkpoint.py scores a checkpoint exactly as train.py's evaluation does (the same
answers, seeds and scores) and writes every answer with its prompt and reference for judge.py."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import pytest  # noqa: E402

import eval_checkpoint  # noqa: E402
import train  # noqa: E402
from data import load_rows  # noqa: E402
from model import from_pretrained  # noqa: E402
from plumbing.tokenizer import load_tokenizer  # noqa: E402
from test_train import one_thread  # noqa: E402,F401  (one intra-op thread, module-wide)


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model trained a few steps on MATH-shaped rows, and a MATH and a TL;DR test file."""
    d = tmp_path_factory.mktemp("eval")
    math = jsonl(d / "math.jsonl", [
        {"question": f"What is {a}+{a % 5}?", "answer": f"{a}+{a % 5}=$\\boxed{{{a + a % 5}}}$"}
        for a in range(12)])
    tldr = jsonl(d / "tldr.jsonl", [
        {"prompt": f"SUBREDDIT: r/cats\n\nTITLE: cat {i}\n\nPOST: my cat {i} sleeps.\n",
         "response": f"cat {i} sleeps"} for i in range(6)])
    train.run(train.get_args([
        "--init", "scratch", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size",
        "256", "--data", str(math), "--task", "math", "--batch-size", "4", "--micro-batch-size",
        "4", "--iter-epochs", "2", "--device", "cpu", "--out", str(d / "run")]))
    return d / "run" / "checkpoint", math, tldr


@pytest.mark.parametrize("task, temperature, samples", [("auto", 1.0, 2), ("summarize", 0.0, 1)])
def test_scores_equal_train_evaluate_and_generations_are_written(
        checkpoint, tmp_path, capsys, task, temperature, samples):
    ckpt, math, tldr = checkpoint
    data = math if task == "auto" else tldr
    gens = tmp_path / "gen.jsonl"
    eval_checkpoint.main(["--init", str(ckpt), "--data", str(data), "--task", task,
                          "--temperature", str(temperature), "--samples", str(samples),
                          "--max-new-tokens", "12", "--seed", "3", "--generations", str(gens)])
    res = json.loads(capsys.readouterr().out)

    tok, model = load_tokenizer(ckpt), from_pretrained(ckpt)
    rows, used = load_rows(data, tok, task, model.config.block_size, "truncate", False)
    direct = train.evaluate(model, rows, tok, used, 4, 256, 12, temperature, samples, 3)
    keys = ["accuracy", "accuracy_lenient"] if used == "math" else ["rouge1", "rouge2", "rougeL"]
    assert res["task"] == used and res["rows"] == len(rows)
    assert {k: res[k] for k in keys} == {k: direct[k] for k in keys}
    if samples > 1:
        assert res["accuracy_sd"] == direct["accuracy_sd"]

    lines = [json.loads(line) for line in gens.read_text().splitlines()]
    assert len(lines) == len(rows) * samples
    assert [(g["id"], g["sample"]) for g in lines] == [
        (i, s) for s in range(samples) for i in range(len(rows))]
    source = [json.loads(line) for line in data.read_text().splitlines()]
    for g in lines:
        row = source[g["id"]]
        assert g["line"] == g["id"] + 1
        assert g["prompt"] == row.get("question", row.get("prompt"))
        assert g["reference"] == row.get("answer", row.get("response"))
    assert lines[0]["generation"] == direct["sample"]  # the first answer evaluation shows
