"""Write GSM8K-style math splits offline from reasoning-gym's GSM-Symbolic templates.

Each line of train.jsonl, dev.jsonl and test.jsonl is {"question", "answer"}, the answer a worked
solution whose last line is "#### N" with N an integer, as in GSM8K (data.read_jsonl reads it and
prompts it with the paper's math template). The problems come from reasoning-gym==0.1.25
(Apache-2.0) with a fixed seed: the same flags always give the same files. Every question is
distinct, so none is in two splits; the test split is drawn first, so it does not change when
--train or --dev does. Problems whose answer is not a whole number (about 0.2 %) are left out.

    python scripts/make_gsm.py            # assets/gsm/{train,dev,test}.jsonl: 2000 / 200 / 500

Needs the set-up package reasoning-gym (requirements-test.txt); nothing at run time imports it.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "gsm"
# reasoning-gym appends this to every question; GSM8K questions have no such instruction
SUFFIX = " Give the result as your final answer. Do not include units."
WHOLE = re.compile(r"\s*(-?\d+)(?:\.0+)?\s*")  # a few templates write "#### 168.0"


def example(item: dict) -> dict | None:
    """{"question", "answer"} of one reasoning-gym item; None if its answer is not whole."""
    question, cot = item["question"], item["metadata"]["answer_cot"]
    if not question.endswith(SUFFIX) or "####" not in cot:
        sys.exit("error: reasoning-gym: an item has no instruction suffix or no '####' answer; "
                 "the package changed (requirements-test.txt pins 0.1.25)")
    body, tail = cot.rsplit("####", 1)
    whole = WHOLE.fullmatch(tail)
    if whole is None:
        return None
    return {"question": question.removesuffix(SUFFIX).strip(),
            "answer": f"{body.rstrip()}\n#### {int(whole.group(1))}"}


def problems(n: int, seed: int) -> list[dict]:
    """The first n distinct problems with whole-number answers from the generator seeded `seed`."""
    try:
        from reasoning_gym.arithmetic.gsm_symbolic import (GSMSymbolicDataset,
                                                           GSMSymbolicDatasetConfig)
    except ImportError:
        sys.exit("error: reasoning-gym: not installed (pip install -r requirements-test.txt)")
    # item i depends only on (seed, i), so the size is just a bound on how far we look
    tries = 4 * n + 1000
    ds = GSMSymbolicDataset(GSMSymbolicDatasetConfig(seed=seed, size=tries))
    out, seen = [], set()
    for i in range(tries):
        ex = example(ds[i])
        if ex is not None and ex["question"] not in seen:
            seen.add(ex["question"])
            out.append(ex)
            if len(out) == n:
                return out
    sys.exit(f"error: --train/--dev/--test: only {len(out)} distinct problems in {tries} items "
             f"of seed {seed}, {n} asked")


def write_jsonl(path: Path, rows: list[dict]) -> bool:
    """Write rows atomically; False (and no write) if the file already holds exactly them."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=2000, help="training problems (default 2000)")
    p.add_argument("--dev", type=int, default=200, help="validation problems (default 200)")
    p.add_argument("--test", type=int, default=500, help="held-out problems (default 500)")
    p.add_argument("--seed", type=int, default=0, help="reasoning-gym seed (default 0)")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                   help="output folder (default assets/gsm)")
    args = p.parse_args(argv)
    sizes = {"test": args.test, "dev": args.dev, "train": args.train}  # test first: stable
    for name, n in sizes.items():
        if n < 1:
            sys.exit(f"error: --{name}: must be at least 1, got {n}")
    rows = problems(sum(sizes.values()), args.seed)
    args.dir.mkdir(parents=True, exist_ok=True)
    start, wrote = 0, []
    for name, n in sizes.items():
        if write_jsonl(args.dir / f"{name}.jsonl", rows[start:start + n]):
            wrote.append(name)
        start += n
    sizes_text = " / ".join(f"{n} {name}" for name, n in sizes.items())
    print(f"{'wrote' if wrote else 'already up to date:'} {sizes_text} problems in {args.dir}")


if __name__ == "__main__":
    main()
