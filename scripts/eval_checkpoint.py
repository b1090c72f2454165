"""Score a checkpoint on a test set, and keep its answers for the win-rate judge.

    python scripts/eval_checkpoint.py --init out/rac/checkpoint --data data/math-test.jsonl \\
        --temperature 0.1 --samples 3                        # the paper's Table 3 (MATH)
    python scripts/eval_checkpoint.py --init out/rac/checkpoint --data data/tldr-test.jsonl \\
        --task summarize --temperature 0.01 --generations out/rac/tldr-test.gen.jsonl

The answers are generated and scored exactly as train.py's evaluation does (train.generate_answers
seeded as train.evaluate seeds them, then train.score_answers): `accuracy` (strict) and
`accuracy_lenient` for rows with a GSM8K '####' or a MATH \\boxed{} answer, averaged over
--samples with `accuracy_sd`; ROUGE-1/2/L F1 for --task summarize. It prints them as JSON.

--generations writes one JSON line per row and sample: {"id": row index, "line": its line in
--data, "sample", "prompt": the row's x (text, or the chat turns before the reply),
"generation", "reference": the row's y}, which scripts/judge.py compares.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from data import TASKS, load_rows, read_jsonl  # noqa: E402
from model import from_pretrained  # noqa: E402
from plumbing.checks import (device_name, non_negative_float, non_negative_int,  # noqa: E402
                             out_file, positive_float, positive_int, script_main)
from plumbing.device import allow_tf32, fitting_batch  # noqa: E402
from plumbing.tokenizer import check_vocab, load_tokenizer  # noqa: E402


def evaluate_checkpoint(args) -> dict:
    allow_tf32(args.device)
    tok = load_tokenizer(args.init)
    model = from_pretrained(args.init, device=args.device).eval()
    model.compile_decode = args.compile_decode
    check_vocab(tok, model.config.vocab_size, args.init)
    # the reference only matters for ROUGE and the judge, which read its text whole
    rows, task = load_rows(args.data, tok, args.task, model.config.block_size, "truncate", False)
    new = args.max_new_tokens or train.new_token_cap(rows, model.config.block_size)
    batch = fitting_batch(model, rows, args.batch_size, new, args.precision, args.memory_gb)
    t0 = time.perf_counter()
    runs = [train.generate_answers(model, rows, tok, batch, args.max_new_tokens, args.temperature,
                                   train.seed_for(args.seed, "eval", s), args.precision)
            for s in range(args.samples)]
    res = {"data": args.data, "rows": len(rows), "task": task, "samples": args.samples,
           "temperature": args.temperature, **train.score_answers(runs, rows, task),
           "generate_s": round(time.perf_counter() - t0, 1)}
    if args.generations:
        examples = read_jsonl(args.data)
        lines = [json.dumps({"id": i, "line": ex.line, "sample": s, "prompt": ex.prompt,
                             "generation": texts[i], "reference": ex.response},
                            ensure_ascii=False) + "\n"
                 for s, texts in enumerate(runs) for i, ex in enumerate(examples)]
        tmp = Path(args.generations + ".tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, args.generations)
        res["generations"] = args.generations
    return res


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="eval_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="checkpoint folder (Hugging Face layout)")
    p.add_argument("--data", required=True, help="test JSONL, in any shape train.py reads")
    p.add_argument("--task", default="auto", choices=("auto",) + TASKS,
                   help="prompt templates, as train.py's --task")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="default: longest reference + 16")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0: greedy; the paper: 0.1 (math), 0.01 (TL;DR), 0.7 (AlpacaEval)")
    p.add_argument("--samples", type=positive_int, default=1,
                   help="generations per row (the paper: 3), scores averaged over them")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--generations", type=out_file, default=None,
                   help="JSONL of every answer with its prompt and reference (for judge.py)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="rows per decode batch")
    p.add_argument("--memory-gb", type=positive_float, default=None,
                   help="most memory a decode batch may take (as train.py's --build-memory-gb)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto = bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--compile-decode", action="store_true", help="torch.compile the decode step")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    script_main("eval_checkpoint.py", lambda: print(json.dumps(evaluate_checkpoint(args),
                                                               indent=1)))


if __name__ == "__main__":
    main()
