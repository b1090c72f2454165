"""Training-side costs, all measured in one run on the same weights (GPT-2 124M shape, random init):

  1. training step tokens/s (forward + backward + AdamW), ours vs transformers' GPT2LMHeadModel
  2. greedy generation tokens/s, ours vs transformers (as scripts/bench_generate.py)
  3. BASH offline mixing time per row / SFT training time per row        (paper table 8: ~0.9 s / 4.4 s)
  4. SCS step / (BASH mixing + BASH training step), one global batch     (paper: ~20.8 s / (0.9 + 4.4) s)
  5. RAC building time per row / SFT training time per row
  6. peak memory of each phase
and a table of the ratios against their targets.

    python scripts/bench_train.py                                  # fp32, CPU, 2 threads (takes minutes)
    python scripts/bench_train.py --layers 1 --threads 1 --batch 2 --seq 32 --repeats 1 --rows 2 \\
        --prompt-len 16 --response-len 16 --gen-batch 2 --gen-prompt-len 16 --gen-new-tokens 16   # smoke test
    python scripts/bench_train.py --device cuda --compile          # bf16 autocast, torch.compile, MFU
"""
import argparse
import contextlib
import ctypes
import gc
import math
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the plain loss
from bench_generate import hf_runner, ours_runner, timed  # noqa: E402
from data import Row  # noqa: E402
from generate import rac_labels  # noqa: E402
from model import from_pretrained  # noqa: E402
from plumbing.device import autocast  # noqa: E402
from reference import masked_nll  # noqa: E402
from train import bash_rows, loss_rows, make_optimizer, sft_tokens, step_loss  # noqa: E402

EOS = 50256
PAPER = {"bash_mix_s": 0.9, "bash_train_s": 4.4, "scs_s": 20.8,
         "mem_gb": {"SCS step": 35, "BASH mix": 17, "BASH train": 28}}


# ----------------------------------------------------------------------------------------------
# Peak memory of a phase. CUDA: the allocator's peak. CPU: the process's resident high-water mark
# (VmHWM), reset before each phase by writing 5 to /proc/self/clear_refs where the kernel allows it;
# it is process-wide (it counts every live tensor, Python, libraries), so we also report the rise
# above the resident size at the phase's start.


def _proc_kb(field):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Memory:
    def __init__(self, device):
        self.device = device
        self.records = {}  # phase -> (peak MB, rise above start MB, note)
        self.can_reset = self.device.type == "cuda" or self._reset_hwm()
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    @staticmethod
    def _reset_hwm():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @contextlib.contextmanager
    def phase(self, name):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        else:
            if self.libc is not None:
                self.libc.malloc_trim(0)  # hand freed heap pages back, so the start RSS is honest
            if self.can_reset:
                self._reset_hwm()
            start = (_proc_kb("VmRSS") or 0) * 1024
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak, note = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
        else:
            peak = (_proc_kb("VmHWM") or 0) * 1024
            note = "VmHWM since phase start" if self.can_reset else "VmHWM since process start (reset not allowed)"
        self.records[name] = (peak / 2**20, (peak - start) / 2**20, note)
        print(f"    memory [{name}]: peak {peak / 2**20:,.0f} MB ({note}), +{(peak - start) / 2**20:,.0f} MB "
              f"above the phase's start")


# ----------------------------------------------------------------------------------------------
# Training steps


def opt_args(args):
    return SimpleNamespace(lr=args.lr, weight_decay=args.weight_decay)


def lm_step(model, opt, x, y, mask, device, grad_clip, hf, precision):
    """One plain language-model step: forward, masked_nll over every position, backward, AdamW."""
    with autocast(device, precision):
        logits = model(input_ids=x, use_cache=False).logits if hf else model(x)
    loss = masked_nll(logits, y, mask)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def method_step(model, raw, opt, rows, idx, offline, micro_batch, device, grad_clip, precision):
    """train.py's inner loop for one global batch (one process): J_SFT (+ the method's term over
    its offline rows), micro-batched, both terms over the batch's SFT tokens, clip, AdamW."""
    sft, aux = loss_rows(rows, idx, offline)
    denom = sft_tokens(rows, idx)
    n_micro = max(math.ceil(len(sft) / micro_batch), math.ceil(len(aux) / micro_batch))
    for j in range(n_micro):
        terms, _ = step_loss(model, sft[j * micro_batch:(j + 1) * micro_batch],
                             aux[j * micro_batch:(j + 1) * micro_batch], denom, 0.0, device,
                             precision)
        terms.sum().backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fmt_ok(ok):
    return "—" if ok is None else ("yes" if ok else "NO")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("machine and model")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--layers", type=int, default=12, help="GPT-2 124M has 12; fewer for a quick look")
    g.add_argument("--repeats", type=int, default=3, help="timed runs of each after one warm-up; the best is reported")
    g.add_argument("--compile", action="store_true", help="torch.compile our model for its training steps")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="every training step's forward, as train.py --precision (auto: bf16 on CUDA)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="accelerator peak for MFU (default 989 = H100 bf16 dense on CUDA; on CPU MFU is shown only "
                        "when this is given)")
    g = p.add_argument_group("1. training step")
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--seq", type=int, default=256, help="tokens each row reads")
    g.add_argument("--lr", type=float, default=3e-6)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="as train.py (0: off), for every training step")
    g = p.add_argument_group("2. generation")
    g.add_argument("--gen-batch", type=int, default=8)
    g.add_argument("--gen-prompt-len", type=int, default=64)
    g.add_argument("--gen-new-tokens", type=int, default=64)
    g = p.add_argument_group("3-5. BASH, SCS, RAC on one global batch of random rows")
    g.add_argument("--rows", type=int, default=32, help="rows in the global batch (one decode batch)")
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--response-len", type=int, default=64, help="reference response y, eos last")
    g.add_argument("--micro-batch", type=int, default=None, help="rows per forward/backward (default: all)")
    g.add_argument("--beta", type=float, default=0.2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    mem = Memory(device)
    table = []  # (quantity, value, target, met)
    tmp = tempfile.TemporaryDirectory()  # the initial weights, reloaded for every section
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=args.layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(tmp.name)

    def load_hf():
        return GPT2LMHeadModel.from_pretrained(tmp.name).to(device)

    def load_ours():
        return from_pretrained(tmp.name, device=device)

    n_params = load_ours().num_params()
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    print(f"GPT-2 ({args.layers} layers, {n_params / 1e6:.0f}M params), fp32 weights"
          f"{', bf16 autocast' if bf16 else ''}, {args.device}, {args.threads} threads, best of {args.repeats} "
          f"after one warm-up{', torch.compile (ours)' if args.compile else ''}")

    # ---- 1. training step ------------------------------------------------------------------------
    print(f"\n1. training step: batch {args.batch} x {args.seq} tokens, forward + backward + AdamW "
          f"(train.make_optimizer for both, grad clip {args.grad_clip}), loss masked_nll on every position, .train()")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (args.batch, args.seq + 1), generator=g).to(device)
    x, y, m = ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), torch.ones(args.batch, args.seq, device=device)
    n_tok = args.batch * args.seq
    tok_s = {}
    for name in ("ours", "transformers"):
        with mem.phase(f"train step {name}"):
            hf = name == "transformers"
            model = (load_hf() if hf else load_ours()).train()
            opt = make_optimizer(model, opt_args(args))
            fwd = torch.compile(model) if args.compile and not hf else model
            t = timed(lambda: lm_step(fwd, opt, x, y, m, device, args.grad_clip, hf,
                                      args.precision), args.repeats)
            tok_s[name] = n_tok / t
            print(f"    {name:<13} {tok_s[name]:>10,.1f} tok/s  ({t * 1e3:.1f} ms/step)")
        del model, opt, fwd
        release()
    train_ratio = tok_s["ours"] / tok_s["transformers"]
    print(f"    ratio ours/transformers: {train_ratio:.2f}x (target >= 1.2x)")
    table += [("train step tok/s, ours", f"{tok_s['ours']:,.0f}", "", None),
              ("train step tok/s, transformers", f"{tok_s['transformers']:,.0f}", "", None),
              ("train step speed ours / transformers", f"{train_ratio:.2f}x", ">= 1.2x", train_ratio >= 1.2)]
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if cuda else None)
    if peak is not None:
        mfu = 6 * n_params * tok_s["ours"] / (peak * 1e12)
        print(f"    MFU ours: {100 * mfu:.1f}% (6 * {n_params / 1e6:.0f}M params * tok/s / {peak:g} TFLOP/s; "
              f"attention FLOPs not counted)")
        table.append((f"MFU ours (peak {peak:g} TFLOP/s)", f"{100 * mfu:.1f}%", "", None))
    else:
        print("    MFU: skipped on CPU (pass --peak-tflops with this CPU's peak to compute it)")

    # ---- 2. generation ---------------------------------------------------------------------------
    print(f"\n2. greedy generation: batch {args.gen_batch}, {args.gen_prompt_len}-token prompts, "
          f"{args.gen_new_tokens} new tokens (scripts/bench_generate.py's runs, its `timed`)"
          + ("; transformers under the same bf16 autocast as ours" if cuda else ""))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 50257, (args.gen_batch, args.gen_prompt_len), generator=g).to(device)
    n_new = args.gen_batch * args.gen_new_tokens
    gen_s = {}
    for name in ("ours", "transformers"):
        with mem.phase(f"generate {name}"):
            model = (load_hf() if name == "transformers" else load_ours()).eval()
            run = (hf_runner(model, prompts, args.gen_new_tokens, do_sample=False) if name == "transformers"
                   else ours_runner(model, prompts, args.gen_new_tokens))
            t = timed(run, args.repeats)
            gen_s[name] = n_new / t
            print(f"    {name:<13} {gen_s[name]:>10,.1f} new tok/s")
        del model
        release()
    gen_ratio = gen_s["ours"] / gen_s["transformers"]
    print(f"    ratio ours/transformers: {gen_ratio:.2f}x")
    table += [("greedy generation speed ours / transformers", f"{gen_ratio:.2f}x", "", None)]

    # ---- 3-5. BASH, SCS, RAC on one global batch -------------------------------------------------
    B, P, L = args.rows, args.prompt_len, args.response_len
    mb = args.micro_batch or B
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(B):
        x_ids = torch.randint(0, EOS, (P,), generator=g).tolist()
        y_ids = torch.randint(0, EOS, (L - 1,), generator=g).tolist() + [EOS]
        rows.append(Row(x_ids, y_ids, x_ids + y_ids + x_ids, answer=None, reference=""))  # f(x,y) stand-in
    idx = list(range(B))
    prompts_b = [r.prompt for r in rows]
    print(f"\n3-5. one global batch of {B} random rows: {P}-token prompts x, {L}-token references y; "
          f"training micro-batch {mb}; mixing and RAC building are one decode batch of {B}; beta {args.beta}")
    raw = load_ours()
    opt = make_optimizer(raw, opt_args(args))
    model = torch.compile(raw) if args.compile else raw
    train_kw = dict(micro_batch=mb, device=device, grad_clip=args.grad_clip,
                    precision=args.precision)
    # one SFT step outside any memory phase, so AdamW's state exists before every phase below and each
    # phase's rise is its own (activations, gradients, caches), not the optimizer's lazy first allocation
    method_step(model, raw, opt, rows, idx, None, **train_kw)

    def mix(seed=0):
        raw.eval()  # sample without dropout, as train.build_offline does
        out = bash_rows(raw, rows, args.beta, 1.0, seed)
        raw.train()
        return out

    with mem.phase("BASH mix"):
        t_mix = timed(mix, args.repeats)
    bash_offline = mix()
    with mem.phase("SFT train step"):
        t_sft = timed(lambda: method_step(model, raw, opt, rows, idx, None, **train_kw), args.repeats)
    mix_ratio = (t_mix / B) / (t_sft / B)
    print(f"3.  BASH mixing {t_mix:.3f} s/batch = {1e3 * t_mix / B:.1f} ms/row; SFT training step "
          f"{t_sft:.3f} s/batch = {1e3 * t_sft / B:.1f} ms/row; mixing / SFT training per row: {mix_ratio:.3f} "
          f"(target <= 0.25)")
    table.append(("BASH mix / SFT train, per row", f"{mix_ratio:.3f}", "<= 0.25", mix_ratio <= 0.25))

    with mem.phase("BASH train step"):
        t_bash = timed(lambda: method_step(model, raw, opt, rows, idx, bash_offline, **train_kw), args.repeats)
    paper_mix = PAPER["bash_mix_s"] / PAPER["bash_train_s"]
    print(f"    mixing / BASH training (J_SFT + J_BASH, what the paper's 4.4 s measures) per row: "
          f"{t_mix / t_bash:.3f} (paper {paper_mix:.2f} = 0.9 s / 4.4 s)")
    table.append(("BASH mix / BASH train (J_SFT+J_BASH), per row", f"{t_mix / t_bash:.3f}", f"paper {paper_mix:.2f}",
                  None))
    step = [0]

    def scs_step():  # train.py's SCS branch: mix with the current weights, then J_SFT + J_SCS
        step[0] += 1
        method_step(model, raw, opt, rows, idx, mix(seed=step[0]), **train_kw)

    with mem.phase("SCS step"):
        t_scs = timed(scs_step, args.repeats)
    scs_ratio = t_scs / (t_mix + t_bash)
    paper_scs = PAPER["scs_s"] / (PAPER["bash_mix_s"] + PAPER["bash_train_s"])
    print(f"4.  SCS step (mix + J_SFT + J_SCS) {t_scs:.3f} s/batch; BASH mix {t_mix:.3f} s + BASH train step "
          f"(J_SFT + J_BASH) {t_bash:.3f} s = {t_mix + t_bash:.3f} s/batch; SCS / BASH: {scs_ratio:.2f}x "
          f"(paper {paper_scs:.1f}x = 20.8 s / (0.9 + 4.4) s)")
    print("    why it can differ: here SCS and BASH run the same KV-cache decode loop and the same training step, "
          "so per global batch they do the same work and the ratio is ~1. The paper's 3.9x measures online sampling "
          "inside an 8-GPU training job, where switching between training and generation at every step is what "
          "costs (Remark 1); a single process with a fast decode path does not pay it. What BASH keeps here is that "
          "its mixing runs outside the training step: batched over the whole data set, sharded, and done once per "
          "iteration, with no gradients or training activations alive.")
    table.append(("SCS step / (BASH mix + BASH train), per batch", f"{scs_ratio:.2f}x", f"info (paper ~{paper_scs:.1f}x)",
                  None))

    def rac():
        raw.eval()
        out = rac_labels(raw, prompts_b, [r.ref_prompt for r in rows], max_new_tokens=L, seed=0)  # no eos: z has L tokens
        raw.train()
        return out

    with mem.phase("RAC build"):
        t_rac = timed(rac, args.repeats)
    rac_ratio = (t_rac / B) / (t_sft / B)
    print(f"5.  RAC building (sample z of {L} tokens, then one pass over f(x,y) ++ z[:-1], f = x ++ y ++ x, "
          f"{2 * P + L} tokens) {t_rac:.3f} s/batch = {1e3 * t_rac / B:.1f} ms/row; / SFT training per row: "
          f"{rac_ratio:.3f}")
    table.append(("RAC build / SFT train, per row", f"{rac_ratio:.3f}", "info (paper gives none)", None))
    del model, raw, opt
    release()

    # ---- 6. memory -------------------------------------------------------------------------------
    print("\n6. peak memory of each phase" + ("" if cuda else
          " (CPU: process resident high-water mark; 'rise' = above the resident size at the phase's start, "
          "which includes the weights loaded inside the phase in 1-2; in 3-5 the weights and AdamW state "
          "were resident before)"))
    for name, (pk, rise, _) in mem.records.items():
        print(f"    {name:<28} peak {pk:>9,.0f} MB   rise {rise:>9,.0f} MB")
    print("    paper (Pythia-1B, per GPU): " + ", ".join(f"{k} ~{v} GB" for k, v in PAPER["mem_gb"].items()))
    r = mem.records
    if "train step ours" in r and "train step transformers" in r:
        mr = r["train step ours"][1] / max(r["train step transformers"][1], 1e-9)
        table.append(("train step memory rise ours / transformers", f"{mr:.2f}", "", None))
    for name in ("BASH mix", "BASH train step", "SCS step", "RAC build", "SFT train step"):
        if name in r:
            table.append((f"peak memory {name} ({'rise' if not cuda else 'alloc'})",
                          f"{(r[name][1] if not cuda else r[name][0]):,.0f} MB", "", None))

    # ---- table -----------------------------------------------------------------------------------
    print()
    w = max(len(q) for q, *_ in table)
    print(f"{'quantity':<{w}}  {'value':>12}  {'target':<24}  met?")
    for q, v, t, ok in table:
        print(f"{q:<{w}}  {v:>12}  {t or '—':<24}  {fmt_ok(ok)}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
