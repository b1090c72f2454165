"""The map along the two axes where training on self-generated tokens should matter: answer
length, where a slip early on shapes everything after it, and data size (the paper's appendix
A.3). Built on scripts/map.py's warm-up, dev grid and runs, on the built-in chain task.

Length axis (--lengths): problems of exactly L+1 one-digit numbers, so every answer has L steps.
Per length: a warm-up from scratch saved every --warmup-eval-every epochs, the stage whose dev
accuracy is nearest --stage-fraction of the last evaluated epoch's (the end of the schedule), a
dev grid there (map.tune), then continued SFT, BASH and RAC for every seed on test, with
continued SFT at every lr a method picked. Beside accuracy, from each run's greedy test answers:
where the first slip falls (the first step that differs from the reference's), the share of
answers with a slip whose final answer is still right, and the offline statistics.

Fig. 2 of the paper on this task (--spread-problems): at each --spread-length, --spread-samples
answers at temperature --spread-temperature to a few test problems from the stage checkpoint and
each method's seed-0 checkpoint, and their token edit distance to the reference.

Data axis (--shares, at --data-length): from that length's stage, each method trained on a share
of a fresh pool of --train-size problems (none in train, dev or test) for the same number of
steps as the full pool, with that length's dev picks, every seed.

    python scripts/map_axes.py                 # every length, the spreads, the data axis
    OMP_NUM_THREADS=1 python scripts/map_axes.py --lengths 16 8 4               # or a process
    OMP_NUM_THREADS=1 python scripts/map_axes.py --lengths 24 32 --data-length 0  # per core
    python scripts/map_axes.py --plot-only

Results go to <out>/length-L<L>.json (one per length, so lengths can run in parallel processes),
<out>/length.md (every length's table) and <out>/data.md/.json, rewritten after every run (a
rerun skips what is there); pictures to --to (docs/map_length.png, map_data.png, map_spread.png).
"""
import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import map as map_  # noqa: E402
import study  # noqa: E402
import train  # noqa: E402
from data import builtin_task, extract_answer, load_rows  # noqa: E402
from model import from_pretrained  # noqa: E402
from plumbing.checks import (device_name, fraction, non_negative_float,  # noqa: E402
                             non_negative_int, positive_float, positive_int, script_main)
from plumbing.tokenizer import load_tokenizer  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=positive_int, nargs="*", default=[4, 8, 16, 24, 32],
                   help="steps per answer")
    p.add_argument("--data-length", type=non_negative_int, default=16,
                   help="the length of the data axis (0: no data axis in this process)")
    p.add_argument("--shares", type=fraction, nargs="+", default=[0.1, 0.2, 0.5, 1.0])
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=["sft", "bash", "rac"],
                   choices=("sft", "bash", "rac"))
    p.add_argument("--out", default="out/map-axes")
    p.add_argument("--to", default="docs", help="folder for the pictures")
    p.add_argument("--plot-only", action="store_true", help="draw the pictures, run nothing")
    p.add_argument("--debug", action="store_true",
                   help="a failure prints its traceback, not one error line")
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    g = p.add_argument_group("data and model (map.py's)")
    g.add_argument("--train-size", type=positive_int, default=400)
    g.add_argument("--dev-size", type=positive_int, default=100)
    g.add_argument("--test-size", type=positive_int, default=200)
    g.add_argument("--n-layer", type=positive_int, default=4)
    g.add_argument("--n-embd", type=positive_int, default=64)
    g.add_argument("--batch-size", type=positive_int, default=16)
    g.add_argument("--micro-batch-size", type=positive_int, default=16)
    g = p.add_argument_group("warm-up, stage and grid")
    g.add_argument("--warmup-epochs", type=positive_int, default=40)
    g.add_argument("--warmup-lr", type=positive_float, default=2e-3)
    g.add_argument("--warmup-eval-every", type=positive_int, default=2)
    g.add_argument("--stage-fraction", type=fraction, default=0.5,
                   help="the stage: dev accuracy nearest this fraction of the last epoch's")
    g.add_argument("--epochs", type=positive_float, default=1.0)
    g.add_argument("--lrs", type=positive_float, nargs="+", default=[1e-4, 1e-3])
    g.add_argument("--betas", type=fraction, nargs="+", default=[0.2, 0.5])
    g.add_argument("--rac-temperatures", type=non_negative_float, nargs="+", default=[0.5])
    g = p.add_argument_group("the spread of sampled answers (the paper's Fig. 2)")
    g.add_argument("--spread-length", type=positive_int, nargs="*", default=[24, 32],
                   help="the lengths whose checkpoints are sampled for the spread")
    g.add_argument("--spread-problems", type=non_negative_int, default=4)
    g.add_argument("--spread-samples", type=positive_int, default=256)
    g.add_argument("--spread-temperature", type=positive_float, default=0.7)
    return p.parse_args(argv)


def at_length(args, length: int) -> argparse.Namespace:
    """map.py's settings for answers of `length` steps: exactly length + 1 one-digit numbers,
    a context that holds the longest warm-up row (a reference row f(x, y) -> y is about twice
    an answer), and a generation cap a little over the longest reference answer."""
    a = copy.copy(args)
    a.terms, a.digits, a.eval_temperature, a.eval_samples = [length + 1, length + 1], 1, 0.0, 1
    a.grid, a.ref_share, a.template = "coordinate", 1.0, "arith"
    rows = builtin_task(300, 1, tuple(a.terms), 1, "chain")
    longest = max(len(e.prompt) + len(e.response) for e in rows)
    a.max_new_tokens = max(len(e.response) for e in rows) * 5 // 4 + 8
    a.block_size = -(-(2 * longest + 24) // 32) * 32  # "ref {y}\n{x}" + y, bytes, rounded up
    return a


# ----------------------------------------------------------------------------------------------
# Slips: where the first wrong step falls and whether the answer recovers


def first_slip(reply: str, reference: str) -> int | None:
    """The index of the first step of `reply` that differs from the reference's (a missing or
    extra step counts; the final answer after '####' is step L), or None when the reply is the
    reference. Before it the reply is the reference, so it is the model's first mistake."""
    (mine, _, end), (ref, _, ref_end) = reply.partition(" ####"), reference.partition(" ####")
    mine, ref = mine.split(","), ref.split(",")
    for k, step in enumerate(ref):
        if k >= len(mine) or mine[k] != step:
            return k
    return None if len(mine) == len(ref) and end == ref_end else len(ref)


def slip_stats(texts: list[str], rows) -> dict:
    """Of the greedy answers: the share with a slip, the mean position of the first slip over
    the answer's L + 1 parts (0: the first step), a 10-bin histogram of it, and the share of
    answers with a slip whose final answer is right (recovered)."""
    slips, recovered = [], 0
    for text, row in zip(texts, rows):
        k = first_slip(text, row.reference)
        if k is None:
            continue
        steps = row.reference.split(" ####")[0].count(",") + 1
        slips.append(k / (steps + 1))  # the L steps and the final answer, over [0, 1)
        recovered += extract_answer(text) == row.answer
    hist = np.histogram(slips, bins=10, range=(0.0, 1.0))[0].tolist()
    return {"slip_share": len(slips) / len(rows),
            "slip_position": float(np.mean(slips)) if slips else None,
            "slip_hist": hist, "recovered_share": recovered / len(slips) if slips else None}


def answers(init: Path, data: dict, split: str, args, temperature=0.0, repeat=1, seed=0,
            limit=None):
    """Answers of the checkpoint to the split's problems (each `repeat` times), and the rows."""
    tok, model = load_tokenizer(init), from_pretrained(init, device=args.device)
    rows, _ = load_rows(data[split], tok, "arith", model.config.block_size, "fail", False)
    rows = [r for r in rows[:limit] for _ in range(repeat)]
    texts = train.generate_answers(model, rows, tok, 256, args.max_new_tokens, temperature, seed,
                                   args.precision)
    return texts, rows, tok


def checked_run(results, key, init, data, out, settings, split, args) -> dict:
    """map.one_run, then the slip statistics of its checkpoint's greedy test answers."""
    res = map_.one_run(results, key, init, data, out, settings, split, args)
    if split == "test" and "slip_share" not in res:
        texts, rows, _ = answers(out / "checkpoint", data, "test", args)
        res.update(slip_stats(texts, rows))
    return res


# ----------------------------------------------------------------------------------------------
# The length axis


def stage_of(curve, fraction_) -> int:
    """The epoch (not the last) whose dev accuracy is nearest fraction_ x the last one's."""
    last, top = curve[-1]
    return min((abs(a - fraction_ * top), e) for e, a in curve if e != last)[1]


def length_point(length, args, st, save) -> None:
    """Warm-up, stage, dev picks, test runs and slips at one length, into st."""
    a = at_length(args, length)
    folder = Path(args.out) / f"chain-L{length}"
    data = study.write_splits(folder / "data", "chain", a)
    st.setdefault("results", {})
    st["curve"] = map_.warm_up(folder, data, a)
    st["stage"] = stage = stage_of(st["curve"], args.stage_fraction)
    st["block_size"], st["max_new_tokens"] = a.block_size, a.max_new_tokens
    ckpt = folder / "warmup" / f"epoch-{stage}"
    print(f"L={length}: dev accuracy {st['curve']}, stage {stage}", flush=True)
    if "warm_test" not in st:
        texts, rows, _ = answers(ckpt, data, "test", a)
        acc = sum(extract_answer(t) == r.answer for t, r in zip(texts, rows)) / len(rows)
        st["warm_test"] = {"accuracy": acc, **slip_stats(texts, rows)}
    results = st["results"]
    st["picks"] = picks = map_.tune(results, stage, ckpt, data, folder, a)
    save()
    for seed in args.seeds:
        for method in args.methods:
            print(f"L={length}: {method}, seed {seed}", flush=True)
            checked_run(results, f"test|{stage}|{method}|{seed}", ckpt, data,
                        folder / "test" / method / f"seed{seed}", picks[method], "test", a)
            save()
        for lr in sorted({picks[m]["lr"] for m in args.methods} - {picks["sft"]["lr"]}):
            checked_run(results, f"test|{stage}|sft@{lr:g}|{seed}", ckpt, data,
                        folder / "test" / f"sft-lr{lr:g}" / f"seed{seed}",
                        {**picks["sft"], "lr": lr}, "test", a)
            save()


SLIPS = ("slip_share", "slip_position", "recovered_share")


def length_cells(state, seeds) -> list[dict]:
    """map.cells per length, with the slip statistics beside them."""
    out = []
    for length in sorted(state, key=int):
        st = state[length]
        if "stage" not in st:
            continue
        curve = [tuple(c) for c in st["curve"]]
        for c in map_.cells("chain", [st["stage"]], curve, st["results"], seeds):
            rs = [st["results"][f"test|{st['stage']}|{c['method']}|{s}"] for s in c["seeds"]]
            for k in SLIPS:
                vals = [r[k] for r in rs if r.get(k) is not None]
                c[k] = study.mean_ci(vals) if vals else None
            c["slip_hist"] = np.sum([r["slip_hist"] for r in rs], axis=0).tolist()
            out.append({"length": int(length), **c})
    return out


SHOWN = [("accuracy", ".1f"), ("delta", "+.1f"), ("delta_same_lr", "+.1f"), ("slip_share", ".2f"),
         ("slip_position", ".2f"), ("recovered_share", ".2f"), ("differs_from_y_share", ".3f"),
         ("corrected_share", ".3f"), ("label_precision", ".2f")]  # length.md's columns from 6 on


def length_table(state, cells) -> str:
    head = ["steps", "stage: epoch (dev %)", "stage test %", "method", "settings", "test %",
            "Δ vs SFT", "Δ vs SFT at its lr", "answers with a slip", "first slip at",
            "recovered after a slip", "ŷ differs", "z corrected", "label precision"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        st, s = state[str(c["length"])], c["settings"]
        w = st["warm_test"]
        shown = f"lr {s['lr']:g}" + (f", β {s['beta']:g}" if c["method"] == "bash" else "") + (
            f", T {s['rac_temperature']:g}" if c["method"] == "rac" else "")
        lines.append("| " + " | ".join([
            str(c["length"]), f"{st['stage']} ({100 * c['dev_accuracy']:.0f})",
            f"{100 * w['accuracy']:.1f} (slips {w['slip_share']:.2f})", c["method"], shown,
            *(map_.cell(c.get(k), spec) for k, spec in SHOWN)]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The spread of sampled answers (Fig. 2)


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between token lists, one DP row at a time: the row's insertion
    chain is a running minimum of (cost - index), plus the index."""
    prev = np.arange(len(b) + 1)
    idx = np.arange(len(b) + 1)
    bb = np.array(b)
    for i, t in enumerate(a, 1):
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (bb != t))
        prev = np.minimum.accumulate(cur - idx) + idx
    return int(prev[-1])


def spread(length, st, args, save) -> None:
    """Samples from the stage and each method's seed-0 checkpoint at `length`, into st."""
    a = at_length(args, length)
    folder = Path(args.out) / f"chain-L{length}"
    data = study.write_splits(folder / "data", "chain", a)
    sources = {"stage": folder / "warmup" / f"epoch-{st['stage']}"}
    sources.update({m: folder / "test" / m / "seed0" / "checkpoint" for m in args.methods})
    sp = st.setdefault("spread", {})
    for name, init in sources.items():
        if name in sp or not (init / "config.json").exists():
            continue
        texts, rows, tok = answers(init, data, "test", a, args.spread_temperature,
                                   args.spread_samples, seed=1, limit=args.spread_problems)
        ref = {r.reference: tok.encode(r.reference) for r in rows}
        sp[name] = [[] for _ in range(args.spread_problems)]
        for k, (t, r) in enumerate(zip(texts, rows)):
            sp[name][k // args.spread_samples].append(edit_distance(tok.encode(t),
                                                                    ref[r.reference]))
        print(f"spread: {name} done", flush=True)
        save()


# ----------------------------------------------------------------------------------------------
# The data axis


def data_point(args, state, lengths, save) -> None:
    """Each share of a fresh pool, the same number of steps, the length's dev picks."""
    length = args.data_length
    st = lengths.get(str(length))
    if not st or "picks" not in st:
        raise ValueError(f"--data-length {length}: run that length first (its stage and picks)")
    a = at_length(args, length)
    folder = Path(args.out) / f"chain-L{length}"
    data = study.write_splits(folder / "data", "chain", a)
    seen = {json.loads(line)["prompt"] for s in ("train", "dev", "test")
            for line in data[s].read_text().splitlines()}
    pool = [e for e in builtin_task(4 * args.train_size, 4321, tuple(a.terms), 1, "chain")
            if not (e.prompt in seen or seen.add(e.prompt))][:args.train_size]
    random.Random(0).shuffle(pool)
    ckpt = folder / "warmup" / f"epoch-{st['stage']}"
    results = state.setdefault("results", {})
    state["length"], state["stage"] = length, st["stage"]
    for share in args.shares:
        n = round(share * len(pool))
        path = Path(args.out) / "data-axis" / f"share{share:g}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        study.write_jsonl(path, [study.as_template({"prompt": e.prompt, "response": e.response},
                                                   "arith") for e in pool[:n]])
        d = {**data, "train": path}
        for seed in args.seeds:
            for method in args.methods:
                s = {**st["picks"][method], "epochs": args.epochs * len(pool) / n}
                print(f"data: share {share:g}, {method}, seed {seed}", flush=True)
                map_.one_run(results, f"test|{share:g}|{method}|{seed}", ckpt, d,
                             Path(args.out) / "data-axis" / f"share{share:g}" / method /
                             f"seed{seed}", s, "test", a)
                save()


def data_cells(state, seeds) -> list[dict]:
    out = []
    for share in sorted({float(k.split("|")[1]) for k in state.get("results", {})}):
        get = lambda m, s: state["results"].get(f"test|{share:g}|{m}|{s}")  # noqa: E731
        for method in ("sft", "bash", "rac"):
            rs = {s: get(method, s) for s in seeds if get(method, s)}
            if not rs:
                continue
            delta = [100 * (r["accuracy"] - get("sft", s)["accuracy"]) for s, r in rs.items()
                     if get("sft", s)]
            out.append({"share": share, "method": method, "seeds": sorted(rs),
                        "accuracy": study.mean_ci([100 * r["accuracy"] for r in rs.values()]),
                        "delta": study.mean_ci(delta) if method != "sft" else None})
    return out


def data_table(cells) -> str:
    lines = ["| share of the pool | method | test % | Δ vs SFT |", "|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['share']:g} | {c['method']} | {map_.cell(c['accuracy'], '.1f')} | "
                     f"{map_.cell(c['delta'], '+.1f')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Saving, pictures, main


def lengths_state(root: Path) -> dict:
    """Every length's saved state, {"4": {...}, ...}."""
    found = {p.stem.split("-L")[1]: study.saved_json(p) for p in root.glob("length-L*.json")}
    return {k: v for k, v in found.items() if v}


def tables(root: Path, args) -> None:
    """length.md from every length's file; data.md from the data axis."""
    state = lengths_state(root)
    walls = ", ".join(f"L={k}: {v.get('wall_s', 0) / 60:.0f} min" for k, v in
                      sorted(state.items(), key=lambda kv: int(kv[0])))
    study.write_atomic(root / "length.md", "mean ± 95 % interval over seeds; Δ paired by seed\n\n" +
                 length_table(state, length_cells(state, args.seeds)) + f"\n\nwall {walls}\n")
    d = study.saved_json(root / "data.json")
    if d:
        study.write_atomic(root / "data.md", f"length {d['length']}, stage epoch {d['stage']}\n\n" +
                     data_table(data_cells(d, args.seeds)) +
                     f"\n\nwall {d.get('wall_s', 0) / 60:.0f} min\n")


def saver(path: Path, st: dict, root: Path, args):
    """A function that saves st (with its wall time so far) and the tables."""
    t0, before = time.perf_counter(), st.get("wall_s", 0.0)

    def save():
        st["wall_s"] = before + time.perf_counter() - t0
        study.write_atomic(path, json.dumps(st, indent=1))
        tables(root, args)
    return save


def main(argv=None):
    args = get_args(argv)
    script_main("map_axes.py", lambda: run(args), args.debug)  # any failure: one error line


def run(args):
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        for length in args.lengths:
            path = root / f"length-L{length}.json"
            st = study.saved_json(path) or {}
            save = saver(path, st, root, args)
            length_point(length, args, st, save)
            if length in args.spread_length:
                spread(length, st, args, save)
        if args.data_length:
            d = study.saved_json(root / "data.json") or {}
            data_point(args, d, lengths_state(root), saver(root / "data.json", d, root, args))
    tables(root, args)
    try:
        plots(root, args, Path(args.to))
    except ImportError:
        print("matplotlib is not installed: no picture (pip install matplotlib)")
    print((root / "length.md").read_text())


def delta_plot(plt, cells, axis: str, delta, xlabel: str, what: str, path: Path):
    """BASH's and RAC's paired Δ against continued SFT along `axis`, with 95 % intervals."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = sorted({c[axis] for c in cells})
    for i, method in enumerate(("bash", "rac")):
        cs = [c for c in cells if c["method"] == method and delta(c)]
        ax.errorbar([c[axis] * (1.03 if i else 0.97) for c in cs], [delta(c)[0] for c in cs],
                    yerr=[delta(c)[1] or 0.0 for c in cs], fmt="o-", capsize=3, c=f"C{i}",
                    label=f"{method.upper()} − continued SFT")
    ax.axhline(0, c="0.5", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("paired Δ test accuracy (points)")
    ax.set_title(f"Δ vs continued SFT by {what}, mean ± 95 % interval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def plots(root: Path, args, to: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    to.mkdir(parents=True, exist_ok=True)
    state = lengths_state(root)
    cells = [c for c in length_cells(state, args.seeds) if c["method"] != "sft"]
    if cells:  # Δ vs continued SFT at the method's own lr (SFT's pick where the two agree)
        delta_plot(plt, cells, "length", lambda c: c.get("delta_same_lr") or c["delta"],
                   "steps per answer (chain)", "answer length", to / "map_length.png")
    d = study.saved_json(root / "data.json")
    if d and d.get("results"):
        delta_plot(plt, data_cells(d, args.seeds), "share", lambda c: c["delta"],
                   f"share of the training pool, the same number of steps; L={d['length']}",
                   "data size", to / "map_data.png")
    sp = sorted(((int(k), v["spread"]) for k, v in state.items() if v.get("spread")))
    if sp:  # a row of violins per length with a spread, a panel per test problem
        problems = max(len(spread_["stage"]) for _, spread_ in sp)
        fig, axes = plt.subplots(len(sp), problems, figsize=(3.2 * problems, 3.4 * len(sp)),
                                 squeeze=False)
        for row, (length, spread_) in zip(axes, sp):
            names = [n for n in ("stage", "sft", "bash", "rac") if n in spread_]
            for k, ax in enumerate(row[:len(spread_["stage"])]):
                ax.violinplot([spread_[n][k] for n in names], showmedians=True)
                ax.set_xticks(range(1, len(names) + 1), names)
                ax.set_title(f"L={length}, test problem {k + 1}", fontsize=9)
                ax.set_ylabel("token edit distance to the reference" if k == 0 else "")
        fig.suptitle(f"{args.spread_samples} answers at temperature {args.spread_temperature} "
                     "from the stage and each method's seed-0 checkpoint")
        fig.tight_layout()
        fig.savefig(to / "map_spread.png", dpi=110)
        print(f"wrote {to / 'map_spread.png'}")

if __name__ == "__main__":
    main()
