"""The built-in study: does training on self-generated tokens (BASH, RAC) beat continued SFT?

Everything runs on a CPU with nothing to download. Per task (data.builtin_task):
  1. train / dev / test splits of arithmetic chains, no prompt in two splits;
  2. one warm-up: a small model trained from scratch with SFT, in rounds, until a round no
     longer raises the dev accuracy (each round's dev evaluation at its end, in <out>/<task>/
     warmup*/log.jsonl, shows the plateau), on the training rows and the reference rows
     f(x, y) -> y of --ref-share of them, so that the model has learnt to use a reference answer,
     which RAC's labels need;
  3. from that one checkpoint, each method continues for the same number of steps, once per seed:
     continued SFT, BASH (J_SFT + J_BASH), RAC (J_SFT + J_RAC); scored by exact match of the
     final answer (greedy) on the test split, or on dev with --eval-split dev (for --tune).

    python scripts/study.py                                    # the main job: chain task, seed 0
    python scripts/study.py --tasks chain totals --seeds 0 1 2 3 4       # five seeds
    python scripts/study.py --tune --tasks chain totals        # the dev grid
    python scripts/map.py                  # the map: the same from several warm-up stages

With --init a pretrained checkpoint (scripts/fetch_smollm2.py writes SmolLM2-135M-Instruct), the
warm-up is SFT from it instead of from nothing, and the table opens with the checkpoint's own
score; --tasks gsm takes the GSM-style splits of scripts/make_gsm.py instead of arithmetic (the
README's "A real pretrained model" has the commands and sizes).

Tables go to <out>/<split>/<task>.md and .json (scripts/plot_study.py draws them). A rerun
reuses the finished warm-up rounds and runs (an interrupted one resumes or starts afresh); wall
time counts what this call ran.
"""
import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
from make_pairs import make_pairs  # noqa: E402
from data import BUILTIN_FORMS, QA_REF, QA_SYSTEM, builtin_task, load_rows  # noqa: E402
from plumbing.checks import (device_name, fraction, non_negative_float,  # noqa: E402
                             non_negative_int, out_folder, positive_float, positive_int,
                             script_main)
from plumbing.tokenizer import load_tokenizer  # noqa: E402
from model import from_pretrained  # noqa: E402

import torch  # noqa: E402

EOS = "\0"  # stands for the end-of-text token in a right continuation
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}  # two-sided 95 % quantiles of Student's t by degrees of freedom


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["chain"], choices=BUILTIN_FORMS + ("gsm",),
                   help="built-in arithmetic (chain, totals), or gsm: the GSM-style math splits "
                        "of scripts/make_gsm.py in --gsm-dir, with the paper's math template")
    p.add_argument("--template", default="arith", choices=("arith", "chat"),
                   help="built-in tasks: arith (x as it is, f(x, y) = 'ref {y}\\n{x}'), or chat "
                        "(x in a user turn of the model's chat template, f(x, y) the paper's "
                        "QA_REF in a user turn after its QA system prompt)")
    p.add_argument("--init", default="scratch",
                   help="scratch: a small model from nothing; or a pretrained checkpoint folder "
                        "(scripts/fetch_smollm2.py writes one) that the warm-up starts from")
    p.add_argument("--gsm-dir", default=str(Path(__file__).resolve().parent.parent / "assets"
                                            / "gsm"),
                   help="train/dev/test.jsonl of --tasks gsm: make_gsm.py's, or GSM8K's or MATH's "
                        "as scripts/prepare_data.py writes them (MATH scored by its \\boxed{})")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0],
                   help="one continuation of every method per seed, all from the same warm-up")
    p.add_argument("--methods", nargs="+", default=["sft", "bash", "rac"], choices=train.METHODS)
    p.add_argument("--preference", action="store_true",
                   help="also DPO after continued SFT and after RAC, on one pair file built once "
                        "from the warm-up (the reference vs its own wrong answer), and SPIN")
    p.add_argument("--preference-grid", action="store_true",
                   help="with --preference: DPO after SFT and SPIN at every --pref-lrs x "
                        "--pref-betas (on --eval-split dev to pick --dpo-lr/--dpo-beta/...)")
    p.add_argument("--pref-lrs", type=positive_float, nargs="+",
                   default=[1e-7, 5e-7, 3e-6, 1e-5, 3e-5])
    p.add_argument("--pref-betas", type=positive_float, nargs="+", default=[0.01, 0.1, 0.5])
    p.add_argument("--dpo-lr", type=positive_float, default=3e-6,
                   help="DPO's own lr (not the SFT one; picked on chain's dev split)")
    p.add_argument("--dpo-beta", type=positive_float, default=0.1, help="DPO's λ")
    p.add_argument("--spin-lr", type=positive_float, default=1e-5,
                   help="SPIN's own lr (picked on chain's dev split)")
    p.add_argument("--spin-beta", type=positive_float, default=0.1, help="SPIN's λ")
    p.add_argument("--eval-split", default="test", choices=("dev", "test"))
    p.add_argument("--tune", action="store_true",
                   help="score on dev a grid of continuation lr, BASH beta and RAC temperature")
    p.add_argument("--out", type=out_folder, default="out/study")
    p.add_argument("--debug", action="store_true",
                   help="a failure prints its traceback, not one error line")
    p.add_argument("--device", type=device_name, default="cpu",
                   help="cpu (the numbers in the README), or cuda for the full-size GSM study")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="training forwards (train.py --precision): auto = bf16 on CUDA, fp32 on "
                        "a CPU; bf16 halves SmolLM2's CPU steps")
    g = p.add_argument_group("data")
    g.add_argument("--train-size", type=positive_int, default=2000,
                   help="2,000: fewer (1,000) left the warm-up at 4 %% dev after its first round")
    g.add_argument("--dev-size", type=positive_int, default=500)
    g.add_argument("--test-size", type=positive_int, default=1000)
    g.add_argument("--terms", type=positive_int, nargs=2, default=[4, 7],
                   help="numbers per problem")
    g.add_argument("--digits", type=positive_int, default=1, help="digits per number")
    g = p.add_argument_group("batches and decoding (every run)")
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help="rows per optimizer step (the warm-up's: --warmup-batch-size)")
    g.add_argument("--micro-batch-size", type=positive_int, default=16,
                   help="rows per forward/backward, of like length (16: 1.5x faster steps than 64)")
    g.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="cap on generated answers and RAC's z (default: longest reference + 16)")
    g.add_argument("--eval-temperature", type=non_negative_float, default=0.0,
                   help="0: greedy (the built-in tasks); the paper's math: 0.1")
    g.add_argument("--eval-samples", type=positive_int, default=1,
                   help="generations per evaluation, accuracy averaged (the paper's math: 3)")
    g = p.add_argument_group("warm-up (SFT from --init)")
    g.add_argument("--ref-share", type=fraction, default=0.5,
                   help="share of the training problems whose reference row f(x, y) -> y joins "
                        "the warm-up (the built-in tasks; the main job's plateau: 93 %% dev at "
                        "0.5, 97 %% at 1, 1.1x as long)")
    g.add_argument("--warmup-batch-size", type=positive_int, default=None,
                   help="rows per warm-up step (default --batch-size x (1 + --ref-share) / 2: "
                        "--batch-size / 2 training problems a step, with their share of "
                        "reference rows, whatever the share)")
    g.add_argument("--warmup-epochs", type=positive_float, default=10.0,
                   help="the first round (10: 6 left chain at 10 %% dev, 8 reached 93 %%)")
    g.add_argument("--warmup-lr", type=positive_float, default=2e-3,
                   help="the first round's peak lr")
    g.add_argument("--round-epochs", type=positive_float, default=1.0,
                   help="each further round, at a quarter of --warmup-lr")
    g.add_argument("--plateau", type=non_negative_float, default=1.0,
                   help="stop when a round raises the dev accuracy by fewer points than this")
    g.add_argument("--max-rounds", type=positive_int, default=6)
    g = p.add_argument_group("continuation (the same for every method)")
    g.add_argument("--epochs", type=positive_float, default=1.0, help="epochs of each continuation")
    g.add_argument("--iterations", type=positive_int, default=1,
                   help="H, offline sets per continuation")
    g.add_argument("--lr", type=positive_float, default=3e-5,
                   help="peak learning rate (picked on chain's dev split, see README)")
    g.add_argument("--beta", type=fraction, default=0.1,
                   help="BASH: share of the model's tokens (picked on chain's dev split)")
    g.add_argument("--rac-temperature", type=non_negative_float, default=1.0,
                   help="RAC: temperature of the sampled z (picked on chain's dev split)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Data and the warm-up


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_splits(folder: Path, form, args) -> dict:
    """train / dev / test JSONL with no prompt in two splits, and warmup.jsonl: the training
    rows plus, for the built-in tasks, the reference rows f(x, y) -> y (f is data.py's arith
    template, 'ref {y}\\n{x}', a format no model knows; GSM's f(x, y) is the paper's chat prompt
    with the reference, which an instruct model reads as it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    if form == "gsm":
        return gsm_splits(folder, args)
    draw = lambda n, seed: builtin_task(n, seed, tuple(args.terms), args.digits, form)  # noqa: E731
    seen, splits = set(), {}
    for name, n, seed in (("train", args.train_size, 1234), ("dev", args.dev_size, 5678),
                          ("test", args.test_size, 9012)):
        fresh = [e for e in draw(3 * n, seed) if not (e.prompt in seen or seen.add(e.prompt))]
        if len(fresh) < n:
            sys.exit(f"error: --{name}-size {n}: only {len(fresh)} distinct new problems exist")
        splits[name] = [{"prompt": e.prompt, "response": e.response} for e in fresh[:n]]
    template = getattr(args, "template", "arith")
    refs = splits["train"][:round(getattr(args, "ref_share", 1.0) * args.train_size)]
    splits["warmup"] = [as_template(r, template) for r in splits["train"]] + [
        reference_row(r["prompt"], r["response"], template) for r in refs]
    for name in ("train", "dev", "test"):  # every file in the warm-up's shape: train.py mixes none
        splits[name] = [as_template(r, template) for r in splits[name]]
    paths = {}
    for name, rows in splits.items():
        paths[name] = folder / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    return {**paths, "template": template, "form": form}


def as_template(row: dict, template: str) -> dict:
    """A training row in warmup.jsonl (one shape per file): as it is, or in chat's turns (read
    as the chat task reads the prompt of a {prompt, response} row: one user turn)."""
    if template == "arith":
        return row
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["response"]}]}


def reference_row(x: str, y: str, template: str) -> dict:
    """f(x, y) -> y, with f as the template's RAC reads it: arith's 'ref {y}\n{x}', or chat's:
    the paper's QA system prompt and QA_REF (the question, then the reference) in a user turn."""
    if template == "arith":
        return {"prompt": f"ref {y}\n{x}", "response": y}
    return {"messages": [{"role": "system", "content": QA_SYSTEM},
                         {"role": "user", "content": QA_REF.format(x=x, y=y)},
                         {"role": "assistant", "content": y}]}


def gsm_splits(folder: Path, args) -> dict:
    """The first --train/--dev/--test-size problems of make_gsm.py's splits (already disjoint)."""
    paths = {}
    for name, n in (("train", args.train_size), ("dev", args.dev_size), ("test", args.test_size)):
        source = Path(args.gsm_dir) / f"{name}.jsonl"
        if not source.is_file():
            sys.exit(f"error: {source}: missing; run python scripts/make_gsm.py")
        lines = source.read_text().splitlines()
        if len(lines) < n:
            sys.exit(f"error: --{name}-size {n}: {source} has {len(lines)} problems")
        paths[name] = folder / f"{name}.jsonl"
        write_jsonl(paths[name], [json.loads(line) for line in lines[:n]])
    return {**paths, "warmup": paths["train"], "template": "math"}


def common(data: dict, eval_split: str, out: Path, args, *extra, batch=None) -> list[str]:
    cap = ["--eval-max-new-tokens", args.max_new_tokens, "--rac-max-new-tokens",
           args.max_new_tokens, "--spin-max-new-tokens", args.max_new_tokens]
    return ["--data", str(data["train"]), "--eval-data", str(data[eval_split]),
            "--task", data["template"], "--overflow", "fail",
            "--batch-size", str(batch or args.batch_size),
            "--micro-batch-size", str(args.micro_batch_size), "--device", args.device,
            "--precision", args.precision, "--eval-temperature", str(args.eval_temperature),
            "--eval-samples", str(args.eval_samples), "--out", str(out), *map(str, extra),
            *(map(str, cap) if args.max_new_tokens else [])]


def warm_up(folder: Path, data: dict, args) -> Path:
    """SFT from scratch for --warmup-epochs, then rounds of --round-epochs more at a quarter of
    the learning rate, each from the last checkpoint, until a round raises the dev accuracy by
    less than --plateau points: the plateau, in the logs of warmup, warmup-2, ... Returns the
    last round's checkpoint. Finished rounds are reused; an interrupted one resumes."""
    init, last = args.init, None
    for k in range(1, args.max_rounds + 1):
        out = folder / ("warmup" if k == 1 else f"warmup-{k}")
        epochs, lr = ((args.warmup_epochs, args.warmup_lr) if k == 1
                      else (args.round_epochs, args.warmup_lr / 4))
        accuracy = sft_round(out, init, data, epochs, lr, args)
        print(f"{folder.name}: warm-up round {k}, dev accuracy {100 * accuracy:.1f} %", flush=True)
        if last is not None and accuracy - last < args.plateau / 100:
            break
        init, last = out / "checkpoint", accuracy
    return out / "checkpoint"


def warmup_batch(data: dict, args) -> int:
    """--warmup-batch-size, or rows for --batch-size / 2 training problems a step with their share
    of reference rows (at share 1: --batch-size); GSM's warm-up, without reference rows, at
    --batch-size."""
    if args.warmup_batch_size:
        return args.warmup_batch_size
    if data.get("form") not in BUILTIN_FORMS:
        return args.batch_size
    return round(args.batch_size * (1 + args.ref_share) / 2)


def sft_round(out: Path, init, data: dict, epochs, lr, args) -> float:
    """One round of the warm-up (SFT on the training and reference rows, saved every epoch and
    evaluated on dev at its end: the plateau is a property of rounds); returns that accuracy."""
    batch = warmup_batch(data, args)
    settings = {"init": str(init), "epochs": epochs, "lr": lr, "train": args.train_size,
                "terms": args.terms, "digits": args.digits, "refs": args.ref_share,
                "batch": batch, "precision": args.precision}
    done = out / "settings.json"
    if saved_json(done) != settings:
        rows = len(data["warmup"].read_text().splitlines())
        per_epoch = train.steps_per_epoch(rows, batch)
        again = (out / "log.jsonl").exists() and not done.exists()  # interrupted: resume it
        if not again:
            shutil.rmtree(out, ignore_errors=True)
        argv = common({**data, "train": data["warmup"]}, "dev", out, args, "--init", init,
                      "--method", "sft", "--iter-epochs", epochs, "--lr", lr, "--seed", 0,
                      "--eval-every", 0, "--save-every", per_epoch,
                      *(["--resume"] if again else []), batch=batch)
        print(f"{out}: SFT, {epochs} epochs at lr {lr:g} from {init}", flush=True)
        train.run(train.get_args(argv))
        done.write_text(json.dumps(settings))
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in evals if "accuracy" in r][-1]["accuracy"]


def continue_from(init: Path, data: dict, out: Path, method, seed, settings, eval_split, args):
    """One method's continuation from the warm-up; returns train.run's result. A finished one is
    reused (out/result.json: the same command from the same checkpoint files), so a long study
    stopped part-way loses no finished run; any other is started afresh."""
    argv = common(data, eval_split, out, args, "--init", init, "--method", method, "--seed", seed,
                  "--lr", settings["lr"], "--iterations", settings["iterations"],
                  "--iter-epochs", settings["epochs"] / settings["iterations"],
                  "--beta", settings["beta"], "--rac-temperature", settings["rac_temperature"],
                  "--dpo-beta", settings.get("dpo_beta", 0.1))
    done = out / "result.json"
    key = {"argv": [str(a) for a in argv], "init": stamp(Path(init))}
    saved = saved_json(done)
    same = isinstance(saved, dict) and saved.get("key") == key
    if same and isinstance(saved.get("result"), dict):
        return saved["result"]
    shutil.rmtree(out, ignore_errors=True)  # the study's own folder
    res, _ = train.run(train.get_args(argv))
    res = {k: v for k, v in res.items() if k != "sample"}
    if method == "rac" and data.get("form") in BUILTIN_FORMS:  # the set it trained on
        saved = torch.load(out / "checkpoint" / "train_state.pt", map_location="cpu",
                           weights_only=True)
        res.update(label_precision(data["form"], load_tokenizer(init), saved["offline"]))
    write_atomic(done, json.dumps({"key": key, "result": res}))
    return res


def saved_json(done: Path):
    """What a finished run saved in `done`, or None when it is missing or unreadable: a
    half-written or hand-edited file means the run is done again, not trusted or crashed on."""
    try:
        return json.loads(done.read_text())
    except (OSError, ValueError):
        return None


def stamp(folder: Path) -> dict:
    """Each file's size and modification time: what a rewritten checkpoint changes."""
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir())}


def evaluate_checkpoint(init: Path, data: dict, split: str, args) -> dict:
    """A checkpoint the continuations start from (or the pretrained one), scored like them."""
    tok, model = load_tokenizer(init), from_pretrained(init, device=args.device)
    task = data["template"]
    rows, _ = load_rows(data[split], tok, task, model.config.block_size, "fail", False)
    res = train.evaluate(model, rows, tok, task, args.micro_batch_size, 256, args.max_new_tokens,
                         args.eval_temperature, args.eval_samples)
    return {k: v for k, v in res.items() if k != "sample"}


# ----------------------------------------------------------------------------------------------
# RAC's label precision (the built-in tasks)


def right_continuation(form: str, x: str, prefix: str) -> str | None:
    """The rest of a right reply to x after the model's own prefix (EOS at its end), or None
    where the prefix has left the reply's format so that no next token is right.

    totals: each element '+b=T' is a function of x and its index alone: the element the prefix
            is in, then the rest of the reference.
    chain:  the right next step from the model's own prefix: element k is 'a+b=c' with a the
            result the model wrote in element k-1 (x's first number for k = 0), the operator
            and b from x, c = a +- b; after '####' the answer to x (what exact match scores).
    """
    nums, ops = [int(n) for n in re.findall(r"\d+", x)], re.findall(r"[+-]", x)
    totals = [nums[0]]
    for op, b in zip(ops, nums[1:]):
        totals.append(totals[-1] + b if op == "+" else totals[-1] - b)
    body, hashes, tail = prefix.partition(" ####")
    if hashes:
        full, written = f" #### {totals[-1]}", hashes + tail
        return full[len(written):] + EOS if full.startswith(written) else None
    *done, current = body.split(",")
    k = len(done)
    if k >= len(ops):
        return None
    if form == "chain":
        found = re.fullmatch(r".*=(-?\d+)", done[-1]) if k else None
        if k and not found:
            return None
        a = int(found[1]) if k else nums[0]
        b = nums[k + 1]
        element = f"{a}{ops[k]}{b}={a + b if ops[k] == '+' else a - b}"
    else:
        element = f"{ops[k]}{nums[k + 1]}={totals[k + 1]}"
    full = element + ("," if k < len(ops) - 1 else f" #### {totals[-1]}{EOS}")
    return full[len(current):] if full.startswith(current) else None


PROBLEM = re.compile(r"\d+(?:[+-]\d+)+=")  # a built-in problem x, as in "5+4-4+8-9+1="


def label_precision(form: str, tok, offline) -> dict:
    """Of RAC's corrections (positions with z̄ != z): the share where the prefix allows a right
    next token, and of those the share where z̄ is it."""
    defined = right = corrected = 0
    for prompt, z, zbar, mask, *_ in offline:
        x = PROBLEM.findall(tok.decode(prompt))[-1]  # x itself, without a chat template's text
        for j, m in enumerate(mask):
            if not m:
                continue
            corrected += 1
            rest = right_continuation(form, x, tok.decode([t for t in z[:j] if t != tok.eos_id]))
            if not rest:
                continue
            label = EOS if zbar[j] == tok.eos_id else tok.decode([zbar[j]])
            defined += 1
            right += bool(label) and rest.startswith(label)
    return {"label_precision": right / defined if defined else None,
            "labels_defined_share": defined / corrected if corrected else None}


# ----------------------------------------------------------------------------------------------
# Runs and tables


def runs(args) -> list[tuple[str, dict]]:
    """(method, settings) pairs: the chosen settings, or with --tune the dev grid around them."""
    base = {"lr": args.lr, "epochs": args.epochs, "iterations": args.iterations,
            "beta": args.beta, "rac_temperature": args.rac_temperature}
    if not args.tune:
        return [(m, base) for m in args.methods]
    grid = [("sft", {**base, "lr": lr}) for lr in (3e-5, 1e-4, 3e-4)]
    grid += [("bash", {**base, "lr": 1e-4, "beta": b}) for b in (0.1, 0.2, 0.4)]
    return grid + [("rac", {**base, "lr": 1e-4, "rac_temperature": t}) for t in (0.5, 1.0)]


def preference_runs(folder: Path, data: dict, init: Path, seed_dir: Path, seed, settings,
                    split, args) -> list[tuple[str, dict]]:
    """The paper's table 4 and its SPIN baseline. As in the paper, one fixed pair set for every
    initialisation: built once from the warm-up (chosen = the reference, rejected = its own
    sample with a wrong final answer), then DPO from this seed's continued-SFT and RAC
    checkpoints; SPIN from the warm-up for the same number of epochs. Each at its own lr and λ
    (with --preference-grid: DPO after SFT and SPIN at every point of the grid)."""
    pairs = folder / "data" / "pairs-warmup.jsonl"
    if not pairs.exists():
        make_pairs(init, data["train"], pairs, seed=0, task=data["template"], device=args.device)
    n_pairs = len(pairs.read_text().splitlines())
    own = lambda lr, beta: {**settings, "lr": lr, "dpo_beta": beta}  # noqa: E731
    if args.preference_grid:
        grid = [(f"(lr={lr:g}, λ={b:g})", own(lr, b)) for lr in args.pref_lrs
                for b in args.pref_betas]
        runs = [(f"dpo after sft {tag}", "sft", s) for tag, s in grid]
        spins = [(f"spin {tag}", s) for tag, s in grid]
    else:
        runs = [(f"dpo after {base}", base, own(args.dpo_lr, args.dpo_beta))
                for base in ("sft", "rac")]
        spins = [("spin", own(args.spin_lr, args.spin_beta))]
    out = []
    for name, base, s in runs:
        res = continue_from(seed_dir / base / "checkpoint", {**data, "train": pairs},
                            seed_dir / name.replace(" ", "-"), "dpo", seed, s, split, args)
        out.append((name, {**res, "pairs": n_pairs, "settings": s}))
    for name, s in spins:
        res = continue_from(init, data, seed_dir / name.replace(" ", "-"), "spin", seed, s, split,
                            args)
        out.append((name, {**res, "settings": s}))
    return out


def label(method, settings, args) -> str:
    if not args.tune:
        return method
    keys = {"sft": "lr", "bash": "beta", "rac": "rac_temperature"}.get(method)
    return f"{method} ({keys}={settings[keys]})" if keys else method


def mean_ci(values):
    """Mean and the half-width of its 95 % interval (Student's t); no interval from one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return mean, T_975.get(n - 1, 1.96) * sd / n ** 0.5


def fmt(values, spec, scale=1.0, interval=True):
    if not values:
        return "-"
    mean, half = mean_ci([scale * v for v in values])
    if half is None or not interval:
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(half, spec.lstrip('+'))}"


COLUMNS = [("val loss", "val_loss", ".4f", 1), ("model-token share", "model_token_share", ".3f", 1),
           ("differs from y", "differs_from_y_share", ".4f", 1),
           ("corrected share", "corrected_share", ".3f", 1),
           ("rows without correction", "rows_without_correction", ".0f", 1),
           ("label precision", "label_precision", ".2f", 1),
           ("build s", "build_s", ".1f", 0), ("train s", "train_s", ".1f", 0)]  # 0: mean only


def table(task, results, seeds, split) -> str:
    """Markdown: mean ± 95 % interval over seeds; Δ = accuracy minus continued SFT's (at the
    learning rate of the last SFT, BASH or RAC run), seed by seed (paired: the same warm-up,
    seed, data order)."""
    head = ["method", "accuracy %", "Δ vs SFT (points)"] + [c[0] for c in COLUMNS]
    lines = [f"**{task}**, seeds {seeds}, exact match on the {split} split; mean ± 95 % interval",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ours = [r for r in results if r["method"] in ("sft", "bash", "rac") and r["label"] != "warm-up"]
    sft = {r["seed"]: r["accuracy"] for r in ours if r["method"] == "sft" and
           r["settings"]["lr"] == ours[-1]["settings"]["lr"]}
    for name in dict.fromkeys(r["label"] for r in results):
        rs = [r for r in results if r["label"] == name]
        delta = [100 * (r["accuracy"] - sft[r["seed"]]) for r in rs if r["seed"] in sft]
        cells = [name, fmt([r["accuracy"] for r in rs], ".1f", 100),
                 fmt(delta, "+.1f") if rs[0]["method"] not in ("sft", "none") else "-"]
        cells += [fmt([r[key] for r in rs if r.get(key) is not None], spec, interval=ci)
                  for _, key, spec, ci in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    after = {name: {r["seed"]: r["accuracy"] for r in results if r["label"] == name}
             for name in ("dpo after sft", "dpo after rac")}
    if all(after.values()):  # the paper's table 4: does DPO gain more on top of RAC than of SFT?
        seeds_both = sorted(after["dpo after sft"].keys() & after["dpo after rac"].keys())
        diff = [100 * (after["dpo after rac"][k] - after["dpo after sft"][k]) for k in seeds_both]
        lines += ["", f"DPO after RAC minus DPO after SFT, seed by seed: {fmt(diff, '+.1f')} "
                      "points"]
    return "\n".join(lines)


def save(root: Path, task, results, seeds, split, t0) -> str:
    """The task's table and results, rewritten after every run: an interrupted study keeps what
    it measured (one file per task: tasks may run in parallel)."""
    text = table(task, results, seeds, split)
    text += f"\n\nwall time {(time.perf_counter() - t0) / 60:.1f} min\n"
    for name, body in ((f"{task}.md", text), (f"{task}.json", json.dumps(results, indent=1))):
        write_atomic(root / name, body)
    return text


def main(argv=None):
    args = get_args(argv)
    script_main("study.py", lambda: study(args), args.debug)  # any failure: one error line


def study(args):
    split = "dev" if args.tune else args.eval_split
    root = Path(args.out) / ("tune" if args.tune else split)
    root.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        t0 = time.perf_counter()
        folder = Path(args.out) / task
        data = write_splits(folder / "data", task, args)
        results = [] if args.init == "scratch" else [
            {"task": task, "label": "pretrained", "method": "none", "seed": 0,
             **evaluate_checkpoint(Path(args.init), data, split, args)}]
        init = warm_up(folder, data, args)
        results.append({"task": task, "label": "warm-up", "method": "sft", "seed": 0,
                        **evaluate_checkpoint(init, data, split, args)})
        for seed in args.seeds:
            for method, settings in runs(args):
                name = label(method, settings, args)
                print(f"{task}: {name}, seed {seed}", flush=True)
                out = root / task / f"seed{seed}" / name.replace(" ", "").replace("=", "")
                res = continue_from(init, data, out, method, seed, settings, split, args)
                results.append({"task": task, "label": name, "method": method, "seed": seed,
                                "settings": settings, **res})
                save(root, task, results, args.seeds, split, t0)
        for seed in args.seeds if args.preference else []:  # after every seed of the methods
            base = runs(args)[0][1]
            for name, res in preference_runs(folder, data, init, root / task / f"seed{seed}",
                                             seed, base, split, args):
                results.append({"task": task, "label": name, "method": name.split()[0],
                                "seed": seed, **res})
                save(root, task, results, args.seeds, split, t0)
        print(save(root, task, results, args.seeds, split, t0))


if __name__ == "__main__":
    main()
