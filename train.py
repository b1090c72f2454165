"""Training: SFT, then BASH or RAC iterations (the paper's Algorithms 1 and 2), the baselines SCS,
NEFTune, DPO and SPIN, evaluation and checkpoints. One process, or several under torchrun.

    python train.py --init DIR --data train.jsonl --eval-data dev.jsonl --method bash --out out/bash
    torchrun --nproc_per_node=4 train.py --init DIR --data train.jsonl --method rac --out out/rac

A run is K1 steps of SFT alone, then H iterations of {build the offline set with the current
model; K2 steps on J_SFT + J_BASH (or J_SFT + J_RAC)}, under one cosine learning-rate schedule.

Reading order: `train` (the loop of Algorithms 1-2) -> `train_phase` -> `train_step`; the loss
`step_loss` (J = J_SFT + J_BASH / J_RAC); the rows it reads, `bash_rows` and `rac_rows` (Eq. 4-7).
The baselines, set-up and evaluation follow; run folders and checkpoints are in plumbing/runs.py.
The built-in study (SFT vs BASH vs RAC on a task that needs no download) is scripts/study.py.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import TASKS, DataError, collate, extract_answer, load_rows, rouge
from generate import bash_mix, generate, rac_labels
from model import GPT, IGNORE, checked_config, from_pretrained, save_pretrained
from plumbing.checks import (EXPECTED, check_finite, check_flags, check_memory, check_model,
                             check_plan, check_training_memory, device_name, error_line, fraction,
                             non_negative_float, non_negative_int, positive_float, positive_int)
from plumbing.device import allow_tf32, autocast, fitting_batch, packed_linears, to_device
from plumbing.distributed import (accumulate, all_reduce, barrier, finish, for_decoding,
                                  from_rank0, gathered_decoder, grad_norm, is_rank0,
                                  load_whole_state, merged, setup, whole_state, wrap)
from plumbing.hf_families import config_to_hf, param_count
from plumbing.runs import (Interrupted, claim_out, find_checkpoint, finite, interrupted_line,
                           load_train_state, log, release_out, run_command, run_settings,
                           save_checkpoint, tokenizer_files)
from plumbing.tokenizer import byte_tokenizer, check_vocab, gpt2_tokenizer, load_tokenizer

# ----------------------------------------------------------------------------------------------
# What a run is: a method (how it differs from SFT) and the state every step reads


@dataclass(frozen=True)
class Method:
    """How a method differs from SFT; train.py dispatches on these fields, never on its name."""
    name: str
    logged: tuple[str, ...]  # the terms each step logs
    build: Callable | None = None  # build(r, model, rows, seed): line 8's rows of a decode batch
    online: bool = False  # SCS: build runs at every step, seeded by the step
    pairs: bool = False  # DPO / SPIN: the DPO loss on PairRows instead of J_SFT + a term
    pair_data: bool = False  # DPO: the data are pairs, built (with their reference) once
    noise: bool = False  # NEFTune: embedding noise in every phase
    reads_ref: bool = False  # RAC: its rows need f(x, y), the reference prompt


@dataclass
class Run:
    """What every step of a run reads: set up once by start(), never changed after."""
    args: argparse.Namespace
    method: Method
    rank: int
    world: int
    tok: object
    task: str
    rows: list
    eval_rows: list
    raw: torch.nn.Module  # the GPT itself (sharded in place by --fsdp)
    model: torch.nn.Module  # what training calls: raw, or DDP / compile over it
    opt: torch.optim.Optimizer
    out: Path
    k1: int  # steps of SFT alone (Algorithm lines 2-6)
    k2: int  # steps in each of the H iterations (lines 7-18)
    rac_max_new_tokens: int
    spin_max_new_tokens: int
    settings: dict  # what --resume compares (plumbing/runs.py)
    carried: dict  # --init's tokenizer files, {name: bytes}, copied into every checkpoint
    lock: int | None = None  # rank 0 holds the lock on out (plumbing/runs.py)
    made: Path | None = None  # the folder claim_out created, removed again if left empty

    @property
    def total(self):
        return self.k1 + self.args.iterations * self.k2


# ----------------------------------------------------------------------------------------------
# The run: Algorithm 1 (BASH) and Algorithm 2 (RAC)


def train(r: Run):
    """Train one method from a started run; returns (the final evaluation and statistics, the
    model)."""
    state = {"step": 0, "iteration": -1, "offline": None, "stats": {}}
    if r.args.resume:
        state = resume(r) or state
    report = {"build_s": 0.0, "train_s": 0.0, "eval": {}}
    # closed however the loop ends, so an error line is printed after the bar's last state
    with tqdm(total=r.total, initial=state["step"], desc=r.args.method,
              disable=r.rank != 0) as bar:
        # Algorithms 1 and 2, lines 2-6: K1 steps of SFT alone
        going = train_phase(r, state, -1, range(state["step"], r.k1), bar, report)
        # Lines 7-18: H iterations of {the offline set with the current weights; K2 steps}
        for it in range(r.args.iterations):
            if not going:
                break
            steps = range(max(state["step"], r.k1 + it * r.k2), r.k1 + (it + 1) * r.k2)
            if steps and state["iteration"] != it:  # line 8 (not again when resuming inside it)
                build_iteration_set(r, state, it, report)
            going = train_phase(r, state, it, steps, bar, report)
    if not report["eval"] and state["step"] == r.total:  # resumed a finished run: just evaluate
        report["eval"] = evaluate_run(r, state, "final")
    times = {k: report[k] for k in ("build_s", "train_s")}
    return {**report["eval"], **times, **state["stats"], "steps": state["step"],
            "params": r.raw.num_params()}, r.raw


def run(args):
    """Set up a run, train it, release its folder; returns train's result."""
    r = start(args)
    try:
        return train(r)
    except Interrupted as e:  # SIGINT / SIGTERM: say where the run stopped, and what is kept
        e.line = interrupted_line(r.out, e.signum) if r.rank == 0 else ""
        raise
    finally:
        if r.rank == 0:
            release_out(r.out, r.lock, r.made)


def train_phase(r: Run, state: dict, iteration: int, steps: range, bar, report: dict) -> bool:
    """The steps of one phase (iteration -1: the K1 steps of SFT alone), then evaluate and save
    at its end. Returns False if --stop-after ended the run inside it."""
    a, m = r.args, r.method
    if iteration < 0 and not m.noise:  # lines 2-6 are SFT's (NEFTune's noise is in every phase)
        m = METHODS["sft"]
    offline = state["offline"] if iteration >= 0 else None
    first = 0 if iteration < 0 else r.k1 + iteration * r.k2
    order = seed_for(a.seed, "order", iteration)  # each phase shuffles the rows anew
    for step in steps:
        t0 = time.perf_counter()
        idx = batch_indices(step - first, len(r.rows), a.batch_size, order)
        terms, tokens, lr = train_step(r, step, idx, offline, m)
        state["step"] = done = step + 1
        dt = time.perf_counter() - t0
        report["train_s"] += dt
        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
        if r.rank == 0:
            log(r.out, {"step": done, "phase": m.name, **terms, "lr": lr, "tok_per_s": tokens / dt})
        end = done == steps.stop
        if end or (a.eval_every and done % a.eval_every == 0):
            report["eval"] = evaluate_run(r, state, f"{m.name}@{done}")
        if end or (a.save_every and done % a.save_every == 0) or done == a.stop_after:
            checkpoint(r, state)
        if done == a.stop_after:
            return False
    return True


def train_step(r: Run, step: int, idx: list[int], offline, m: Method):
    """One optimizer step over the global batch idx: J_SFT + the method's term (or DPO's loss),
    accumulated over micro-batches and ranks exactly as one batch. Returns ({name: term}, tokens
    read, lr)."""
    mine = idx[r.rank::r.world]
    if m.online:  # SCS, Eq. 3: the offline rows rebuilt with the current weights at every step
        model = gathered_decoder(r.raw, r.args.fsdp, r.args.precision)
        offline = dict(zip(mine, m.build(r, model, [r.rows[i] for i in mine], step)))
    lr = lr_at(step, r.total, r.args)
    for group in r.opt.param_groups:
        group["lr"] = lr
    parts = (pair_parts if m.pairs else sft_parts)(r, idx, mine, offline, m)
    sums = torch.zeros(len(m.logged) + 1, device=r.raw.device)  # the logged terms, tokens read
    for j, part in enumerate(parts):  # forward and backward, micro-batch by micro-batch
        logged, tokens = accumulate(r.model, part, r.world, r.args.fsdp, j == len(parts) - 1)
        sums += torch.cat([logged, logged.new_full((1,), tokens)])
    all_reduce(sums, r.world)
    params = list(r.raw.parameters())
    norm, whole = grad_norm(params)
    # the step's one host sync: its logged terms, tokens read and gradient norm, read together
    *values, tokens, total = torch.cat([sums, whole.reshape(1).to(sums.dtype)]).tolist()
    terms = dict(zip(m.logged, values))
    check_finite(step, terms, total)  # never step on NaN or inf
    if r.args.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, r.args.grad_clip, norm)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    return terms, int(tokens), lr


# ----------------------------------------------------------------------------------------------
# The loss: J = J_SFT + J_BASH (or J_RAC), both over the SFT tokens of the whole global batch


class TrainRow(NamedTuple):
    """One row of a loss term: the model reads prompt ++ inputs[:-1], and the position that has
    read prompt ++ inputs[:j] is scored on targets[j] where mask[j] is 1.

    SFT (Eq. 1):  inputs y, targets y, mask all ones.
    BASH (Eq. 5): inputs ŷ, targets y, mask all ones; took[j]: ŷ^j is the model's token.
    RAC (Eq. 7):  inputs z, targets z̄, mask (z̄^j != z^j).
    """
    prompt: list[int]
    inputs: list[int]
    targets: list[int]
    mask: list[int]
    took: list[bool] | None = None


def loss_rows(rows, idx, offline):
    """The two terms' rows for these dataset rows: J_SFT's, and the method's own (none for SFT).
    Footnote 3: a BASH row (x, y, ŷ) carries its SFT row (x, y) too. A RAC row with nothing
    corrected adds nothing to J_RAC and is left out."""
    own = [offline[i] for i in idx if any(offline[i].mask)] if offline is not None else []
    return [sft_row(rows[i]) for i in idx], own


def by_length(rows: list[TrainRow]) -> list[TrainRow]:
    """Rows of like length side by side, so that a micro-batch pads little. The terms are sums
    over the global batch, so the order of its rows changes nothing but the padding."""
    return sorted(rows, key=lambda t: len(t.prompt) + len(t.inputs))


def by_prompt_length(rows) -> list[int]:
    """The rows' indices, shortest prompt first: decode batches of like length pad little, and a
    batch of short problems, whose answers are short too, stops early."""
    return sorted(range(len(rows)), key=lambda i: len(rows[i].prompt))


def sft_tokens(rows, idx):
    """The loss's denominator: the SFT target tokens of the whole global batch idx. Every rank
    knows it from the lengths, without communication."""
    return sum(len(rows[i].response) for i in idx)


def step_loss(model, sft, own, denom, noise_alpha, device, precision="auto"):
    """One forward over a micro-batch of SFT rows and the method's own rows. Returns the two terms
    [J_SFT part, J_BASH / J_RAC part] and the number of tokens the forward read.

    Algorithm 2 lines 15-16 and Eq. 7 divide both terms by the batch size and sum tokens within
    a row, so one BASH or RAC token weighs as much as one SFT token. The token-weighted form:
    each term is a sum over the tokens it scores, both divided by the same number `denom`, the
    SFT target tokens of the whole global batch."""
    items = sft + own
    x, y, mask = collate([r.prompt for r in items], [r.inputs for r in items],
                         [r.targets for r in items], pad_id=0, masks=[r.mask for r in items],
                         device=device)
    # the scored positions' flat indices, known on the host from the rows: no sync finds them
    at = to_device([i * x.shape[1] + len(r.prompt) - 1 + j for i, r in enumerate(items)
                    for j, v in enumerate(r.mask) if v], device)
    with autocast(device, precision):  # -log p at the scored positions only, row by row
        nll = model(x, targets=y.masked_fill(mask == 0, IGNORE), noise_alpha=noise_alpha, at=at)
    weight = mask.flatten()[at]
    k = sum(map(bool, (v for r in sft for v in r.mask)))  # the SFT rows come first
    j_sft = (nll[:k] * weight[:k]).sum() / denom  # Eq. 1
    j_method = (nll[k:] * weight[k:]).sum() / denom  # Eq. 5 (BASH) / Eq. 7 (RAC): zero if none
    return torch.stack([j_sft, j_method]), sum(len(r.prompt) + len(r.inputs) - 1 for r in items)


def sft_parts(r: Run, idx, mine, offline, m: Method) -> list[Callable]:
    """This rank's rows `mine` of the global batch idx as micro-batches of J = J_SFT + the
    method's term; each part() returns (J, the logged terms, tokens read). Every term is a part of
    a global-batch sum, so micro-batches and ranks add up to one batch."""
    a, mb = r.args, r.args.micro_batch_size
    sft, own = map(by_length, loss_rows(r.rows, mine, offline))
    denom, noise = sft_tokens(r.rows, idx), a.neftune_alpha if m.noise else 0.0

    def part(sft, own):
        (j_sft, j_method), tokens = step_loss(r.model, sft, own, denom, noise, r.raw.device,
                                              a.precision)
        loss = j_sft + j_method  # J = J_SFT + J_BASH (Algorithm 1) or J_SFT + J_RAC (Eq. 7)
        terms = [loss, j_sft, j_method][:len(m.logged)]  # SFT and NEFTune log no second term
        return loss, torch.stack(terms).detach(), tokens
    n = max(math.ceil(len(sft) / mb), math.ceil(len(own) / mb))
    return [functools.partial(part, sft[j * mb:(j + 1) * mb], own[j * mb:(j + 1) * mb])
            for j in range(n)]


# ----------------------------------------------------------------------------------------------
# The offline set (Algorithms 1-2, line 8): the rows each loss term is computed on


def sft_row(row) -> TrainRow:
    return TrainRow(row.prompt, row.response, row.response, [1] * len(row.response))


def bash_rows(model, rows, beta, temperature, seed) -> list[TrainRow]:
    """Eq. 4-5: mix each response with the model's own samples, keep y as the targets."""
    mixed, took = bash_mix(model, [r.prompt for r in rows], [r.response for r in rows],
                           beta=beta, temperature=temperature, seed=seed)
    return [TrainRow(r.prompt, m, r.response, [1] * len(m), t)
            for r, m, t in zip(rows, mixed, took)]


def rac_rows(model, rows, max_new_tokens, temperature, seed, eos_id) -> list[TrainRow]:
    """Eq. 6-7: sample z, label it with the reference-conditioned argmax z̄; score where they
    differ."""
    z, zbar, corrected = rac_labels(model, [r.prompt for r in rows], [r.ref_prompt for r in rows],
                                    max_new_tokens, temperature=temperature, seed=seed,
                                    eos_id=eos_id)
    return [TrainRow(r.prompt, zi, zb, c) for r, zi, zb, c in zip(rows, z, zbar, corrected)]


def build_offline(model, rows, build, batch_size, seed, rank, world, precision="auto") -> list:
    """Algorithms 1-2, line 8: the offline set with the current weights, one row per row.
    build(model, rows, seed) makes one decode batch, of rows of like prompt length
    (by_prompt_length). Whole batches are dealt to the ranks round-robin and each is seeded by
    its own number, so the set does not depend on the ranks.
    Decoding runs in the training's precision (bf16: the KV cache in bf16 too)."""
    model.eval()
    order = by_prompt_length(rows)
    starts = list(range(0, len(rows), batch_size))
    out = {}
    # pack the weights once for every batch
    with autocast(model.device, precision), packed_linears(model, batch_size):
        for k in tqdm(starts[rank::world], desc="build", disable=rank != 0, leave=False):
            batch = order[k:k + batch_size]
            made = build(model, [rows[i] for i in batch], seed_for(seed, "batch", k // batch_size))
            out.update(zip(batch, made))
    out = merged(out, world)  # every rank's batches
    model.train()
    return [out[i] for i in range(len(rows))]


def offline_stats(offline: list) -> dict:
    """What the offline set holds. BASH: the share of positions that took the model's token, and
    of those that differ from y. RAC: the share of sampled positions corrected (z̄ != z)."""
    n = sum(len(o.inputs) for o in offline)
    if offline[0].took is not None:
        took = sum(sum(o.took) for o in offline)
        differs = sum(t and a != b for o in offline for a, b, t in zip(o.inputs, o.targets, o.took))
        return {"model_token_share": took / n, "differs_from_y_share": differs / n}
    corrected = sum(sum(o.mask) for o in offline)
    return {"corrected_share": corrected / max(n, 1), "mean_z_len": n / len(offline),
            "rows_without_correction": sum(not any(o.mask) for o in offline)}


def build_iteration_set(r: Run, state: dict, iteration: int, report: dict):
    """Algorithms 1-2, line 8: the method's offline set with the current weights (BASH's mixed
    responses, RAC's labels, SPIN's pairs). Methods without one (SFT, NEFTune, SCS, which mixes
    online) keep none; DPO's pairs are built once, so its reference stays the initial model."""
    m, t0 = r.method, time.perf_counter()
    if m.pair_data and state["offline"] is not None:  # DPO: the reference stays the initial model
        state.update(iteration=iteration)
        return
    if m.build is None or m.online:
        state.update(iteration=iteration, offline=None, stats={})
        return
    new = max(max(len(x.response) for x in r.rows), r.rac_max_new_tokens, r.spin_max_new_tokens)
    model = gathered_decoder(r.raw, r.args.fsdp, r.args.precision)  # --fsdp: a whole copy
    batch = fitting_batch(r.raw, r.rows, r.args.build_batch_size, new, r.args.precision,
                          r.args.build_memory_gb)  # in the memory the copy leaves
    offline = build_offline(model, r.rows, functools.partial(m.build, r), batch,
                            seed_for(r.args.seed, "offline", iteration), r.rank, r.world,
                            r.args.precision)
    stats = (pair_stats if m.pairs else offline_stats)(offline)
    state.update(iteration=iteration, offline=offline, stats=stats)
    report["build_s"] += time.perf_counter() - t0
    if r.rank == 0:
        log(r.out, {"step": state["step"], "iteration": iteration + 1,
                    "build_s": round(time.perf_counter() - t0, 3), **state["stats"]})


def build_bash(r: Run, model, rows, seed):
    return bash_rows(model, rows, r.args.beta, r.args.mix_temperature, seed)


def build_rac(r: Run, model, rows, seed):
    return rac_rows(model, rows, r.rac_max_new_tokens, r.args.rac_temperature, seed, r.tok.eos_id)


# ----------------------------------------------------------------------------------------------
# Baselines: SCS and NEFTune (in the table below), DPO and SPIN on pairs with the DPO loss


def build_scs(r: Run, model, rows, step):
    """SCS (Eq. 3-4): BASH's mixing of this step's rows with the current weights, without
    dropout, seeded by the step."""
    model.eval()
    with autocast(model.device, r.args.precision):
        made = bash_rows(model, rows, r.args.beta, r.args.mix_temperature,
                         seed_for(r.args.seed, "scs", step))
    r.model.train()
    return made


class PairRow(NamedTuple):
    """One DPO pair: prompt x, chosen and rejected response ids (each ending where its sample or
    reference ended), and the reference model's sequence log-probs of both, computed when the
    set was built, so no second model is resident while training."""
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float  # log π_ref(chosen | x)
    ref_rejected: float  # log π_ref(rejected | x)


@torch.no_grad()
def pair_rows(model, rows, rejected, micro_batch, precision="auto") -> list[PairRow]:
    """Pairs (x, y, rejected) with the current weights as the reference, micro_batch pairs per
    forward (the training step's memory), in the training's precision so that θ = ref at the
    start."""
    out = []
    for k in range(0, len(rows), micro_batch):
        chunk, rej = rows[k:k + micro_batch], rejected[k:k + micro_batch]
        logp, _ = sequence_logps(model, [r.prompt for r in chunk] * 2,
                                 [r.response for r in chunk] + rej, model.device, precision)
        n = len(chunk)
        out += [PairRow(r.prompt, r.response, z, ref_y, ref_z) for r, z, ref_y, ref_z
                in zip(chunk, rej, logp[:n].tolist(), logp[n:].tolist())]
    return out


def spin_rows(model, rows, max_new_tokens, temperature, seed, eos_id, micro_batch,
              precision="auto"):
    """SPIN (Chen et al. 2024): the current model answers every prompt, z ~ p_θ(·|x), and the
    pair is (chosen y, rejected z) with the current model as the reference."""
    z = generate(model, [r.prompt for r in rows], max_new_tokens, temperature=temperature,
                 eos_id=eos_id, seed=seed)
    return pair_rows(model, rows, z, micro_batch, precision)


def build_dpo(r: Run, model, rows, seed):
    return pair_rows(model, rows, [x.rejected for x in rows], r.args.micro_batch_size,
                     r.args.precision)


def build_spin(r: Run, model, rows, seed):
    return spin_rows(model, rows, r.spin_max_new_tokens, r.args.spin_temperature, seed,
                     r.tok.eos_id, r.args.micro_batch_size, r.args.precision)


def pair_stats(offline: list[PairRow]) -> dict:
    """DPO / SPIN sets: the rejected responses' mean length, the pairs whose two responses are
    equal (no gradient: SPIN's model already samples y), the reference's mean log-prob margin."""
    n = len(offline)
    return {"mean_rejected_len": sum(len(o.rejected) for o in offline) / n,
            "identical_pairs": sum(o.chosen == o.rejected for o in offline),
            "ref_logp_margin": sum(o.ref_chosen - o.ref_rejected for o in offline) / n}


def sequence_logps(model, prompts, responses, device, precision="auto"):
    """log p(response | prompt) of each row: its response tokens' log-probs summed, from one
    teacher-forced forward (collate's mask leaves out the prompt and the padding). Returns the
    (n,) log-probs and the number of tokens read."""
    x, y, mask = collate(prompts, responses, responses, pad_id=0, device=device)
    # each response position's flat index and row, known on the host
    at, rows = to_device([[i * x.shape[1] + len(p) - 1 + j, i] for i, (p, r)
                          in enumerate(zip(prompts, responses)) for j in range(len(r))], device).T
    with autocast(device, precision):  # the response positions, row by row
        nll = model(x, targets=y.masked_fill(mask == 0, IGNORE), at=at)
    tokens = sum(len(p) + len(r) - 1 for p, r in zip(prompts, responses))
    return -nll.new_zeros(len(prompts)).index_add(0, rows, nll), tokens


def dpo_loss(policy, ref, beta):
    """DPO (Rafailov et al. 2023; SPIN, Chen et al. 2024): per pair, with sequence log-probs
    policy = log π_θ(y±|x), ref = log π_ref(y±|x), both (n, 2) as (chosen, rejected):
        -log σ(λ[(log π_θ(y+|x) - log π_ref(y+|x)) - (log π_θ(y-|x) - log π_ref(y-|x))]).
    Returns the (n,) losses and the rewards λ(log π_θ - log π_ref), (n, 2)."""
    rewards = beta * (policy - ref)
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards


def pair_loss(model, pairs, n_pairs, beta, device, precision="auto"):
    """DPO over a micro-batch of PairRows, chosen and rejected in one forward. The loss is a mean
    over the pairs of the global batch: summed here and divided by n_pairs, its pair count.
    Returns (the loss, [loss, reward accuracy, reward margin] as parts of their global-batch
    means, the tokens read)."""
    n = len(pairs)
    logp, tokens = sequence_logps(model, [p.prompt for p in pairs] * 2,
                                  [p.chosen for p in pairs] + [p.rejected for p in pairs], device,
                                  precision)
    ref = to_device([[p.ref_chosen, p.ref_rejected] for p in pairs], device, logp.dtype)
    losses, rewards = dpo_loss(torch.stack([logp[:n], logp[n:]], dim=1), ref, beta)
    margin = (rewards[:, 0] - rewards[:, 1]).detach()
    loss = losses.sum() / n_pairs
    logged = torch.stack([loss.detach(), (margin > 0).sum() / n_pairs, margin.sum() / n_pairs])
    return loss, logged, tokens


def pair_parts(r: Run, idx, mine, offline, m: Method) -> list[Callable]:
    """As sft_parts, for the DPO loss over this rank's pairs of the global batch idx."""
    pairs, mb = [offline[i] for i in mine], r.args.micro_batch_size
    return [functools.partial(pair_loss, r.model, pairs[j:j + mb], len(idx), r.args.dpo_beta,
                              r.raw.device, r.args.precision) for j in range(0, len(pairs), mb)]


SFT_TERMS, PAIR_TERMS = ("loss", "j_sft"), ("loss", "reward_accuracy", "reward_margin")
METHODS = {m.name: m for m in (
    Method("sft", SFT_TERMS),
    Method("bash", SFT_TERMS + ("j_bash",), build_bash),
    Method("rac", SFT_TERMS + ("j_rac",), build_rac, reads_ref=True),
    Method("scs", SFT_TERMS + ("j_scs",), build_scs, online=True),
    Method("neftune", SFT_TERMS, noise=True),
    Method("dpo", PAIR_TERMS, build_dpo, pairs=True, pair_data=True),
    Method("spin", PAIR_TERMS, build_spin, pairs=True))}


# ----------------------------------------------------------------------------------------------
# Set-up: processes, tokenizer, model, data, optimizer, the step plan


def start(args) -> Run:
    """Set up a run: processes, tokenizer, model, data, optimizer, the step plan, the folder."""
    rank, world, device = setup(args.device)
    allow_tf32(device)  # CUDA's fp32 matmuls (the validation loss, --precision fp32) in TF32
    method = METHODS[args.method]
    torch.manual_seed(seed_for(args.seed, "torch"))  # dropout and NEFTune noise
    tok = make_tokenizer(args)
    carried = tokenizer_files(None if args.init == "scratch" else args.init)
    raw = make_model(args, tok, device)
    raw.checkpointing = args.activation_checkpointing  # same gradients, less memory (README)
    raw.compile_decode = args.compile_decode  # offline sets and evaluation: plumbing/decode_step
    max_len = args.max_len or raw.config.block_size
    check_vocab(tok, raw.config.vocab_size, args.init)
    check_model(args, raw, max_len)
    digest = hashlib.sha256()  # of the bytes the rows were read from
    rows, task = load_rows(args.data, tok, args.task, max_len, args.overflow,
                           need_ref=method.reads_ref, pairs=method.pair_data, digest=digest)
    eval_rows = load_rows(args.eval_data, tok, task, max_len, args.overflow,
                          False)[0] if args.eval_data else []
    if eval_rows and eval_rows[0].shape != rows[0].shape:  # one template for both
        raise DataError(f"--eval-data {args.eval_data}: {{{eval_rows[0].shape}, ...}} rows, but "
                        f"--data holds {{{rows[0].shape}, ...}} rows (give them one shape)")
    cap = new_token_cap(rows, max_len)  # RAC's and SPIN's default cap on z
    per_epoch = steps_per_epoch(len(rows), args.batch_size)
    check_plan(args, len(rows), world, per_epoch)
    model = wrap(raw, device, world, args.fsdp, args.precision, args.compile)
    check_training_memory(args, raw, world)  # after sharding: --fsdp's ranks hold 1/world each
    out = Path(args.out)
    opt = make_optimizer(raw, args)
    settings = run_settings(args, tok, config_to_hf(raw.config), digest.hexdigest(), carried, world)
    lock, made, failed = None, None, None
    if rank == 0:  # only rank 0 writes; the others hear whether it could claim the folder
        try:
            lock, made = claim_out(out, args, settings)
        except EXPECTED as e:
            failed = error_line(e).removeprefix("error: ")
    failed = from_rank0(failed, world)
    if failed:
        raise ValueError(failed)
    return Run(args=args, method=method, rank=rank, world=world, tok=tok, task=task, rows=rows,
               eval_rows=eval_rows, raw=raw, model=model, opt=opt, out=out,
               k1=round(args.sft_epochs * per_epoch), k2=round(args.iter_epochs * per_epoch),
               rac_max_new_tokens=args.rac_max_new_tokens or cap,
               spin_max_new_tokens=args.spin_max_new_tokens or cap, settings=settings,
               carried=carried, lock=lock, made=made)


def seed_for(seed: int, purpose: str, *coords: int) -> int:
    """Every random stream of a run comes from here: (run seed, purpose, coordinates such as the
    iteration and the batch) -> a seed. Streams never collide, and any one can be recomputed on
    resume or on another rank."""
    digest = hashlib.sha256(repr((seed, purpose, *coords)).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def make_tokenizer(args):
    if args.init != "scratch":
        return load_tokenizer(args.init)
    return byte_tokenizer() if args.tokenizer == "bytes" else gpt2_tokenizer()


def make_model(args, tok, device):
    if args.init != "scratch":
        return from_pretrained(args.init, device=device)
    # the tokenizer's own ids, so that other tools (transformers' generate) stop where we do
    ids = {"bos_token_id": tok.bos_id if tok.bos_id is not None else tok.eos_id,
           "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
    fields = dict(arch=args.arch, vocab_size=tok.vocab_size, block_size=args.block_size,
                  n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                  tie_embeddings=True, dropout=args.dropout, token_ids=ids)
    cfg = checked_config(fields, "--init scratch", {k: "--" + k.replace("_", "-") for k in fields})
    n = param_count(cfg)  # fp32 weights (what training adds: check_training_memory)
    check_memory(4 * n, f"--init scratch: a model of {n:,} parameters (--n-layer {cfg.n_layer}, "
                 f"--n-embd {cfg.n_embd}, vocabulary {cfg.vocab_size}) to build", device,
                 "choose smaller sizes")
    torch.manual_seed(seed_for(args.seed, "init"))
    return GPT(cfg).to(device)


def new_token_cap(rows, context: int) -> int:
    """The default cap on generated responses: the longest reference + 16, within the context."""
    return min(max(len(r.response) for r in rows) + 16, context - max(len(r.prompt) for r in rows))


def make_optimizer(model, args):
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
    epoch, b = divmod(step, steps_per_epoch(n_rows, batch_size))
    gen = torch.Generator().manual_seed(seed_for(seed, "epoch", epoch))
    order = torch.randperm(n_rows, generator=gen)
    return order[b * batch_size:(b + 1) * batch_size].tolist()


# ----------------------------------------------------------------------------------------------
# Evaluation and checkpoints


@torch.no_grad()
def evaluate(model, rows, tok, task, micro_batch, gen_batch, max_new_tokens=None, temperature=0.0,
             samples=1, seed=0, precision="auto"):
    """Validation loss (SFT, token-weighted, fp32); exact match of final answers (strict: after
    '####'; accuracy_lenient also takes a reply's last number) and ROUGE for summaries, averaged
    over `samples` generations (the paper's math: 3 at temperature 0.1), with accuracy_sd over
    them; answers decoded in `precision`."""
    model.eval()
    total, count, every = 0.0, 0, by_length([sft_row(r) for r in rows])
    for k in range(0, len(rows), micro_batch):
        sft = every[k:k + micro_batch]
        terms, _ = step_loss(model, sft, [], 1.0, 0.0, model.device, "fp32")
        total += terms[0].item()
        count += sum(len(r.targets) for r in sft)
    out = {"val_loss": total / max(count, 1)}
    if any(r.answer is not None for r in rows) or task == "summarize":
        for_decoding(model)  # --fsdp's gathered copy, scored in fp32: bf16 from here on CUDA
        runs = [generate_answers(model, rows, tok, gen_batch, max_new_tokens, temperature,
                                 seed_for(seed, "eval", s), precision) for s in range(samples)]
        out.update(score_answers(runs, rows, task), sample=runs[0][0])
    model.train()
    return out


def score_answers(runs: list[list[str]], rows, task) -> dict:
    """Exact match (GSM8K's '####', MATH's \\boxed{}: data.extract_answer) and, for summaries,
    ROUGE of `runs`, one list of answers in row order per sample, averaged over the samples."""
    out, n, samples = {}, sum(r.answer is not None for r in rows), len(runs)
    for name, strict in (("accuracy", True), ("accuracy_lenient", False)) if n else ():
        acc = [sum(extract_answer(t, strict, r.boxed) == r.answer for t, r in zip(texts, rows)
                   if r.answer is not None) / n for texts in runs]
        out[name] = sum(acc) / samples
        if strict and samples > 1:
            out["accuracy_sd"] = statistics.stdev(acc)
    if task == "summarize":
        scores = [rouge(t, r.reference) for texts in runs for t, r in zip(texts, rows)]
        out.update({k: sum(s[k] for s in scores) / len(scores)
                    for k in ("rouge1", "rouge2", "rougeL")})
    return out


def generate_answers(model, rows, tok, batch_size, max_new_tokens=None, temperature=0.0, seed=0,
                     precision="auto"):
    """Answers to every row's prompt, as text: greedy, or sampled at `temperature` (batch k seeded
    by seed_for(seed, "answers", k)); decoded in `precision` with the weights packed once, in
    batches of like prompt length (by_prompt_length)."""
    block = model.config.block_size
    max_new = (min(max_new_tokens, block - max(len(r.prompt) for r in rows)) if max_new_tokens
               else new_token_cap(rows, block))
    order = by_prompt_length(rows)
    texts = [""] * len(rows)
    with autocast(model.device, precision), packed_linears(model, batch_size):
        for k in range(0, len(rows), batch_size):
            chunk = order[k:k + batch_size]
            gen = generate(model, [rows[i].prompt for i in chunk], max_new, temperature,
                           eos_id=tok.eos_id, seed=seed_for(seed, "answers", k // batch_size))
            for i, g in zip(chunk, gen):
                texts[i] = tok.decode([t for t in g if t != tok.eos_id])
    return texts


def evaluate_run(r: Run, state: dict, tag: str) -> dict:
    """Evaluate on rank 0 and log it; every rank returns rank 0's result."""
    res = {}
    # --fsdp: every rank takes part in the gather; the copy keeps fp32 for the validation loss
    model = (gathered_decoder(r.raw, r.args.fsdp, r.args.precision, scores=True)
             if r.eval_rows else None)
    if r.eval_rows and r.rank == 0:
        a = r.args
        new = a.eval_max_new_tokens or new_token_cap(r.eval_rows, r.raw.config.block_size)
        batch = fitting_batch(r.raw, r.eval_rows, a.build_batch_size, new, a.precision,
                              a.build_memory_gb)
        res = evaluate(model, r.eval_rows, r.tok, r.task, a.micro_batch_size, batch,
                       a.eval_max_new_tokens, a.eval_temperature, a.eval_samples, a.seed,
                       a.precision)
        log(r.out, {"step": state["step"], "phase": tag, **res})
    return from_rank0(res, r.world)


def checkpoint(r: Run, state: dict):
    """Save the model, the optimizer and the run's state on rank 0 (plumbing/runs.py).
    --fsdp: the weights and the optimizer state gathered whole onto rank 0's CPU first, so the
    checkpoint is the same Hugging Face layout, and --resume shards it again."""
    weights, opt_state = whole_state(r.raw, r.opt, r.args.fsdp)  # --fsdp: every rank gathers
    if r.rank == 0:
        if not all(torch.isfinite(t).all() for t in weights.values()):  # never save NaN
            raise ValueError(f"step {state['step']}: the weights are not finite; the last "
                             "checkpoint is kept (lower --lr)")
        saved = {**state, "offline": state["offline"] and [tuple(o) for o in state["offline"]]}
        extra = {"tiktoken": r.tok.name} if r.tok.name in ("bytes", "r50k_base") else {}
        save_checkpoint(lambda folder: save_pretrained(r.raw, folder, extra, weights), r.opt,
                        saved, r.out, r.carried, {"settings": r.settings}, opt_state)
    barrier(r.world)


def resume(r: Run) -> dict | None:
    """Load the weights, the optimizer and every random state saved in the run's checkpoint;
    return the saved training state, or None for a run killed before its first checkpoint
    (claim_out has checked the folder holds a run)."""
    try:
        ckpt = find_checkpoint(r.out)
    except FileNotFoundError:
        return None
    try:
        weights = from_pretrained(ckpt, device=r.raw.device).state_dict()
        load_optimizer = load_whole_state(r.raw, r.opt, weights, r.args.fsdp)
    except RuntimeError:  # sizes differ: --resume-with-new-settings cannot change the model
        raise ValueError(f"{ckpt}: its weights do not fit this run's model (resume with the "
                         "model flags it was saved with)") from None
    plan = {"steps": r.total, "iterations": r.args.iterations, "rows": len(r.rows),
            "vocab": r.raw.config.vocab_size}
    return load_train_state(ckpt, r.opt, PairRow if r.method.pairs else TrainRow,
                            plan, load_optimizer)


# ----------------------------------------------------------------------------------------------
# Command line (every flag range-checked when parsed; long explanations are in the README)


def get_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass  # show defaults, keep the docstring's example commands on their own lines

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--init", default="scratch",
                   help="'scratch', or a checkpoint directory (config.json + model.safetensors)")
    g.add_argument("--data", required=True,
                   help="training JSONL: {prompt,response}, {messages} or {question,answer}; "
                        "for dpo pairs {prompt|messages,chosen,rejected}")
    g.add_argument("--eval-data", default=None, help="evaluation JSONL (same shapes)")
    g.add_argument("--task", default="auto", choices=("auto",) + TASKS,
                   help="prompt templates; auto: chat for messages, math for question, else plain")
    g.add_argument("--out", default=None, help="output directory (default out/<method>)")
    g.add_argument("--max-len", type=positive_int, default=None,
                   help="longest row in tokens (default: the model's block size)")
    g.add_argument("--overflow", default="truncate", choices=("truncate", "fail"),
                   help="a row longer than --max-len: cut its response, or stop with an error")
    g.add_argument("--tokenizer", default="bytes", choices=("bytes", "r50k_base"),
                   help="tokenizer for --init scratch")
    g.add_argument("--arch", default="llama", choices=("gpt2", "llama"),
                   help="family for --init scratch")
    g.add_argument("--n-layer", type=positive_int, default=4, help="--init scratch: layers")
    g.add_argument("--n-head", type=positive_int, default=4, help="--init scratch: attention heads")
    g.add_argument("--n-embd", type=positive_int, default=128, help="--init scratch: width")
    g.add_argument("--block-size", type=positive_int, default=256, help="--init scratch: context")
    g.add_argument("--dropout", type=fraction, default=0.0, help="--init scratch: dropout")

    g = p.add_argument_group("method (Algorithms 1 and 2)")
    g.add_argument("--method", default="sft", choices=tuple(METHODS),
                   help="sft, bash, rac; baselines scs, neftune, dpo, spin (README)")
    g.add_argument("--sft-epochs", type=non_negative_float, default=0.0,
                   help="K1: epochs of SFT alone before the first iteration (0 for dpo)")
    g.add_argument("--iterations", type=positive_int, default=1,
                   help="H: iterations of {build offline set; train}")
    g.add_argument("--iter-epochs", type=positive_float, default=1.0,
                   help="K2: epochs of training in each iteration")
    g.add_argument("--beta", type=fraction, default=0.2,
                   help="BASH/SCS: probability of keeping the model's token (Eq. 4)")
    g.add_argument("--mix-temperature", type=non_negative_float, default=1.0,
                   help="BASH/SCS: temperature of the sampled z^j")
    g.add_argument("--rac-temperature", type=non_negative_float, default=1.0,
                   help="RAC: temperature of the sampled responses z")
    g.add_argument("--rac-max-new-tokens", type=positive_int, default=None,
                   help="RAC: cap on z (default: longest reference + 16)")
    g.add_argument("--neftune-alpha", type=non_negative_float, default=5.0,
                   help="NEFTune noise scale alpha")
    g.add_argument("--dpo-beta", type=positive_float, default=0.1,
                   help="DPO/SPIN: lambda, the scale of the log-ratio rewards")
    g.add_argument("--spin-temperature", type=non_negative_float, default=1.0,
                   help="SPIN: temperature of the sampled rejected responses z")
    g.add_argument("--spin-max-new-tokens", type=positive_int, default=None,
                   help="SPIN: cap on z (default: longest reference + 16)")
    g.add_argument("--build-batch-size", type=positive_int, default=256,
                   help="rows per decode batch when building offline sets")
    g.add_argument("--build-memory-gb", type=positive_float, default=None,
                   help="most memory a decode batch (KV cache, prefill, logits) may take, fewer "
                        "rows where over it (default: 80%% of CUDA's free memory, 1 on a CPU)")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help="global batch in rows per optimizer step (paper: 512)")
    g.add_argument("--micro-batch-size", type=positive_int, default=None,
                   help="rows per forward/backward on each process (default: the batch, at "
                        "most 64)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate; default 2e-3 for --init scratch, 1e-5 pretrained")
    g.add_argument("--min-lr", type=non_negative_float, default=None,
                   help="end of the cosine schedule (default lr / 10)")
    g.add_argument("--warmup", type=fraction, default=0.1,
                   help="fraction of the steps with linear warm-up")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.1,
                   help="AdamW decay on matrices (not biases, norms)")
    g.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                   help="clip the global gradient norm (0: off)")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each block for training (the loss and decoding stay eager)")
    g.add_argument("--compile-decode", action="store_true", help="torch.compile decoding's step")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state (FSDP2)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="keep each block's input only and recompute the block in backward")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="training forwards: auto = bf16 on CUDA, fp32 on a CPU")
    g.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="evaluate every N steps (0: at the end of each phase)")
    g.add_argument("--eval-max-new-tokens", type=positive_int, default=None,
                   help="default: longest reference + 16")
    g.add_argument("--eval-temperature", type=non_negative_float, default=0.0,
                   help="0: greedy; the paper's math evaluation samples at 0.1")
    g.add_argument("--eval-samples", type=positive_int, default=1,
                   help="generations per evaluation (paper: 3), accuracy averaged over them")
    g.add_argument("--save-every", type=non_negative_int, default=0,
                   help="checkpoint every N steps (0: at the end of each phase)")
    g.add_argument("--resume", action="store_true",
                   help="continue exactly from <out>/checkpoint, under its saved settings")
    g.add_argument("--resume-with-new-settings", action="store_true",
                   help="--resume even where this command's settings differ from the saved ones")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (removed once the new run first writes)")
    g.add_argument("--stop-after", type=non_negative_int, default=0,
                   help="save and stop after N optimizer steps (resume later)")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 2e-3 if args.init == "scratch" else 1e-5
    args.out = args.out or f"out/{args.method}"
    args.micro_batch_size = args.micro_batch_size or min(args.batch_size, 64)
    check_flags(p, args, METHODS[args.method].pair_data)
    return args


def main(argv=None):
    args = get_args(argv)

    def body():
        res, _ = run(args)
        if is_rank0():
            print(json.dumps(finite({k: v for k, v in res.items() if k != "sample"}), indent=1))
    run_command(body, finish)  # a failure or SIGINT / SIGTERM: one error line, and its exit code


if __name__ == "__main__":
    main()
