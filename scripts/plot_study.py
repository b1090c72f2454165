"""Pictures of the built-in study, one PNG per task: the warm-up reaching its plateau, each
method's training loss after it, and the accuracy per method with 95 % intervals over seeds.

    pip install matplotlib          # an optional extra: only this script uses it
    python scripts/plot_study.py --study out/study --split test --to docs
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import mean_ci  # noqa: E402


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_task(plt, task, results, study: Path, split, to: Path):
    fig, (warm, cont, acc) = plt.subplots(1, 3, figsize=(15, 4.2))
    log, offset = [], 0
    for folder in sorted((study / task).glob("warmup*"), key=lambda p: int(p.name[7:] or 1)):
        part = read_log(folder / "log.jsonl")  # the rounds of the warm-up, one after the other
        log += [{**r, "step": r["step"] + offset} for r in part]
        offset = max([r["step"] for r in log] or [0])
    steps = [r for r in log if "loss" in r]
    warm.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.6, label="train loss")
    warm.set_yscale("log")
    warm.set_xlabel("step")
    warm.set_title(f"{task}: SFT warm-up from scratch, to its plateau")
    evals = [r for r in log if "accuracy" in r]
    dev = warm.twinx()
    dev.plot([r["step"] for r in evals], [100 * r["accuracy"] for r in evals], "o-", c="C3",
             label="dev accuracy %")
    dev.set_ylabel("dev accuracy %")
    warm.legend(loc="center right")

    labels = list(dict.fromkeys(r["label"] for r in results if r["label"] != "warm-up"))
    seed = min(r["seed"] for r in results)
    for name in labels:
        seed_dir = study / split / task / f"seed{seed}"
        folder = next((f for f in (name.replace(" ", "").replace("=", ""), name.replace(" ", "-"))
                       if (seed_dir / f).exists()), name)  # the study's folder names
        rec = [r for r in read_log(seed_dir / folder / "log.jsonl") if "loss" in r]
        cont.plot([r["step"] for r in rec], [r["loss"] for r in rec], lw=0.8, label=name)
    cont.set_xlabel("step of the continuation")
    cont.set_title(f"training loss J after the warm-up (seed {seed})")
    cont.legend()

    names = ["warm-up"] + labels
    stats = [mean_ci([100 * r["accuracy"] for r in results if r["label"] == n]) for n in names]
    acc.bar(names, [m for m, _ in stats], yerr=[h or 0 for _, h in stats], capsize=6,
            color=["0.6"] + [f"C{i}" for i in range(len(labels))])
    acc.tick_params(axis="x", labelrotation=20)
    low = min(m - (h or 0) for m, h in stats)
    acc.set_ylim(max(0, low - 5), min(100, max(m + (h or 0) for m, h in stats) + 3))
    acc.set_ylabel(f"{split} accuracy %")
    acc.set_title(f"exact match, mean ± 95 % interval over {len(set(r['seed'] for r in results))}"
                  " seeds")
    fig.tight_layout()
    path = to / f"study_{task}.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="out/study", help="the --out of scripts/study.py")
    p.add_argument("--split", default="test", choices=("dev", "test", "tune"))
    p.add_argument("--to", default="docs", help="folder for the PNG files")
    args = p.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: matplotlib is not installed (pip install matplotlib)")
    study = Path(args.study)
    paths = sorted((study / args.split).glob("*.json"))
    if not paths:
        sys.exit(f"error: {study / args.split}: no results (run scripts/study.py first)")
    results = [r for path in paths for r in json.loads(path.read_text())]
    Path(args.to).mkdir(parents=True, exist_ok=True)
    for task in dict.fromkeys(r["task"] for r in results):
        plot_task(plt, task, [r for r in results if r["task"] == task], study, args.split,
                  Path(args.to))


if __name__ == "__main__":
    main()
