"""A worked example: BASH's and RAC's offline rows for built-in problems, token by token.

For each problem it prints x and y, the mixed response ŷ with the positions that took the model's
token marked (Eq. 4), the sampled response z, its labels z̄ (Eq. 6) and the positions where
z̄ != z, the only ones J_RAC trains on (Eq. 7). Each column is one token.

    python scripts/worked_example.py                 # uses the main job's warm-up checkpoint
    python scripts/worked_example.py --init out/study/chain/warmup/checkpoint --rows 3 --beta 0.5

Without a checkpoint it first trains a quick warm-up (about a minute on a CPU).
"""
import argparse
import sys
import unicodedata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402
import train  # noqa: E402
from data import BUILTIN_FORMS, builtin_task, encode_rows  # noqa: E402
from model import from_pretrained  # noqa: E402
from plumbing.checks import (EXPECTED, error_line, fraction, non_negative_float,  # noqa: E402
                             non_negative_int, positive_int)
from plumbing.tokenizer import load_tokenizer  # noqa: E402


def aligned(tok, lines: dict[str, list]) -> str:
    """One column per token position: each cell is a token's text (or a mark), padded to the
    widest cell of its column, so ŷ lines up under y and z̄ under z."""
    cell = lambda t: t if isinstance(t, str) else (  # noqa: E731
        repr(tok.decode([t]))[1:-1].replace(" ", "␣"))
    cells = {k: [cell(t) for t in v] for k, v in lines.items()}
    width = [max(len(c[j]) for c in cells.values() if j < len(c))
             for j in range(max(map(len, cells.values())))]
    shown = lambda s: sum(not unicodedata.combining(ch) for ch in s)  # z̄ is z + a macron  # noqa
    return "\n".join(k + " " * (8 - shown(k)) + " ".join(c.ljust(w) for c, w in zip(v, width))
                     .rstrip() for k, v in cells.items())


def quick_warm_up(form: str) -> Path:
    args = study.get_args(["--tasks", form, "--train-size", "1000", "--warmup-epochs", "3",
                           "--out", "out/worked_example"])
    folder = Path(args.out) / form
    return study.warm_up(folder, study.write_splits(folder / "data", form, args), args)


def main(argv=None):
    p = argparse.ArgumentParser(prog="worked_example.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default=None,
                   help="checkpoint (default: out/study/<task>/warmup/checkpoint)")
    p.add_argument("--task", default="chain", choices=BUILTIN_FORMS)
    p.add_argument("--rows", type=positive_int, default=2, help="problems to show")
    p.add_argument("--beta", type=fraction, default=0.2, help="BASH: share of the model's tokens")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=non_negative_int, default=0)
    args = p.parse_args(argv)
    try:
        show(args)
    except EXPECTED as e:
        sys.exit(error_line(e).replace("error: ", "error: worked_example.py: ", 1))


def show(args):
    init = Path(args.init or f"out/study/{args.task}/warmup/checkpoint")
    if args.init is None and not (init / "config.json").exists():
        print(f"no {init}: training a quick warm-up first", flush=True)
        init = quick_warm_up(args.task)
    tok, model = load_tokenizer(init), from_pretrained(init).eval()
    rows = encode_rows(builtin_task(args.rows, seed=args.seed + 777, terms=(4, 7), digits=1,
                                    form=args.task), tok, "arith", model.config.block_size)
    torch.manual_seed(args.seed)
    mixed = train.bash_rows(model, rows, args.beta, args.temperature, args.seed)
    rac = train.rac_rows(model, rows, max(len(r.response) for r in rows) + 8, args.temperature,
                         args.seed, tok.eos_id)
    for r, b, c in zip(rows, mixed, rac):
        print(f"\nx       {tok.decode(r.prompt)}")
        print("BASH (Eq. 4-5): input x ++ ŷ, targets y; ^ marks where ŷ took the model's sample")
        print(aligned(tok, {"y": r.response, "ŷ": b.inputs,
                            "took": ["^" if t else "" for t in b.took]}))
        print("RAC (Eq. 6-7): input x ++ z, targets z̄, trained only where z̄ != z (^)")
        print(aligned(tok, {"z": c.inputs, "z̄": c.targets,
                            "z̄ != z": ["^" if m else "" for m in c.mask]}))


if __name__ == "__main__":
    main()
