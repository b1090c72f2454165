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
    ("model.py", "GPT", "the decoder: forward (logits, or the loss) for training, hidden for "
                        "decoding over the KV cache"),
    ("model.py", "chunked_nll", "the loss training calls: -log p(target) at the scored positions, "
                                "which step_loss sums into Eq. 1, 5 and 7"),
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
    lines += ["Skip `plumbing/` (Hugging Face conversion, tokenizers, chat templates, torchrun, "
              "device speed, run folders, checkpoints, checks on every input) and the "
              "baselines section of `train.py` unless you need them.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# --stats: the definitions a reader reaches by following every call from train.train

FOUR = ("model.py", "generate.py", "data.py", "train.py")
# Not followed: resuming, checkpoints, evaluation and logging are not the method.
NOT_FOLLOWED = {"resume", "checkpoint", "evaluate_run", "log"}
# The calls Python resolves at run time, which the names in the source do not show: calling a
# GPT runs its forward (and a KVCache's update inside it).
CALLS_A_MODEL = ("step_loss", "sequence_logps", "decode", "rac_labels")


def top_level(files=FOUR) -> tuple[dict, dict]:
    """{(file, name): node} of every top-level function and class, and {(file, name): (file,
    name)} of the names each file imports from the others."""
    defs, imports = {}, {}
    for f in files:
        for node in ast.parse((ROOT / f).read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defs[(f, node.name)] = node
            elif isinstance(node, ast.ImportFrom) and f"{node.module}.py" in files:
                for a in node.names:
                    imports[(f, a.asname or a.name)] = (f"{node.module}.py", a.name)
    return defs, imports


def method_test(test, record):
    """The value of an `if` test on the Method record's fields (m.pairs, not m.noise), else
    None: the run-time dispatch of one method follows the branch its record takes."""
    negate = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
    test = test.operand if negate else test
    if isinstance(test, ast.Attribute) and test.attr in record.__dataclass_fields__:
        return bool(getattr(record, test.attr)) != negate
    return None


def references(node, here: str, defs: dict, imports: dict, record) -> set:
    """Every definition of the four files that node's body names (a call, a callback, a type),
    taking only the branch its method's record takes where a test reads the record."""
    found, todo = set(), [node]
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.If, ast.IfExp)) and method_test(n.test, record) is not None:
            taken = n.body if method_test(n.test, record) else n.orelse
            todo += taken if isinstance(taken, list) else [taken]
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            key = (here, n.id) if (here, n.id) in defs else imports.get((here, n.id))
            if key in defs:
                found.add(key)
        todo += list(ast.iter_child_nodes(n))
    return found


def closure(method: str) -> list[tuple[str, str]]:
    """The definitions reached from train.train for `method`: the static references of each body
    (the branch its Method record takes), the method's builder (m.build), and GPT where a model
    is called; a class counts whole."""
    sys.path.insert(0, str(ROOT))
    import train
    record = train.METHODS[method]
    defs, imports = top_level()
    seen, todo = set(), [("train.py", "train")]
    while todo:
        key = todo.pop()
        if key in seen or key[1] in NOT_FOLLOWED:
            continue
        seen.add(key)
        todo += references(defs[key], key[0], defs, imports, record)
        if key == ("train.py", "build_iteration_set") or key == ("train.py", "train_step"):
            todo.append(("train.py", record.build.__name__))  # m.build
        if key[1] in CALLS_A_MODEL:
            todo.append(("model.py", "GPT"))
    return sorted(seen)


def crossed(method: str) -> tuple[int, int]:
    """(definitions, lines) of the closure: every line of each definition reached."""
    defs, _ = top_level()
    spans = [definitions(ROOT / f)[name] for f, name in closure(method)]
    return len(spans), sum(b - a + 1 for a, b in spans)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stats", action="store_true",
                   help="print the definitions and lines crossed on each path instead")
    if p.parse_args().stats:
        for name in PATHS:
            print(name, "definitions %d, lines %d" % crossed(name.lower()))
        return
    sys.stdout.write(page())


if __name__ == "__main__":
    main()
