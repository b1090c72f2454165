"""The paper's data sets, from the files a user downloads, as this project's JSONL.

    python scripts/prepare_data.py gsm8k gsm8k/test.jsonl --out data/gsm8k-test.jsonl
    python scripts/prepare_data.py math MATH/test --out data/math-test.jsonl
    python scripts/prepare_data.py tldr tldr_3_filtered/train.jsonl --out data/tldr-train.jsonl
    python scripts/prepare_data.py ultrachat train_sft-*.parquet --sample 50000 --out data/uc.jsonl
    python scripts/prepare_data.py alpaca_eval alpaca_eval.json --out data/alpaca-eval.jsonl
    python scripts/prepare_data.py ultrafeedback train_prefs.jsonl --out data/uf-pairs.jsonl

Each kind reads the shapes it is published in (docs/reproduce.md lists them) and writes the
shape that train.py reads for the task the paper runs it with:

  gsm8k        {question, answer}: checked (a final '#### N'), written as it is  -> math
  math         {problem, solution, level, type}, one JSON file per problem in folders (the
               MATH release) or JSONL / parquet rows (its Hugging Face copies): {question,
               answer, level, type}, the answer in the solution's last \\boxed{}  -> math
  tldr         {subreddit, title, post, summary} (OpenAI's TL;DR SFT split), or
               {prompt, label} / {prompt, completion} with the prompt ending in 'TL;DR:':
               {prompt, response}, the post as the paper's summarize-from-feedback
               code writes it, "SUBREDDIT: r/..\\n\\nTITLE: ..\\n\\nPOST: ..\\n"  -> summarize
  ultrachat    {prompt, prompt_id, messages} (UltraChat-200k): {messages}, by --turns  -> chat
  alpaca_eval  {instruction, output[, input]} (AlpacaEval's JSON list, Alpaca's rows):
               {messages}: the instruction and the reference output  -> chat
  ultrafeedback  {prompt, chosen, rejected} with chosen / rejected as messages
               (UltraFeedback binarized): {messages, chosen, rejected} pairs  -> dpo

An input is a file or a folder (its .json, .jsonl and .parquet files, sorted). A .jsonl file is
one JSON object a line; a .json file is one object, a list of objects, or JSON lines; a .parquet
file needs the optional pyarrow (not a run-time dependency; said when it is missing). Every row
written is read back through data.py's own reader; a bad row is reported as FILE:LINE (or
FILE[item], FILE: row N) with what is wrong, and then nothing is written unless --skip-bad,
which writes the others and counts what it skipped. No row is ever dropped silently.
"""
import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import DataError, _example, _pair  # noqa: E402
from plumbing.checks import (non_negative_int, out_file, parse_json, positive_int,  # noqa: E402
                             script_main)

SUFFIXES = (".json", ".jsonl", ".parquet")
TLDR_POST = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n"  # + data.TLDR_PROMPT


class BadRow(ValueError):
    """A row that cannot be converted; the message says why (its place is added by the caller)."""


# ----------------------------------------------------------------------------------------------
# Reading the files as published: (where, row) for every row


def input_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
            if not found:
                raise ValueError(f"{p}: no .json, .jsonl or .parquet file in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return files


def read_rows(path: Path):
    """(where, row or BadRow) for each row of one file, as published."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow, which is not installed "
                             "(pip install pyarrow, or download the JSON/JSONL files)") from None
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}: row {i}", row
        return
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if path.suffix == ".json":
        try:  # one object (the MATH release) or a list of them (AlpacaEval)
            whole = parse_json(text, path, BadRow)
        except BadRow as e:
            whole = None  # JSON lines under a .json name, as many downloads are; else this
            first = next((line for line in text.splitlines() if line.strip()), "")
            try:
                parse_json(first, path, BadRow)
            except BadRow:
                yield str(path), e
                return
        if isinstance(whole, list):
            yield from ((f"{path}[{i}]", row) for i, row in enumerate(whole))
            return
        if whole is not None:
            yield str(path), whole
            return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            where = f"{path}:{number}"
            try:
                yield where, parse_json(line, where, BadRow)
            except BadRow as e:
                yield where, e


# ----------------------------------------------------------------------------------------------
# Converting one row: a list of rows in this project's shape, or BadRow


def text(row: dict, key: str) -> str:
    if key not in row:
        raise BadRow(f"missing field {key!r} (has {sorted(row)})")
    if not isinstance(row[key], str) or not row[key].strip():
        raise BadRow(f"field {key!r} must be a non-empty string")
    return row[key]


def turns(row: dict, key: str) -> list[dict]:
    value = row.get(key)
    if not isinstance(value, list) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str)
            and isinstance(t.get("content"), str) for t in value):
        raise BadRow(f"field {key!r} must be a list of {{role, content}} turns")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def from_gsm8k(row: dict, args) -> list[dict]:
    return [{"question": text(row, "question"), "answer": text(row, "answer")}]


def from_math(row: dict, args) -> list[dict]:
    out = {"question": text(row, "problem"), "answer": text(row, "solution")}
    return [{**out, **{k: row[k] for k in ("level", "type") if isinstance(row.get(k), str)}}]


def from_tldr(row: dict, args) -> list[dict]:
    if "post" in row:
        post = {k: text(row, k).strip() for k in ("subreddit", "title", "post")}
        return [{"prompt": TLDR_POST.format(**post), "response": text(row, "summary").strip()}]
    prompt = text(row, "prompt")
    if not prompt.endswith("\nTL;DR:"):
        raise BadRow("field 'prompt' does not end with '\\nTL;DR:' (the summarize task adds it)")
    summary = text(row, "label" if "label" in row else "completion")
    return [{"prompt": prompt.removesuffix("\nTL;DR:"), "response": summary.strip()}]


def from_ultrachat(row: dict, args) -> list[dict]:
    """--turns first: the first user turn and its reply (SPIN's rows, whose setting the paper's
    QA follows); each: one row per assistant reply, with the turns before it; last: the whole
    conversation, its last reply the target."""
    conv = turns(row, "messages")
    replies = [i for i, t in enumerate(conv) if t["role"] == "assistant"]
    if not replies:
        raise BadRow("field 'messages' has no assistant turn")
    ends = {"first": replies[:1], "each": replies, "last": replies[-1:]}[args.turns]
    return [{"messages": conv[:i + 1]} for i in ends]


def from_alpaca_eval(row: dict, args) -> list[dict]:
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise BadRow("field 'input' must be a string")
    ask = text(row, "instruction") + (f"\n\n{extra}" if extra.strip() else "")
    return [{"messages": [{"role": "user", "content": ask},
                          {"role": "assistant", "content": text(row, "output")}]}]


def from_ultrafeedback(row: dict, args) -> list[dict]:
    chosen, rejected = turns(row, "chosen"), turns(row, "rejected")
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        raise BadRow("fields 'chosen' and 'rejected' must be the same turns and one reply each")
    return [{"messages": chosen[:-1], "chosen": chosen[-1]["content"],
             "rejected": rejected[-1]["content"]}]


KINDS = {"gsm8k": (from_gsm8k, "math"), "math": (from_math, "math"),
         "tldr": (from_tldr, "summarize"), "ultrachat": (from_ultrachat, "chat"),
         "alpaca_eval": (from_alpaca_eval, "chat"), "ultrafeedback": (from_ultrafeedback, "dpo")}


def checked(out: dict, where: str, task: str) -> dict:
    """A written row, read back as train.py reads it: BadRow where data.py would refuse it."""
    try:
        ex = (_pair if task == "dpo" else _example)(out, where, 0)
    except DataError as e:
        raise BadRow(str(e).removeprefix(f"{where}: ")) from None
    if task == "math" and ex.answer is None:
        raise BadRow("the answer has no final '#### <number>' (GSM8K) or \\boxed{...} (MATH)")
    return out


# ----------------------------------------------------------------------------------------------
# Command line


def prepare(args) -> dict:
    convert, task = KINDS[args.kind]
    files = input_files(args.inputs)
    if any(f.resolve() == Path(args.out).resolve() for f in files):
        raise ValueError(f"--out {args.out}: is one of the inputs (choose another file)")
    good, bad, seen = [], [], 0
    for f in files:
        for where, row in read_rows(f):
            seen += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                if not isinstance(row, dict):
                    raise BadRow(f"expected a JSON object, got {type(row).__name__}")
                good.append([checked(o, where, task) for o in convert(row, args)])
            except BadRow as e:
                bad.append(f"{where}: {str(e).removeprefix(f'{where}: ')}")
    for line in bad:
        print(line, file=sys.stderr)
    if bad and not args.skip_bad:
        raise ValueError(f"{len(bad)} of {seen} rows are bad (listed above); nothing written "
                         "(fix them, or --skip-bad writes the others)")
    if args.sample is not None:
        if args.sample > len(good):
            raise ValueError(f"--sample {args.sample}: only {len(good)} good rows")
        good = [good[i] for i in sorted(random.Random(args.seed).sample(range(len(good)),
                                                                         args.sample))]
    rows = [r for group in good for r in group]
    if not rows:
        raise ValueError(f"{', '.join(args.inputs)}: no rows to write")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    os.replace(tmp, args.out)
    return {"kind": args.kind, "files": len(files), "rows_read": seen, "bad_rows_skipped": len(bad),
            "rows_written": len(rows), "out": args.out,
            "train_py": "--method dpo" if task == "dpo" else f"--task {task}"}


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=tuple(KINDS))
    p.add_argument("inputs", nargs="+", help="files or folders, as downloaded")
    p.add_argument("--out", type=out_file, required=True, help="the JSONL to write")
    p.add_argument("--skip-bad", action="store_true",
                   help="write the good rows when some are bad (each bad one is listed)")
    p.add_argument("--sample", type=positive_int, default=None,
                   help="keep this many input rows, drawn at random (the paper's 50K UltraChat "
                        "prompts), in their file order")
    p.add_argument("--seed", type=non_negative_int, default=0, help="for --sample")
    p.add_argument("--turns", default="first", choices=("first", "each", "last"),
                   help="ultrachat: the first reply (SPIN's rows), one row per reply, or the "
                        "whole conversation to its last reply")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    script_main("prepare_data.py", lambda: print(json.dumps(prepare(args))))


if __name__ == "__main__":
    main()
