"""scripts/prepare_data.py: tiny files in each data set's published shape become this project's
JSONL, which data.py reads for the task the paper runs; a bad row is listed by file and line and
nothing is written unless --skip-bad; parquet only with pyarrow, and said when it is missing."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import prepare_data  # noqa: E402
from data import encode_example, load_rows, read_jsonl  # noqa: E402
from plumbing.tokenizer import byte_tokenizer  # noqa: E402


def jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(*argv, capsys=None):
    """prepare_data.main: (its summary, its stderr), or SystemExit's message as the summary."""
    try:
        prepare_data.main([str(a) for a in argv])
    except SystemExit as e:
        return str(e.code), capsys.readouterr().err if capsys else ""
    out, err = capsys.readouterr() if capsys else ("{}", "")
    return json.loads(out), err


def written(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


GSM = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
       {"question": "Half of 10?", "answer": "10/2=5\n#### 5"}]


def test_gsm8k_as_published_and_a_bad_row(tmp_path, capsys):
    src = jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM + [{"question": "2+2?", "answer": "4"}])
    out = tmp_path / "gsm.jsonl"
    msg, err = run("gsm8k", src, "--out", out, capsys=capsys)
    assert f"{src}:3: the answer has no final '#### <number>'" in err
    assert msg.startswith("error: prepare_data.py: 1 of 3 rows are bad") and not out.exists()
    res, err = run("gsm8k", src, "--out", out, "--skip-bad", capsys=capsys)
    assert f"{src}:3:" in err
    assert (res["rows_read"], res["bad_rows_skipped"], res["rows_written"]) == (3, 1, 2)
    assert written(out) == GSM
    rows, task = load_rows(out, byte_tokenizer(), "auto", 4096, "fail", False)
    assert task == "math" and [r.answer for r in rows] == ["7", "5"]


def hendrycks(root: Path) -> Path:
    """The MATH release: MATH/test/<subject>/<n>.json, one pretty-printed problem each."""
    problems = {"algebra/1.json": {"problem": "Solve $2x=10$.", "level": "Level 1",
                                   "type": "Algebra", "solution": "So $x=\\boxed{5}$."},
                "algebra/2.json": {"problem": "What is $\\frac12+\\frac14$?", "level": "Level 2",
                                   "type": "Algebra",
                                   "solution": "It is $\\boxed{\\dfrac{3}{4}}$."},
                "geometry/7.json": {"problem": "A right angle?", "level": "Level 1",
                                    "type": "Geometry", "solution": "It is 90 degrees."}}
    for name, p in problems.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(p, indent=4))
    return root


def test_math_release_folders_and_jsonl(tmp_path, capsys):
    folder = hendrycks(tmp_path / "MATH" / "test")
    hf = jsonl(tmp_path / "hf" / "test.jsonl", [
        {"problem": "Compute $1+1$.", "solution": "$1+1=\\boxed{2}$", "level": "Level 1",
         "type": "Prealgebra"}])
    out = tmp_path / "math.jsonl"
    res, err = run("math", folder, hf, "--out", out, "--skip-bad", capsys=capsys)
    assert f"{folder / 'geometry' / '7.json'}: the answer has no final" in err  # no \boxed{}
    assert (res["files"], res["rows_read"], res["rows_written"]) == (4, 4, 3)
    assert res["train_py"] == "--task math"
    rows = written(out)
    assert rows[0] == {"question": "Solve $2x=10$.", "answer": "So $x=\\boxed{5}$.",
                       "level": "Level 1", "type": "Algebra"}
    examples = read_jsonl(out)
    assert [(e.answer, e.boxed) for e in examples] == [
        ("5", True), ("\\frac{3}{4}", True), ("2", True)]


def test_parquet_needs_pyarrow(tmp_path, capsys):
    """With pyarrow, a parquet file of MATH rows reads as its JSONL would; without it, one line
    says so and what to do."""
    path = tmp_path / "test-00000-of-00001.parquet"
    rows = [{"problem": "Compute $1+1$.", "solution": "$\\boxed{2}$", "level": "Level 1",
             "type": "Prealgebra"}]
    out = tmp_path / "math.jsonl"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1 not read without pyarrow")
        msg, _ = run("math", path, "--out", out, capsys=capsys)
        assert msg == (f"error: prepare_data.py: {path}: reading parquet needs pyarrow, which is "
                       "not installed (pip install pyarrow, or download the JSON/JSONL files)")
        return
    pq.write_table(pa.Table.from_pylist(rows), path)
    res, _ = run("math", path, "--out", out, capsys=capsys)
    assert res["rows_written"] == 1
    assert written(out) == [{"question": "Compute $1+1$.", "answer": "$\\boxed{2}$",
                             "level": "Level 1", "type": "Prealgebra"}]


def test_tldr_both_published_shapes(tmp_path, capsys):
    """OpenAI's TL;DR SFT rows become the summarize-from-feedback prompt the paper's code used,
    with data.py's TLDR_PROMPT completing it; a {prompt, label} row keeps its own prompt."""
    src = jsonl(tmp_path / "tldr" / "train.jsonl", [
        {"id": "t3_1", "subreddit": "AskReddit", "title": "Which pet?",
         "post": "Cats or dogs?\nI cannot choose. ", "summary": " cats or dogs?"},
        {"id": "t3_2", "subreddit": "cooking", "title": "Rice", "post": "How long?",
         "summary": "   "}])
    out = tmp_path / "tldr.jsonl"
    res, err = run("tldr", src, "--out", out, "--skip-bad", capsys=capsys)
    assert f"{src}:2: field 'summary' must be a non-empty string" in err
    assert res["train_py"] == "--task summarize"
    assert written(out) == [{"prompt": "SUBREDDIT: r/AskReddit\n\nTITLE: Which pet?\n\nPOST: Cats "
                                       "or dogs?\nI cannot choose.\n", "response": "cats or dogs?"}]
    tok = byte_tokenizer()
    row = encode_example(read_jsonl(out)[0], tok, "summarize")
    assert tok.decode(row.prompt) == ("SUBREDDIT: r/AskReddit\n\nTITLE: Which pet?\n\nPOST: "
                                      "Cats or dogs?\nI cannot choose.\n\nTL;DR:")
    assert tok.decode(row.response[:-1]) == " cats or dogs?"

    carper = "SUBREDDIT: r/cooking\nTITLE: Rice\nPOST: How long?\nTL;DR:"
    src = jsonl(tmp_path / "carper.jsonl", [{"prompt": carper, "label": "rice time?"},
                                            {"prompt": "no marker", "label": "x"}])
    res, err = run("tldr", src, "--out", out, "--skip-bad", capsys=capsys)
    assert f"{src}:2: field 'prompt' does not end with" in err
    row = encode_example(read_jsonl(out)[0], tok, "summarize")
    assert tok.decode(row.prompt) == carper


CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "4."}]


def test_ultrachat_turns_sample_and_bad_rows(tmp_path, capsys):
    rows = [{"prompt": "Hi", "prompt_id": f"id{i}", "messages": CHAT} for i in range(5)]
    rows.insert(2, {"prompt": "x", "prompt_id": "bad", "messages": [
        {"role": "user", "content": "x"}, {"role": "tool", "content": "y"},
        {"role": "assistant", "content": "z"}]})
    src = jsonl(tmp_path / "ultrachat" / "train_sft.jsonl", rows + ["{not json"])
    out = tmp_path / "uc.jsonl"
    res, err = run("ultrachat", src, "--out", out, "--skip-bad", capsys=capsys)
    assert f"{src}:3: messages[1] has role 'tool'" in err
    assert f"{src}:7: malformed JSON" in err
    assert (res["rows_read"], res["bad_rows_skipped"], res["rows_written"]) == (7, 2, 5)
    assert written(out)[0] == {"messages": CHAT[:2]}
    rows, task = load_rows(out, byte_tokenizer(), "auto", 4096, "fail", False)
    assert task == "chat"
    run("ultrachat", src, "--out", out, "--skip-bad", "--turns", "each", capsys=capsys)
    assert written(out)[:2] == [{"messages": CHAT[:2]}, {"messages": CHAT}]
    run("ultrachat", src, "--out", out, "--skip-bad", "--turns", "last", capsys=capsys)
    assert written(out)[0] == {"messages": CHAT} and len(written(out)) == 5
    # --sample: that many input rows, at random by --seed, in file order
    ids = [{"prompt": "Hi", "prompt_id": f"id{i}", "messages": [
        {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(20)]
    src = jsonl(tmp_path / "many.jsonl", ids)
    run("ultrachat", src, "--out", out, "--sample", "5", "--seed", "3", capsys=capsys)
    picked = [int(r["messages"][0]["content"][1:]) for r in written(out)]
    assert len(picked) == 5 and picked == sorted(picked) and picked != list(range(5))
    run("ultrachat", src, "--out", tmp_path / "again.jsonl", "--sample", "5", "--seed", "3",
        capsys=capsys)
    assert written(tmp_path / "again.jsonl") == written(out)


def test_alpaca_eval_json_list(tmp_path, capsys):
    src = tmp_path / "alpaca_eval.json"
    src.write_text(json.dumps([
        {"instruction": "Name a color.", "output": "Blue.", "generator": "gpt4_turbo",
         "dataset": "helpful_base"},
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
        {"instruction": "Empty reference.", "output": ""}], indent=2))
    out = tmp_path / "ae.jsonl"
    res, err = run("alpaca_eval", src, "--out", out, "--skip-bad", capsys=capsys)
    assert f"{src}[2]: field 'output' must be a non-empty string" in err
    assert written(out) == [
        {"messages": [{"role": "user", "content": "Name a color."},
                      {"role": "assistant", "content": "Blue."}]},
        {"messages": [{"role": "user", "content": "Translate.\n\nbonjour"},
                      {"role": "assistant", "content": "hello"}]}]
    assert res["train_py"] == "--task chat"


def test_ultrafeedback_pairs(tmp_path, capsys):
    ask = {"role": "user", "content": "Best fruit?"}
    src = jsonl(tmp_path / "train_prefs.jsonl", [
        {"prompt": "Best fruit?", "prompt_id": "1", "score_chosen": 8.0, "score_rejected": 3.0,
         "chosen": [ask, {"role": "assistant", "content": "Mango."}],
         "rejected": [ask, {"role": "assistant", "content": "Rocks."}],
         "messages": [ask, {"role": "assistant", "content": "Mango."}]},
        {"prompt": "Q", "chosen": [ask, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "other"},
                      {"role": "assistant", "content": "B"}]}])
    out = tmp_path / "pairs.jsonl"
    res, err = run("ultrafeedback", src, "--out", out, "--skip-bad", capsys=capsys)
    assert f"{src}:2: fields 'chosen' and 'rejected' must be the same turns" in err
    assert written(out) == [{"messages": [ask], "chosen": "Mango.", "rejected": "Rocks."}]
    pair = read_jsonl(out, pairs=True)[0]
    assert (pair.prompt, pair.response, pair.rejected) == ([ask], "Mango.", "Rocks.")
    assert res["train_py"] == "--method dpo"


def test_bad_inputs_are_one_line(tmp_path, capsys):
    src = jsonl(tmp_path / "gsm.jsonl", GSM)
    msg, _ = run("gsm8k", tmp_path / "missing.jsonl", "--out", tmp_path / "o.jsonl", capsys=capsys)
    assert msg == f"error: prepare_data.py: {tmp_path / 'missing.jsonl'}: no such file or folder"
    msg, _ = run("gsm8k", src, "--out", src, capsys=capsys)
    assert "is one of the inputs" in msg and written(src) == GSM
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    msg, _ = run("gsm8k", tmp_path / "latin1.jsonl", "--out", tmp_path / "o.jsonl", capsys=capsys)
    assert "latin1.jsonl: not UTF-8" in msg
    broken = tmp_path / "MATH" / "1.json"
    broken.parent.mkdir()
    broken.write_text('{\n  "problem": "x",\n  "solution": \n}')
    msg, err = run("math", broken.parent, "--out", tmp_path / "o.jsonl", capsys=capsys)
    assert f"{broken}: malformed JSON" in err and err.count("\n") == 1  # one line for one file
    empty = tmp_path / "empty"
    empty.mkdir()
    msg, _ = run("math", empty, "--out", tmp_path / "o.jsonl", capsys=capsys)
    assert "no .json, .jsonl or .parquet file in this folder" in msg


def test_the_standins_are_each_published_shape(tmp_path, capsys):
    """scripts/standins.py's files (docs/reproduce.md's CPU run) convert with no bad row."""
    import standins
    standins.write(tmp_path / "dl", 8, 0)
    capsys.readouterr()
    dl = tmp_path / "dl"
    for kind, source, rows in (
            ("gsm8k", dl / "gsm8k" / "train.jsonl", 8), ("math", dl / "MATH" / "test", 4),
            ("tldr", dl / "tldr" / "valid.jsonl", 4), ("ultrachat", dl / "ultrachat", 12),
            ("alpaca_eval", dl / "alpaca_eval.json", 4),
            ("ultrafeedback", dl / "ultrafeedback" / "train_prefs.jsonl", 8)):
        res, err = run(kind, source, "--out", tmp_path / f"{kind}.jsonl", capsys=capsys)
        assert (res["bad_rows_skipped"], res["rows_written"]) == (0, rows), (kind, err)
