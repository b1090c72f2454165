"""Training: SFT, then BASH or RAC iterations (the paper's Algorithms 1 and 2), the baselines SCS
and NEFTune, evaluation and checkpoints. One process, or several under torchrun.

    python train.py                       # the built-in comparison: SFT vs BASH vs RAC, from scratch, CPU
    python train.py --init DIR --data train.jsonl --eval-data dev.jsonl --method bash --out out/bash
    torchrun --nproc_per_node=4 train.py --init DIR --data train.jsonl --method rac --out out/rac

A run is K1 steps of SFT alone, then H iterations of {build the offline set with the current
model; train on J_SFT + J_BASH (or J_SFT + J_RAC)}, under one cosine learning-rate schedule.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import (TASKS, DataError, Row, builtin_task, byte_tokenizer, collate, encode_rows, extract_answer,
                  gpt2_tokenizer, load_tokenizer, read_jsonl, rouge)
from generate import autocast, bash_mix, generate, packed_linears, rac_labels
from model import GPT, GPTConfig, from_pretrained, masked_nll, save_pretrained

METHODS = ("sft", "bash", "rac", "scs", "neftune")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def get_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass  # show defaults, keep the docstring's example commands on their own lines

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=Formatter,
        epilog="With no --data, runs the built-in comparison (see README). To run one method on your own data: "
               "python train.py --init CHECKPOINT_DIR --data train.jsonl --eval-data dev.jsonl --method bash --out out/mine")
    g = p.add_argument_group("model and data")
    g.add_argument("--init", default="scratch", help="'scratch', or a checkpoint directory (config.json + model.safetensors)")
    g.add_argument("--data", default=None, help="training JSONL: {prompt,response}, {messages} or {question,answer} "
                                               "per line; none runs the built-in comparison")
    g.add_argument("--eval-data", default=None, help="evaluation JSONL (same shapes); validation loss, exact match "
                                                    "of final answers, ROUGE for --task summarize")
    g.add_argument("--task", default="auto", choices=("auto",) + TASKS,
                   help="prompt templates: auto = chat for {messages}, math for {question,answer}, plain otherwise")
    g.add_argument("--out", default=None, help="output directory (default out/compare or out/<method>)")
    g.add_argument("--max-len", type=int, default=None, help="longest row in tokens (default: the model's block size)")
    g.add_argument("--overflow", default="truncate", choices=("truncate", "fail"),
                   help="a row longer than --max-len: cut its response (counted and reported), or stop with an error")
    g.add_argument("--tokenizer", default="bytes", choices=("bytes", "r50k_base"), help="tokenizer for --init scratch")
    g.add_argument("--arch", default="llama", choices=("gpt2", "llama"), help="family for --init scratch")
    g.add_argument("--n-layer", type=int, default=4, help="--init scratch: layers")
    g.add_argument("--n-head", type=int, default=4, help="--init scratch: attention heads")
    g.add_argument("--n-embd", type=int, default=128, help="--init scratch: width")
    g.add_argument("--block-size", type=int, default=256, help="--init scratch: longest sequence")
    g.add_argument("--dropout", type=float, default=0.0, help="--init scratch: dropout")

    g = p.add_argument_group("method (Algorithms 1 and 2)")
    g.add_argument("--method", default="sft", choices=METHODS,
                   help="sft; bash / rac: J_SFT + J_BASH / J_RAC on an offline set rebuilt every iteration; "
                        "scs: online scheduled sampling, the mixing redone at every step; neftune: SFT with embedding noise")
    g.add_argument("--sft-epochs", type=float, default=0.0, help="K1: epochs of SFT alone before the first iteration")
    g.add_argument("--iterations", type=int, default=1, help="H: iterations of {build offline set; train}")
    g.add_argument("--iter-epochs", type=float, default=1.0, help="K2: epochs of training in each iteration")
    g.add_argument("--beta", type=float, default=0.2, help="BASH/SCS: probability of keeping the model's token (Eq. 4)")
    g.add_argument("--mix-temperature", type=float, default=1.0, help="BASH/SCS: temperature of the sampled z^j")
    g.add_argument("--rac-temperature", type=float, default=1.0, help="RAC: temperature of the sampled responses z")
    g.add_argument("--rac-max-new-tokens", type=int, default=None, help="RAC: cap on z (default: longest reference + 16)")
    g.add_argument("--neftune-alpha", type=float, default=5.0, help="NEFTune noise scale alpha")
    g.add_argument("--build-batch-size", type=int, default=256, help="rows per decode batch when building offline sets")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=64, help="global batch in rows per optimizer step (paper: 512)")
    g.add_argument("--micro-batch-size", type=int, default=64, help="rows per forward/backward on each process")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate; default 2e-3 for --init scratch, 1e-5 for a pretrained checkpoint "
                        "(paper: 3e-6 for Pythia-1B, 5e-6 for Mistral-7B)")
    g.add_argument("--min-lr", type=float, default=None, help="end of the cosine schedule (default lr / 10)")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with linear warm-up")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (not biases, norms)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end of each phase)")
    g.add_argument("--eval-max-new-tokens", type=int, default=None, help="default: longest reference + 16")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end of each phase)")
    g.add_argument("--resume", action="store_true", help="continue exactly from <out>/checkpoint")
    g.add_argument("--stop-after", type=int, default=0, help="save and stop after N optimizer steps (resume later)")

    g = p.add_argument_group("built-in comparison (no --data)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full comparison per seed")
    g.add_argument("--compare-methods", nargs="+", default=["sft", "bash", "rac"], choices=METHODS)
    g.add_argument("--betas", type=float, nargs="+", default=None, help="also run BASH at each of these betas")
    g.add_argument("--train-size", type=int, default=3000, help="built-in task: training examples")
    g.add_argument("--eval-size", type=int, default=500, help="built-in task: held-out examples")
    g.add_argument("--warmup-epochs", type=float, default=4.0, help="built-in: SFT warm-up shared by every method")
    g.add_argument("--compare-epochs", type=float, default=1.0,
                   help="built-in: epochs each method trains after the warm-up (the same for every method)")
    g.add_argument("--compare-iterations", type=int, default=1,
                   help="built-in: H, the offline set is rebuilt this many times within --compare-epochs")
    g.add_argument("--continue-lr", type=float, default=1e-4,
                   help="built-in: peak learning rate of each method's continuation from the warm-up")
    g.add_argument("--terms", type=int, nargs=2, default=[4, 7], help="built-in task: numbers per problem (min max)")
    g.add_argument("--digits", type=int, default=1, help="built-in task: digits per number")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 2e-3 if args.init == "scratch" else 1e-5
    return args


# ----------------------------------------------------------------------------------------------
# Set-up


def setup_distributed(device):
    """(rank, world size, device): torchrun sets RANK; gloo on CPU, NCCL on GPUs."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    cuda = torch.device(device).type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def make_model(args, tok, device):
    if args.init == "scratch":
        cfg = GPTConfig(arch=args.arch, vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                        n_head=args.n_head, n_embd=args.n_embd, tie_embeddings=True, dropout=args.dropout)
        torch.manual_seed(args.seed)
        return GPT(cfg).to(device)
    return from_pretrained(args.init, device=device)


def load_rows(path, tok, task, max_len, overflow, need_ref):
    examples = read_jsonl(path)
    if task == "auto":
        shapes = {e.shape for e in examples}
        task = "chat" if "messages" in shapes else "math" if "question" in shapes else "plain"
    try:
        return encode_rows(examples, tok, task, max_len, overflow, need_ref=need_ref), task
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def make_optimizer(model, args, device):
    """AdamW; weight decay on matrices only, not on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)


def lr_at(step, total, args):
    """Linear warm-up, then cosine decay to min_lr."""
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    warm = int(args.warmup * total)
    if step < warm:
        return args.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * progress))


def steps_per_epoch(n_rows, batch_size):
    return max(1, n_rows // batch_size)


def batch_indices(step, n_rows, batch_size, seed):
    """The rows of global batch `step`: a fresh seeded shuffle each epoch, so any step can be
    recomputed on resume and every rank agrees without communication. A partial last batch is
    dropped, so every batch splits evenly over the ranks."""
    per_epoch = steps_per_epoch(n_rows, batch_size)
    epoch, b = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[b * batch_size:(b + 1) * batch_size].tolist()


# ----------------------------------------------------------------------------------------------
# Offline sets: built between iterations with the current weights, sharded across ranks


def build_batch(model, rows, ids, method, args, seed, out):
    """One decode batch of the offline set, stored in out[row index]."""
    if method == "bash":
        mixed, took = bash_mix(model, [rows[i].prompt for i in ids], [rows[i].response for i in ids],
                               beta=args.beta, temperature=args.mix_temperature, seed=seed)
        out.update({i: (m, t) for i, m, t in zip(ids, mixed, took)})
    else:
        z, zbar, mask = rac_labels(model, [rows[i].prompt for i in ids], [rows[i].ref_prompt for i in ids],
                                   args.rac_max_new_tokens, temperature=args.rac_temperature, seed=seed,
                                   eos_id=args.eos_id)
        out.update({i: (a, b, m) for i, a, b, m in zip(ids, z, zbar, mask)})


def build_offline(model, rows, method, args, seed, rank, world):
    """BASH: ŷ for every row; RAC: (z, z̄, z̄ != z). The ranks share the batches and gather the result."""
    model.eval()
    bs = args.build_batch_size
    batches = list(range(0, len(rows), bs))[rank::world]  # whole batches dealt round-robin, each seeded by
    out = {}                                            # its own number: the set does not depend on the ranks
    with packed_linears(model, bs):  # pack the weights once for every batch, not once per decode call
        for k in tqdm(batches, desc=f"build {method}", disable=rank != 0, leave=False):
            build_batch(model, rows, list(range(k, min(k + bs, len(rows)))), method, args, seed * 1000003 + k // bs, out)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = {k: v for part in parts for k, v in part.items()}
    model.train()
    return [out[i] for i in range(len(rows))]


def offline_stats(rows, offline, method):
    if method == "bash":  # share of positions that took the model's token, and where that token differs from y
        n = sum(len(r.response) for r in rows)
        took = sum(sum(t) for _, t in offline)
        differs = sum(t and m != y for r, (mixed, tk) in zip(rows, offline) for m, y, t in zip(mixed, r.response, tk))
        return {"model_token_share": took / n, "differs_from_y_share": differs / n}
    n = sum(len(z) for z, _, _ in offline)  # RAC: share of positions where z̄ != z, rows with none
    corrected = sum(sum(m) for _, _, m in offline)
    return {"corrected_share": corrected / max(n, 1), "rows_without_correction": sum(not any(m) for _, _, m in offline),
            "mean_z_len": n / max(len(offline), 1)}


# ----------------------------------------------------------------------------------------------
# Loss: J_SFT plus the method's term, each weighted by its tokens over the whole global batch


def loss_rows(rows, idx, method, offline):
    """The two terms' rows for these dataset rows: [(prompt, inputs, targets, mask)] for J_SFT and
    for the method's own term. Footnote 3: a BASH row (x, y, ŷ) carries its SFT row (x, y) too."""
    sft = [(rows[i].prompt, rows[i].response, rows[i].response, None) for i in idx]  # Eq. 1
    if method in ("bash", "scs"):  # Eq. 5: input x ++ ŷ[:-1], targets y
        return sft, [(rows[i].prompt, offline[i][0], rows[i].response, None) for i in idx]
    if method == "rac":  # Eq. 7: input x ++ z[:-1], targets z̄, only where z̄ != z (rows with none add nothing)
        return sft, [(rows[i].prompt, offline[i][0], offline[i][1], offline[i][2]) for i in idx if any(offline[i][2])]
    return sft, []


def term_counts(rows, idx, method, offline):
    """Tokens each term scores over the whole global batch: every rank knows them from lengths and masks."""
    n_sft = sum(len(rows[i].response) for i in idx)
    n_aux = n_sft if method in ("bash", "scs") else sum(sum(offline[i][2]) for i in idx) if method == "rac" else 0
    return n_sft, n_aux


def step_loss(model, sft, aux, counts, noise_alpha, device):
    """One forward over a micro-batch of SFT rows and method rows; returns [J_SFT part, J_aux part],
    each a sum over its tokens divided by the term's token count in the whole global batch."""
    items = sft + aux
    x, y, mask = collate([it[0] for it in items], [it[1] for it in items], [it[2] for it in items], pad_id=0,
                         masks=[it[3] if it[3] is not None else [1] * len(it[2]) for it in items])
    x, y, mask = x.to(device), y.to(device), mask.to(device)
    with autocast(device):
        logits = model(x, noise_alpha=noise_alpha)
    n = len(sft)
    terms = [masked_nll(logits[:n], y[:n], mask[:n], denom=max(counts[0], 1))]
    terms.append(masked_nll(logits[n:], y[n:], mask[n:], denom=max(counts[1], 1)) if aux else logits.new_zeros(()))
    return torch.stack(terms), int(mask.sum())


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, rows, tok, args, task, device):
    """Validation loss (SFT, token-weighted), exact match of final answers, ROUGE for summaries."""
    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(rows), args.micro_batch_size):
        chunk = rows[k:k + args.micro_batch_size]
        x, y, m = collate([r.prompt for r in chunk], [r.response for r in chunk], [r.response for r in chunk], 0)
        logits = model(x.to(device))
        total += masked_nll(logits, y.to(device), m.to(device), denom=1.0).item()
        count += int(m.sum())
    out = {"val_loss": total / max(count, 1)}
    if any(r.answer is not None for r in rows) or task == "summarize":
        room = model.config.block_size - max(len(r.prompt) for r in rows)
        max_new = min(args.eval_max_new_tokens or max(len(r.response) for r in rows) + 16, room)
        texts = []
        with packed_linears(model, args.build_batch_size):
            for k in range(0, len(rows), args.build_batch_size):
                chunk = rows[k:k + args.build_batch_size]
                gen = generate(model, [r.prompt for r in chunk], max_new, eos_id=tok.eos_id)
                texts += [tok.decode([t for t in g if t != tok.eos_id]) for g in gen]
        scored = [(t, r) for t, r in zip(texts, rows) if r.answer is not None]
        if scored:
            out["accuracy"] = sum(extract_answer(t) == r.answer for t, r in scored) / len(scored)
        if task == "summarize":
            scores = [rouge(t, r.reference) for t, r in zip(texts, rows)]
            out.update({k: sum(s[k] for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")})
        out["sample"] = texts[0]
    model.train()
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints: model in the Hugging Face layout + training state, replaced atomically


def save_checkpoint(model, opt, state, out: Path, extra_config, tokenizer_dir):
    """Write out/checkpoint.tmp completely, then swap it in: at every moment a whole checkpoint
    exists at out/checkpoint or out/checkpoint.old."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, extra_config)
    for name in TOKENIZER_FILES:  # keep the checkpoint self-contained for generate.py and transformers
        if tokenizer_dir and (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, tmp / name)
    torch.save({**state, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "py_rng": random.getstate()}, tmp / "train_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path):
    for d in (out / "checkpoint", out / "checkpoint.old"):
        if (d / "train_state.pt").exists():
            return d
    raise FileNotFoundError(f"--resume: no checkpoint in {out} (looked for checkpoint/ and checkpoint.old/)")


def log(out: Path, record: dict):
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# One run: K1 SFT steps, then H iterations


def run(args, rows=None, eval_rows=None, tok=None, task=None):
    """Train one method; returns the final evaluation. rows/eval_rows/tok/task come from the caller
    for the built-in comparison, else from --data/--eval-data."""
    rank, world, device = setup_distributed(args.device) if not dist.is_initialized() else (
        dist.get_rank(), dist.get_world_size(), torch.device(args.device))
    out = Path(args.out or f"out/{args.method}")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if tok is None:
        tok = byte_tokenizer() if args.init == "scratch" and args.tokenizer == "bytes" else (
            gpt2_tokenizer() if args.init == "scratch" else load_tokenizer(args.init))
    model = make_model(args, tok, device)
    max_len = args.max_len or model.config.block_size
    if rows is None:
        need_ref = args.method == "rac"  # only RAC reads the reference prompts f(x, y)
        rows, task = load_rows(args.data, tok, args.task, max_len, args.overflow, need_ref)
        eval_rows = load_rows(args.eval_data, tok, task, max_len, args.overflow, False)[0] if args.eval_data else []
    args.eos_id = tok.eos_id
    longest = max(len(r.response) for r in rows)
    args.rac_max_new_tokens = args.rac_max_new_tokens or min(longest + 16, max_len - max(len(r.prompt) for r in rows))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    G = args.batch_size
    assert G % world == 0, f"--batch-size {G} must be a multiple of the number of processes {world}"
    per_epoch = steps_per_epoch(len(rows), G)
    k1 = round(args.sft_epochs * per_epoch)
    k2 = round(args.iter_epochs * per_epoch)
    if args.method in ("sft", "neftune"):  # no offline set: the iterations are plain SFT steps
        k1, k2 = k1 + args.iterations * k2, 0
    total = k1 + args.iterations * k2
    noise = args.neftune_alpha if args.method == "neftune" else 0.0

    raw = model
    opt = make_optimizer(raw, args, device)
    state = {"step": 0, "offline": None, "iteration": -1, "stats": {}}
    if args.resume:
        ckpt = find_checkpoint(out)
        raw.load_state_dict(from_pretrained(ckpt, device=device).state_dict())
        saved = torch.load(ckpt / "train_state.pt", weights_only=True)
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        random.setstate(saved["py_rng"])
        state = {k: saved[k] for k in state}
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    extra = {"tiktoken": tok.name} if tok.name in ("bytes", "r50k_base") else {}
    tok_dir = None if args.init == "scratch" else args.init

    def checkpoint():
        if rank == 0:
            save_checkpoint(raw, opt, state, out, extra, tok_dir)
        if world > 1:
            dist.barrier()

    def do_eval(tag):
        res = evaluate(raw, eval_rows, tok, args, task, device) if eval_rows and rank == 0 else {}
        if rank == 0 and res:
            log(out, {"step": state["step"], "phase": tag, **res})
        if world > 1:  # every rank returns rank 0's result, and so takes the same decisions after it
            box = [res]
            dist.broadcast_object_list(box, src=0)
            res = box[0]
        return res

    times = {"build_s": 0.0, "train_s": 0.0}
    bar = tqdm(total=total, initial=state["step"], desc=f"{args.method}", disable=rank != 0)
    result = {}
    while state["step"] < total:
        step = state["step"]
        it = (step - k1) // k2 if step >= k1 and k2 else -1
        if it >= 0 and state["iteration"] != it:  # Algorithm 1/2 line 7: rebuild the offline set
            t0 = time.perf_counter()
            if args.method in ("bash", "rac"):
                state["offline"] = build_offline(raw, rows, args.method, args, args.seed + 7919 * (it + 1), rank, world)
                state["stats"] = offline_stats(rows, state["offline"], args.method)
            state["iteration"] = it
            times["build_s"] += time.perf_counter() - t0
            if rank == 0:
                log(out, {"step": step, "iteration": it + 1, "build_s": round(time.perf_counter() - t0, 3), **state["stats"]})
        t0 = time.perf_counter()
        idx = batch_indices(step if it < 0 else step - k1 - it * k2, len(rows), G, args.seed + max(it, -1) + 1)
        mine = idx[rank::world]
        method = args.method if it >= 0 or args.method == "neftune" else "sft"
        offline = state["offline"]
        if method == "scs":  # online: mix with the current weights at every step (what BASH avoids)
            raw.eval()  # sample as BASH does, without dropout
            mixed, _ = bash_mix(raw, [rows[i].prompt for i in mine], [rows[i].response for i in mine], args.beta,
                                args.mix_temperature, seed=args.seed * 1000003 + step)
            offline = dict(zip(mine, [(m,) for m in mixed]))
            model.train()
        sft, aux = loss_rows(rows, mine, method, offline)
        counts = term_counts(rows, idx, method, offline)
        lr = lr_at(step, total, args)
        for group in opt.param_groups:
            group["lr"] = lr
        mb = args.micro_batch_size
        n_micro = max(math.ceil(len(sft) / mb), math.ceil(len(aux) / mb))
        terms_sum, tokens = torch.zeros(2, device=device), 0
        for j in range(n_micro):
            with model.no_sync() if world > 1 and j < n_micro - 1 else nullcontext():
                terms, n = step_loss(model, sft[j * mb:(j + 1) * mb], aux[j * mb:(j + 1) * mb], counts, noise, device)
                # DDP averages gradients over ranks; our loss is already a global-batch sum, so undo the average
                (terms.sum() * world).backward()
            terms_sum += terms.detach()
            tokens += n
        if world > 1:
            dist.all_reduce(terms_sum)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        dt = time.perf_counter() - t0
        times["train_s"] += dt
        loss = terms_sum.sum().item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens * world / dt:.0f}")
        if rank == 0:
            log(out, {"step": state["step"], "phase": method, "loss": loss, "sft_loss": terms_sum[0].item(),
                      "aux_loss": terms_sum[1].item(), "lr": lr, "tok_per_s": tokens * world / dt})
        end_of_phase = state["step"] == total or state["step"] == k1 or (
            state["step"] > k1 and k2 and (state["step"] - k1) % k2 == 0)
        if (args.eval_every and state["step"] % args.eval_every == 0) or end_of_phase:
            result = do_eval(f"{method}@{state['step']}")
        if (args.save_every and state["step"] % args.save_every == 0) or end_of_phase or state["step"] == args.stop_after:
            checkpoint()
        if state["step"] == args.stop_after:
            break
    bar.close()
    if not result and state["step"] == total:  # resumed from a finished run: nothing left but to evaluate
        result = do_eval("final")
    return {**result, **times, **state["stats"], "steps": state["step"], "params": raw.num_params()}, raw


# ----------------------------------------------------------------------------------------------
# The built-in comparison: one warm-up, then SFT continued, BASH and RAC from the same checkpoint


def compare(args):
    """Warm up one model with SFT on the built-in task, then continue it with each method for the
    same number of steps; evaluate exact match on held-out problems; print and save the table."""
    tok = byte_tokenizer()
    root = Path(args.out or "out/compare")
    train_ex = builtin_task(args.train_size, seed=1234, terms=tuple(args.terms), digits=args.digits)
    seen = {e.prompt for e in train_ex}
    eval_ex = [e for e in builtin_task(args.eval_size * 2, seed=5678, terms=tuple(args.terms), digits=args.digits) if e.prompt not in seen][:args.eval_size]
    rows = encode_rows(train_ex, tok, "arith", args.block_size, "fail")
    eval_rows = encode_rows(eval_ex, tok, "arith", args.block_size, "fail")
    # A model trained from scratch has never learnt to use a reference answer, which RAC's labels
    # need: the warm-up that every method starts from also trains on f(x, y) -> y.
    ref_rows = [Row(r.ref_prompt, r.response, r.ref_prompt, r.answer, r.reference) for r in rows]
    runs = [(m, args.beta) for m in args.compare_methods]
    runs += [("bash", b) for b in (args.betas or []) if ("bash", b) not in runs]
    results = {}
    for seed in args.seeds:
        base = argparse.Namespace(**{**vars(args), "seed": seed, "init": "scratch"})
        warm = argparse.Namespace(**{**vars(base), "method": "sft", "sft_epochs": args.warmup_epochs,
                                     "iterations": 0, "out": str(root / f"seed{seed}" / "warmup")})
        print(f"seed {seed}: SFT warm-up, {args.warmup_epochs} epochs over {2 * len(rows)} rows", flush=True)
        res, _ = run(warm, rows + ref_rows, eval_rows, tok, "arith")
        results.setdefault(("warm-up (SFT)", None), []).append(res)
        for method, beta in runs:
            cont = argparse.Namespace(**{**vars(base), "method": method, "beta": beta, "sft_epochs": 0.0,
                                         "lr": args.continue_lr, "iterations": args.compare_iterations,
                                         "iter_epochs": args.compare_epochs / args.compare_iterations,
                                         "init": str(Path(warm.out) / "checkpoint"),
                                         "out": str(root / f"seed{seed}" / f"{method}-beta{beta}" if method == "bash" and args.betas else root / f"seed{seed}" / method)})
            print(f"seed {seed}: {method}" + (f" beta={beta}" if method in ("bash", "scs") else ""), flush=True)
            res, _ = run(cont, rows, eval_rows, tok, "arith")
            results.setdefault((method, beta if method in ("bash", "scs") else None), []).append(res)
    table = results_table(results, args.seeds, args.eval_size)
    print(table)
    write_atomic(root / "results.md", table + "\n")
    write_atomic(root / "results.json", json.dumps(
        [{"method": m, "beta": b, "runs": [{k: v for k, v in r.items() if k != "sample"} for r in rs]}
         for (m, b), rs in results.items()], indent=1))


def results_table(results, seeds, eval_size):
    """Markdown table, mean ± std over seeds; Δ is each seed's accuracy minus SFT's from the same warm-up."""
    def stat(vals, fmt):
        if not vals:
            return "-"
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
        return fmt.format(mean) + (f" ± {fmt.replace('+', '').format(std)}" if len(vals) > 1 else "")

    sft = [r["accuracy"] for r in results.get(("sft", None), [])]
    lines = [f"seeds {seeds}: mean ± std. accuracy = exact match of the final answer, greedy, {eval_size} held-out "
             "problems; Δ = accuracy minus continued SFT's, seed by seed",
             "", "| method | accuracy % | Δ vs SFT | val loss | build offline s | train s | model-token share | "
             "differs from y | corrected share |", "|---|---|---|---|---|---|---|---|---|"]
    for (method, beta), rs in results.items():
        col = lambda key, scale=1.0: [scale * r[key] for r in rs if key in r]  # noqa: E731
        delta = [100 * (r["accuracy"] - s) for r, s in zip(rs, sft)] if method not in ("sft", "warm-up (SFT)") else []
        lines.append(f"| {method}{f' (β={beta})' if beta is not None else ''} | {stat(col('accuracy', 100), '{:.1f}')} | "
                     f"{stat(delta, '{:+.1f}')} | {stat(col('val_loss'), '{:.4f}')} | {stat(col('build_s'), '{:.1f}')} | "
                     f"{stat(col('train_s'), '{:.1f}')} | {stat(col('model_token_share'), '{:.3f}')} | "
                     f"{stat(col('differs_from_y_share'), '{:.4f}')} | {stat(col('corrected_share'), '{:.3f}')} |")
    return "\n".join(lines)


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None):
    args = get_args(argv)
    try:
        if args.data is None:
            compare(args)
        else:
            res, _ = run(args)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(json.dumps({k: v for k, v in res.items() if k != "sample"}, indent=1))
    except (DataError, ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
