"""Writes docs/reading-order.md: to understand BASH (or RAC), read these functions in this order,
each with its file and line range, found in the source with ast so the page cannot go stale
(tests/test_reading_order.py fails when the page differs from what this script writes).

    python scripts/reading_order.py > docs/reading-order.md
    python scripts/reading_order.py --stats     # definitions and lines a reader crosses
"""
import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BUILD = ("train.py", "build_offline", "decode batches dealt to the ranks, each seeded")
LOOP = [
    ("train.py", "train", "Algorithms 1-2: K1 steps of SFT, then H iterations of {offline set; "
                          "K2 steps}"),
    ("train.py", "train_phase", "the steps of one phase, evaluation and checkpoint at its end"),
    ("train.py", "train_step", "one optimizer step, accumulated over micro-batches and ranks"),
    ("train.py", "loss_rows", "footnote 3: each row's SFT row and the method's row"),
    ("train.py", "step_loss", "J_SFT (Eq. 1) and the method's term, both over the SFT tokens "
                              "of the global batch"),
    ("train.py", "sft_parts", "J = J_SFT + J_BASH (or J_RAC), per micro-batch"),
]
TAIL = [
    ("train.py", "build_iteration_set", "line 8: the offline set with the current weights"),
    ("data.py", "collate", "right-padded inputs, targets and loss mask"),
    ("model.py", "masked_nll", "the masked token-level negative log-likelihood"),
]
PATHS = {  # in file order, so that reading them is reading each file from the top
    "BASH": LOOP + [
        ("train.py", "bash_rows", "Eq. 4-5: mixed inputs ŷ, targets y"), BUILD, TAIL[0],
        ("generate.py", "decode", "the KV-cache decode loop shared by every sampler"),
        ("generate.py", "bash_mix", "Eq. 4: the coins first, then a decode loop forcing y^j "
                                    "or sampling z^j"),
    ] + TAIL[1:],
    "RAC": LOOP + [
        ("train.py", "rac_rows", "Eq. 6-7: inputs z, targets z̄, mask z̄ != z"), BUILD, TAIL[0],
        ("generate.py", "generate", "KV-cache sampling of z until end-of-text"),
        ("generate.py", "rac_labels", "Eq. 6: sample z, then one teacher-forced pass over "
                                      "f(x, y) ++ z"),
        ("data.py", "encode_example", "f(x, y), the reference prompt of appendix A.1"),
    ] + TAIL[1:],
}


def definitions(path: Path) -> dict[str, tuple[int, int]]:
    """Every top-level function and class of a file, and methods as Class.name: (first, last)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = (first, node.end_lineno)
    return out


def page() -> str:
    defs = {f: definitions(ROOT / f) for f in {f for p in PATHS.values() for f, _, _ in p}}
    lines = ["# Reading order", "",
             "Written by `python scripts/reading_order.py > docs/reading-order.md`; "
             "`tests/test_reading_order.py` checks that it matches the code.", ""]
    for name, path in PATHS.items():
        lines += [f"## To understand {name}, read in this order", "",
                  "| # | function | file:lines | what it is |", "|---|---|---|---|"]
        for i, (f, fn, what) in enumerate(path, 1):
            if fn not in defs[f]:
                sys.exit(f"error: {f} has no function {fn!r} (update scripts/reading_order.py)")
            a, b = defs[f][fn]
            lines.append(f"| {i} | `{fn}` | `{f}:{a}-{b}` | {what} |")
        lines.append("")
    lines += ["Skip `plumbing/` (run folders, checkpoints, checks on every input) and the "
              "baselines section of `train.py` unless you need them.", ""]
    return "\n".join(lines)


def crossed(path) -> tuple[int, int]:
    """Definitions and lines a reader crosses: in each file, everything from the first to the
    last definition on the path, in file order (what one scrolls over to read them)."""
    n_defs = n_lines = 0
    for f in {f for f, _, _ in path}:
        defs = definitions(ROOT / f)
        spans = [defs[fn] for g, fn, _ in path if g == f]
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        inside = [(a, b) for a, b in defs.values() if a >= lo and b <= hi]
        n_defs += len(inside)
        n_lines += sum(b - a + 1 for a, b in inside)
    return n_defs, n_lines


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stats", action="store_true",
                   help="print the definitions and lines crossed on each path instead")
    if p.parse_args().stats:
        for name, path in PATHS.items():
            print(name, "definitions %d, lines %d" % crossed(path))
        return
    sys.stdout.write(page())


if __name__ == "__main__":
    main()
