"""One sample of eval_checkpoint.py's generations on AlpacaEval, as the `alpaca_eval` package
reads a model's outputs: a JSON list of {instruction, output, generator}.

    python scripts/alpaca_outputs.py out/rac/alpaca.gen.jsonl --sample 0 --generator rac \\
        --out out/rac/alpaca_outputs-0.json
    alpaca_eval --model_outputs out/rac/alpaca_outputs-0.json   # not a dependency; needs a key

The paper's Tables 2 and 4 are AlpacaEval 2.0's length-controlled win rate against GPT-4 Turbo,
which that package computes (its own judge prompt and length regression); scripts/judge.py's
plain win rate against the references is not that number.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plumbing.checks import non_negative_int, out_file, script_main  # noqa: E402
from judge import read_generations  # noqa: E402


def convert(args) -> dict:
    rows = [r for r in read_generations(Path(args.generations)) if r.get("sample") == args.sample]
    if not rows:
        raise ValueError(f"{args.generations}: no generations of --sample {args.sample}")
    out = []
    for r in rows:
        turns = r["prompt"] if isinstance(r["prompt"], list) else [
            {"role": "user", "content": r["prompt"]}]
        if len(turns) != 1 or turns[0]["role"] != "user":
            raise ValueError(f"{r['where']}: AlpacaEval rows are one user turn (this one has "
                             f"{len(turns)} turns)")
        out.append({"instruction": turns[0]["content"], "output": r["generation"],
                    "generator": args.generator})
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False), encoding="utf-8")
    return {"outputs": len(out), "out": args.out}


def main(argv=None):
    p = argparse.ArgumentParser(prog="alpaca_outputs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("generations", help="JSONL from scripts/eval_checkpoint.py --generations")
    p.add_argument("--sample", type=non_negative_int, default=0, help="which generation")
    p.add_argument("--generator", required=True, help="the model's name in AlpacaEval's table")
    p.add_argument("--out", type=out_file, required=True, help="the JSON list to write")
    args = p.parse_args(argv)
    script_main("alpaca_outputs.py", lambda: print(json.dumps(convert(args))))


if __name__ == "__main__":
    main()
