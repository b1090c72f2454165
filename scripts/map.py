"""The map: when does training on self-generated tokens help? Continued SFT, BASH and RAC from
warm-up checkpoints at several stages, from a model that deviates often up to the plateau.

Per task (data.builtin_task, the study's splits and reference rows, scripts/study.py):
  1. one warm-up: SFT from scratch for --warmup-epochs under one cosine schedule, evaluated on
     dev and saved after every epoch (<out>/<task>/warmup/epoch-N);
  2. the stages: the last epoch (the end of the schedule) and the epochs whose dev
     accuracy is nearest to --stage-fractions of the last one's;
  3. at every stage (--tune-stages all), a dev grid, seed 0 (--grid coordinate): each
     method's own lr (--lrs), then BASH's β (--betas) and RAC's z temperature
     (--rac-temperatures), each picked by dev accuracy; or --grid sft-lr: SFT's lr only, used
     by every method with the first β and temperature; --tune-stages ends: the lowest and the
     highest stage only, the others taking the picks of the nearest tuned stage;
  4. on test, every method from every stage for every seed; paired Δ vs continued SFT (same
     stage, seed and data order) with 95 % t-intervals, and where a method picked another lr
     than SFT, Δ vs continued SFT at that lr too (run for the purpose); the deviation
     statistics of each offline set; and RAC's label precision: the share of its corrections
     (z̄ != z) that are right (study.right_continuation says what "right" is on each task).

    python scripts/map.py                                  # both tasks, the README's sizes
    python scripts/map.py --tasks totals --seeds 0 1       # one task, fewer seeds
    python scripts/map.py --plot-only                      # the pictures from the results

Results go to <out>/<task>.md and .json, rewritten after every run (a rerun skips what is
there); pictures to --to (docs/map_<task>.png), when matplotlib is installed.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402
import train  # noqa: E402
from data import BUILTIN_FORMS  # noqa: E402
from plumbing.checks import (device_name, fraction, non_negative_float,  # noqa: E402
                             non_negative_int, positive_float, positive_int, script_main)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(BUILTIN_FORMS), choices=BUILTIN_FORMS)
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=["sft", "bash", "rac"],
                   choices=("sft", "bash", "rac"))
    p.add_argument("--out", default="out/map")
    p.add_argument("--to", default="docs", help="folder for the pictures")
    p.add_argument("--plot-only", action="store_true", help="draw the pictures, run nothing")
    p.add_argument("--debug", action="store_true",
                   help="a failure prints its traceback, not one error line")
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    g = p.add_argument_group("data and batches (smaller than the study's: 60 test runs a task)")
    g.add_argument("--train-size", type=positive_int, default=400)
    g.add_argument("--dev-size", type=positive_int, default=100)
    g.add_argument("--test-size", type=positive_int, default=200)
    g.add_argument("--terms", type=positive_int, nargs=2, default=[3, 5],
                   help="numbers per problem")
    g.add_argument("--digits", type=positive_int, default=1)
    g.add_argument("--n-layer", type=positive_int, default=4, help="the model from scratch")
    g.add_argument("--n-embd", type=positive_int, default=64)
    g.add_argument("--block-size", type=positive_int, default=256, help="the model's context")
    g.add_argument("--batch-size", type=positive_int, default=16)
    g.add_argument("--micro-batch-size", type=positive_int, default=16)
    g.add_argument("--max-new-tokens", type=positive_int, default=None)
    g.add_argument("--eval-temperature", type=non_negative_float, default=0.0)
    g.add_argument("--eval-samples", type=positive_int, default=1)
    g = p.add_argument_group("warm-up and stages")
    g.add_argument("--warmup-epochs", type=positive_int, default=40)
    g.add_argument("--warmup-lr", type=positive_float, default=2e-3)
    g.add_argument("--warmup-eval-every", type=positive_int, default=1,
                   help="epochs between the warm-up's dev evaluations (and kept checkpoints)")
    g.add_argument("--stage-fractions", type=fraction, nargs="+", default=[0.3, 0.6, 0.85],
                   help="the other stages: dev accuracy nearest to these fractions of the last's")
    g = p.add_argument_group("continuations and the dev grid")
    g.add_argument("--epochs", type=positive_float, default=1.0)
    g.add_argument("--lrs", type=positive_float, nargs="+", default=[1e-4, 1e-3])
    g.add_argument("--betas", type=fraction, nargs="+", default=[0.2, 0.5])
    g.add_argument("--rac-temperatures", type=non_negative_float, nargs="+", default=[1.0, 0.5])
    g.add_argument("--grid", default="coordinate", choices=("coordinate", "sft-lr"),
                   help="coordinate: each method's lr, then BASH's β and RAC's temperature; "
                        "sft-lr: SFT's lr only, which every method then uses, with the first "
                        "--betas and --rac-temperatures")
    g.add_argument("--tune-stages", default="all", choices=("ends", "all"),
                   help="ends: the grid at the lowest and the highest stage only")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The warm-up and its stages


def warm_up(folder: Path, data: dict, args) -> list[tuple[int, float]]:
    """One SFT run from scratch, stopped after every --warmup-eval-every epochs to keep a copy
    of its checkpoint (--stop-after, then --resume: the same run as one without stops). Returns
    (epoch, dev accuracy) for every evaluated epoch."""
    out = folder / "warmup"
    rows = len(data["warmup"].read_text().splitlines())
    every = args.warmup_eval_every
    per_epoch = train.steps_per_epoch(rows, args.batch_size)
    for epoch in range(every, args.warmup_epochs + 1, every):
        if (out / f"epoch-{epoch}" / "config.json").exists():
            continue
        again = (out / "checkpoint").exists() or (out / "checkpoint.old").exists()
        if not again:  # nothing saved yet: start the run afresh
            shutil.rmtree(out, ignore_errors=True)
        argv = study.common({**data, "train": data["warmup"]}, "dev", out, args, "--init",
                            "scratch", "--method", "sft", "--iter-epochs", args.warmup_epochs,
                            "--lr", args.warmup_lr, "--seed", 0, "--eval-every", every * per_epoch,
                            "--stop-after", epoch * per_epoch, "--n-layer", args.n_layer,
                            "--n-embd", args.n_embd, "--block-size", args.block_size,
                            *(["--resume"] if again else []))
        train.run(train.get_args(argv))
        shutil.copytree(out / "checkpoint", out / f"epoch-{epoch}.tmp", dirs_exist_ok=True)
        os.replace(out / f"epoch-{epoch}.tmp", out / f"epoch-{epoch}")
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    acc = {r["step"] // per_epoch: r["accuracy"] for r in evals if "accuracy" in r}
    return sorted(acc.items())


def pick_stages(curve: list[tuple[int, float]], fractions) -> list[int]:
    """The last epoch, and for each fraction the epoch whose dev accuracy is nearest to that
    fraction of the last one's (each epoch once), lowest first."""
    last_epoch, top = curve[-1]
    chosen = {last_epoch}
    for f in fractions:
        rest = [(abs(a - f * top), e) for e, a in curve if e not in chosen]
        if rest:
            chosen.add(min(rest)[1])
    return sorted(chosen)


# ----------------------------------------------------------------------------------------------
# Runs: the dev grid, then every cell on test


def one_run(results, key, init: Path, data, out: Path, settings, split, args) -> dict:
    """A continuation, or its result from an earlier call of the map (results[key])."""
    if key in results:
        return results[key]
    method = key.split("|")[2].split("@")[0]  # "sft@LR": continued SFT at another method's lr
    res = study.continue_from(init, data, out, method, int(key.split("|")[3]), settings, split,
                              args)
    results[key] = {**res, "settings": settings}
    return results[key]


def tune(results, stage, init, data, folder, args) -> dict:
    """Picks on dev, seed 0: SFT's lr; then (--grid coordinate) BASH's lr at the first β, then
    its β, and RAC's lr at the first temperature, then its temperature. Returns {method:
    settings}."""
    base = {"epochs": args.epochs, "iterations": 1, "beta": args.betas[0],
            "rac_temperature": args.rac_temperatures[0]}

    def best(method, grid):
        scored = []
        for s in grid:
            tag = f"lr{s['lr']:g}-b{s['beta']:g}-t{s['rac_temperature']:g}"
            key = f"dev|{stage}|{method}|0|{tag}"
            res = one_run(results, key, init, data, folder / "dev" / f"e{stage}" / method / tag,
                          s, "dev", args)
            scored.append((res["accuracy"], -s["lr"], s))  # ties: the smaller lr
        return max(scored, key=lambda t: t[:2])[2]
    picks = {"sft": best("sft", [{**base, "lr": lr} for lr in args.lrs])}
    if args.grid == "sft-lr":
        return {m: picks["sft"] for m in ("sft", "bash", "rac")}
    s = best("bash", [{**base, "lr": lr} for lr in args.lrs])
    picks["bash"] = best("bash", [{**s, "beta": b} for b in args.betas])
    s = best("rac", [{**base, "lr": lr} for lr in args.lrs])
    picks["rac"] = best("rac", [{**s, "rac_temperature": t} for t in args.rac_temperatures])
    return picks


def cells(task, stages, curve, results, seeds) -> list[dict]:
    """Per stage and method on test: accuracy, paired Δ vs SFT, offline statistics, precision."""
    rows = []
    for stage in stages:
        get = lambda m, s: results.get(f"test|{stage}|{m}|{s}")  # noqa: E731
        for method in ("sft", "bash", "rac"):
            rs = {s: get(method, s) for s in seeds if get(method, s)}
            if not rs:
                continue
            delta = [100 * (r["accuracy"] - get("sft", s)["accuracy"]) for s, r in rs.items()
                     if get("sft", s)]
            settings = next(iter(rs.values()))["settings"]
            control = lambda s: get(f"sft@{settings['lr']:g}", s) or get("sft", s)  # noqa: E731
            same = [100 * (r["accuracy"] - control(s)["accuracy"]) for s, r in rs.items()
                    if control(s)]  # Δ vs continued SFT at this method's lr
            pick = lambda k: [r[k] for r in rs.values() if r.get(k) is not None]  # noqa: E731
            rows.append({"stage": stage, "dev_accuracy": dict(curve)[stage], "method": method,
                         "seeds": sorted(rs), "settings": settings,
                         "accuracy": study.mean_ci([100 * a for a in pick("accuracy")]),
                         "delta": study.mean_ci(delta) if method != "sft" else None,
                         "delta_same_lr": study.mean_ci(same) if method != "sft" else None,
                         **{k: study.mean_ci(pick(k)) for k in
                            ("differs_from_y_share", "corrected_share", "rows_without_correction",
                             "label_precision", "labels_defined_share") if pick(k)}})
    return rows


def cell(v, spec: str) -> str:
    """A (mean, interval) pair as "mean ± interval" in `spec`; "-" for None."""
    if v is None:
        return "-"
    return format(v[0], spec) + ("" if v[1] is None else f" ± {format(v[1], spec.lstrip('+'))}")


def table(task, cells_, warm) -> str:
    head = ["stage (warm-up epoch)", "warm-up test %", "method", "settings", "test accuracy %",
            "Δ vs SFT (points)", "Δ vs SFT at its lr", "ŷ differs from y", "z corrected",
            "rows without correction", "label precision", "labels defined"]
    lines = [f"**{task}**: mean ± 95 % interval over seeds; Δ paired by seed", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells_:
        s = c["settings"]
        shown = f"lr {s['lr']:g}" + (f", β {s['beta']:g}" if c["method"] == "bash" else "") + (
            f", T {s['rac_temperature']:g}" if c["method"] == "rac" else "")
        lines.append("| " + " | ".join([
            f"{c['stage']} (dev {100 * c['dev_accuracy']:.1f} %)",
            f"{100 * warm[str(c['stage'])]:.1f}",
            c["method"], shown, cell(c["accuracy"], ".1f"), cell(c["delta"], "+.1f"),
            cell(c.get("delta_same_lr"), "+.1f"),
            cell(c.get("differs_from_y_share"), ".3f"), cell(c.get("corrected_share"), ".3f"),
            cell(c.get("rows_without_correction"), ".0f"), cell(c.get("label_precision"), ".2f"),
            cell(c.get("labels_defined_share"), ".2f")]) + " |")
    return "\n".join(lines)


def save(root: Path, task, state: dict, t0):
    state["wall_s"] = state.get("wall_before_s", 0.0) + time.perf_counter() - t0
    rows = cells(task, state["stages"], state["curve"], state["results"], state["seeds"])
    text = table(task, rows, state["warm_test"]) + f"\n\nwall time {state['wall_s'] / 60:.1f} min\n"
    for name, body in ((f"{task}.md", text), (f"{task}.json",
                                               json.dumps({**state, "cells": rows}, indent=1))):
        tmp = root / (name + ".tmp")
        tmp.write_text(body)
        os.replace(tmp, root / name)
    return text


def map_task(task, args):
    root = Path(args.out)
    folder = root / task
    t0 = time.perf_counter()
    saved = root / f"{task}.json"
    state = json.loads(saved.read_text()) if saved.exists() else {"results": {}, "warm_test": {}}
    state["wall_before_s"] = state.get("wall_s", 0.0)
    data = study.write_splits(folder / "data", task, args)
    state["curve"] = warm_up(folder, data, args)
    state["stages"] = stages = pick_stages(state["curve"], args.stage_fractions)
    state["seeds"], results = args.seeds, state["results"]
    print(f"{task}: dev accuracy per epoch {state['curve']}, stages {stages}", flush=True)
    ckpt = lambda e: folder / "warmup" / f"epoch-{e}"  # noqa: E731
    for e in stages:
        if str(e) not in state["warm_test"]:
            state["warm_test"][str(e)] = study.evaluate_checkpoint(ckpt(e), data, "test",
                                                                   args)["accuracy"]
    tuned = stages if args.tune_stages == "all" else sorted({stages[0], stages[-1]})
    picks = {}
    for e in tuned:
        picks[e] = tune(results, e, ckpt(e), data, folder, args)
        save(root, task, state, t0)
    for seed in args.seeds:
        for e in stages:
            near = min(tuned, key=lambda t: (abs(stages.index(t) - stages.index(e)), -t))
            for method in args.methods:
                key = f"test|{e}|{method}|{seed}"
                print(f"{task}: stage {e}, {method}, seed {seed}", flush=True)
                one_run(results, key, ckpt(e), data, folder / "test" / f"e{e}" / method /
                        f"seed{seed}", picks[near][method], "test", args)
                save(root, task, state, t0)
            sft = picks[near]["sft"]
            for lr in sorted({picks[near][m]["lr"] for m in args.methods} - {sft["lr"]}):
                # a method picked another lr than SFT: Δ mixes method and lr, so SFT at that lr too
                print(f"{task}: stage {e}, sft at lr {lr:g}, seed {seed}", flush=True)
                one_run(results, f"test|{e}|sft@{lr:g}|{seed}", ckpt(e), data, folder / "test" /
                        f"e{e}" / f"sft-lr{lr:g}" / f"seed{seed}", {**sft, "lr": lr}, "test", args)
                save(root, task, state, t0)
    print(save(root, task, state, t0))


# ----------------------------------------------------------------------------------------------
# Pictures


def plot(task, state, to: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, method in enumerate(("bash", "rac")):
        cs = [c for c in state["cells"] if c["method"] == method and c["delta"]]
        x = [100 * state["warm_test"][str(c["stage"])] for c in cs]
        # the line: Δ vs continued SFT at the method's own lr (SFT's dev pick where they agree)
        same = [c.get("delta_same_lr") or c["delta"] for c in cs]
        mean, half = [d[0] for d in same], [d[1] or 0.0 for d in same]
        ax.plot(x, mean, "o-", c=f"C{i}", label=f"{method.upper()} − continued SFT at its lr")
        ax.fill_between(x, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                        color=f"C{i}", alpha=0.2)
        other = [(xi, c["delta"]) for xi, c, d in zip(x, cs, same) if d != c["delta"]]
        if other:  # where SFT's own dev pick was another lr: Δ against that run
            ax.errorbar([o[0] for o in other], [o[1][0] for o in other], capsize=3, fmt="x",
                        yerr=[o[1][1] or 0.0 for o in other], c=f"C{i}",
                        label=f"{method.upper()} − continued SFT at SFT's dev-picked lr")
        for xi, mi, c in zip(x, mean, cs):  # RAC's label precision beside its Δ
            if c.get("label_precision"):
                ax.annotate(f"precision {c['label_precision'][0]:.2f}", (xi, mi), fontsize=8,
                            textcoords="offset points", xytext=(4, -12), color=f"C{i}")
    ax.axhline(0, c="0.5", lw=0.8)
    ax.set_xlabel("test accuracy of the warm-up checkpoint the continuation starts from (%)")
    ax.set_ylabel("paired Δ test accuracy (points)")
    seeds = max(len(c["seeds"]) for c in state["cells"])
    ax.set_title(f"{task}: Δ vs continued SFT, mean ± 95 % interval over {seeds} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    to.mkdir(parents=True, exist_ok=True)
    fig.savefig(to / f"map_{task}.png", dpi=110)
    print(f"wrote {to / f'map_{task}.png'}")


def main(argv=None):
    args = get_args(argv)
    script_main("map.py", lambda: draw_map(args), args.debug)  # any failure: one error line


def draw_map(args):
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        if not args.plot_only:
            map_task(task, args)
        try:
            plot(task, json.loads((Path(args.out) / f"{task}.json").read_text()), Path(args.to))
        except ImportError:
            print("matplotlib is not installed: no picture (pip install matplotlib)")


if __name__ == "__main__":
    main()
