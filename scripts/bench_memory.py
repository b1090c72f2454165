"""Memory and speed of a training step and of decoding, each configuration in a fresh process.

  1. SmolLM2-135M-Instruct (assets/smollm2-135m-instruct), 8 GSM-style rows (assets/gsm, math
     template), completion-only loss, micro-batch 8, AdamW: peak resident memory (ru_maxrss of the
     child process) and seconds per step (median) of ours (today's chunked loss, with and without
     --activation-checkpointing; and the loss on full logits, as before) vs TRL's SFTTrainer on the
     same token ids, fp32 and bf16.
  2. Peak memory of our step as the vocabulary grows: GPT-2 124M shape, random weights, vocabulary
     50,257 vs 150,000, the same row lengths; chunked loss vs full logits.
  3. Greedy decoding tokens/s on SmolLM2, ours vs transformers' generate, batch 1 and batch 8, 128
     new tokens; the token ids are compared.

TRL is a benchmark-only dependency, never a project one:

    pip install trl==1.16.0
    python scripts/bench_memory.py                    # CPU, 2 threads; about half an hour
    python scripts/bench_memory.py --only vocab       # one part: smollm2, vocab or decode
    python scripts/bench_memory.py --device cuda      # on a GPU: peak CUDA memory, tokens/s, MFU

Each configuration runs in its own `python scripts/bench_memory.py --child JSON` process, so one
configuration's peak never hides inside another's. On a CPU the peak is the child's ru_maxrss (its
whole resident high-water mark: Python, libraries, weights, optimizer, activations); on CUDA
torch.cuda.max_memory_allocated.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SMOL, GSM = ROOT / "assets" / "smollm2-135m-instruct", ROOT / "assets" / "gsm" / "train.jsonl"


def gsm_rows(n=8):
    """The first n GSM-style training rows, math template, SmolLM2's tokenizer."""
    from data import load_rows
    from plumbing.tokenizer import load_tokenizer
    tok = load_tokenizer(SMOL)
    rows, _ = load_rows(str(GSM), tok, "math", 1024, "truncate", False)
    return rows[:n], tok


def peak_bytes(device):
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


# ----------------------------------------------------------------------------------------------
# Children: one configuration each, a JSON line on stdout


def ours_step_fn(model, rows, device, precision, full_logits):
    """One optimizer step on the 8 rows: train.step_loss (the chunked loss), or the loss on the
    full logits (the form before it), both with AdamW as train.py makes it and clipping at 1."""
    import torch
    import train
    from data import collate
    from plumbing.device import autocast
    sys.path.insert(0, str(ROOT / "tests"))
    from reference import masked_nll  # the plain loss on full logits
    args = argparse.Namespace(lr=1e-5, weight_decay=0.1)
    opt = train.make_optimizer(model, args)
    idx = list(range(len(rows)))
    sft, _ = train.loss_rows(rows, idx, None)
    denom = train.sft_tokens(rows, idx)

    def step():
        if full_logits:
            x, y, mask = collate([r.prompt for r in sft], [r.inputs for r in sft],
                                 [r.targets for r in sft], pad_id=0, device=device)
            with autocast(device, precision):
                logits = model(x)
            loss = masked_nll(logits, y, mask, denom=denom)
        else:
            terms, _ = train.step_loss(model, sft, [], denom, 0.0, device, precision)
            loss = terms.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def child_ours(cfg, device):
    import torch
    from model import GPT, GPTConfig, from_pretrained
    rows, _ = gsm_rows()
    if cfg["model"] == "smollm2":
        model = from_pretrained(SMOL, device=device)
    else:  # GPT-2 124M shape, random weights, the GSM rows' lengths with random token ids
        torch.manual_seed(0)
        model = GPT(GPTConfig(arch="gpt2", vocab_size=cfg["vocab"])).to(device)
        g = torch.Generator().manual_seed(0)
        rand = lambda n: torch.randint(0, cfg["vocab"], (n,), generator=g).tolist()  # noqa: E731
        rows = [dataclasses.replace(r, prompt=rand(len(r.prompt)), response=rand(len(r.response)))
                for r in rows]
    model.checkpointing = cfg["ckpt"]
    model.train()
    step = ours_step_fn(model, rows, device, cfg["precision"], cfg["full_logits"])
    return timed_steps(step, cfg["steps"], device), rows


def child_trl(cfg, device):
    """TRL's SFTTrainer on the same token ids: input_ids = prompt ++ response, completion_mask
    marking the response (completion-only loss), one batch of the 8 rows per step."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    rows, tok = gsm_rows()
    data = Dataset.from_list([{"input_ids": r.prompt + r.response,
                               "completion_mask": [0] * len(r.prompt) + [1] * len(r.response)}
                              for r in rows])
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    model = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32).to(device)
    conf = SFTConfig(output_dir="/tmp/bench_memory_trl", per_device_train_batch_size=len(rows),
                     max_steps=cfg["steps"], num_train_epochs=cfg["steps"], learning_rate=1e-5,
                     weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="constant",
                     bf16=cfg["precision"] == "bf16", use_cpu=device.type == "cpu",
                     gradient_checkpointing=cfg["ckpt"], completion_only_loss=True,
                     packing=False, max_length=None, save_strategy="no", report_to=[],
                     logging_steps=10**6, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=conf, train_dataset=data, callbacks=[Clock()])
    base = peak_bytes(device)
    trainer.train()
    return {"step_s": times, "load_peak_gb": base / 1e9}, rows


def timed_steps(step, n, device):
    import torch
    base = peak_bytes(device)
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"step_s": times, "load_peak_gb": base / 1e9}


def child_decode(cfg, device):
    """Greedy, exactly `new` new tokens (no eos), ours (weights packed once for the run, as a
    build or an evaluation does, and plain) vs transformers' generate; the token ids of each row
    compared. Also the machine's copy bandwidth: at batch 1 a step reads every weight once, so
    weight bytes / bandwidth is the floor of a step's time for any fp32 implementation."""
    import torch
    from transformers import AutoModelForCausalLM
    from generate import generate, packed_linears
    from model import from_pretrained
    rows, tok = gsm_rows()
    ours = from_pretrained(SMOL, device=device).eval()
    hf = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32).to(device).eval()
    new, B = cfg["new"], cfg["batch"]
    prompts = [r.prompt for r in rows[:cfg["rows"]]]

    def theirs(batch):
        P = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (P - len(p)) + p for p in batch], device=device)
        att = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=att, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=tok.eos_id, use_cache=True)
        return out[:, P:].tolist()

    def mine(batch):
        return generate(ours, batch, new)

    batches = [prompts[k:k + B] for k in range(0, len(prompts), B)]
    res = {}
    for name, fn in (("transformers", theirs), ("ours", mine), ("ours_plain", mine)):
        fn(batches[0][:1])  # warm-up
        t0, ids = time.perf_counter(), []
        packed = packed_linears(ours, B) if name == "ours" else contextlib.nullcontext()
        with packed:
            for b in batches:
                ids += fn(b)
        res[name] = {"s": time.perf_counter() - t0, "ids": ids}
    same = {k: sum(a == b for a, b in zip(res[k]["ids"], res["transformers"]["ids"]))
            for k in ("ours", "ours_plain")}
    a = torch.empty(1 << 27)  # 512 MiB, copied: read once and written once
    b = torch.empty_like(a)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(3):
        b.copy_(a)
    gb_s = 3 * 2 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9
    n_tok = len(prompts) * new
    return {"ours_tok_s": n_tok / res["ours"]["s"], "plain_tok_s": n_tok / res["ours_plain"]["s"],
            "hf_tok_s": n_tok / res["transformers"]["s"], "rows_identical": same["ours"],
            "plain_identical": same["ours_plain"], "rows": len(prompts), "copy_gb_s": gb_s,
            "weight_gb": 4 * ours.num_params() / 1e9}, rows


def child(cfg):
    import torch
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    kind = cfg["kind"]
    out, rows = {"ours": child_ours, "trl": child_trl, "decode": child_decode}[kind](cfg, device)
    if kind != "decode":
        out["peak_gb"] = peak_bytes(device) / 1e9
        out["tokens"] = sum(len(r.prompt) + len(r.response) - 1 for r in rows)
    print("RESULT " + json.dumps(out))


# ----------------------------------------------------------------------------------------------
# Parent: every configuration in a fresh process, then the tables


def run_child(cfg):
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(f"  {cfg}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}")
        return None
    return json.loads(line[-1][len("RESULT "):])


def median_step(res):
    """Median of the steps after the first (the first pays for allocation and AdamW's state)."""
    return statistics.median(res["step_s"][1:] or res["step_s"])


def smollm2_table(base, all_configs, precisions):
    print("\n1. SmolLM2-135M, 8 GSM-style rows per step (micro-batch 8), completion-only loss")
    print(f"{'precision':<10}{'implementation':<34}{'peak GB':>9}{'s/step':>9}"
          f"{'peak vs TRL':>13}{'speed vs TRL':>14}")
    for precision in precisions:
        configs = [("TRL SFTTrainer", dict(kind="trl", ckpt=False)),
                   ("ours, loss on full logits (before)",
                    dict(kind="ours", ckpt=False, full_logits=True)),
                   ("ours, chunked loss", dict(kind="ours", ckpt=False, full_logits=False)),
                   ("ours, chunked + --activation-ckpt",
                    dict(kind="ours", ckpt=True, full_logits=False))]
        if all_configs:  # TRL's own gradient checkpointing
            configs.insert(1, ("TRL SFTTrainer, grad. checkpointing", dict(kind="trl", ckpt=True)))
        results = {}
        for name, c in configs:
            results[name] = run_child({**base, **c, "model": "smollm2", "precision": precision})
        ref = results["TRL SFTTrainer"]
        for name, res in results.items():
            if res is None:
                continue
            ratio = (f"{res['peak_gb'] / ref['peak_gb']:>12.2f}x{median_step(ref) / median_step(res):>13.2f}x"
                     if ref else "")
            print(f"{precision:<10}{name:<34}{res['peak_gb']:>9.2f}{median_step(res):>9.2f}{ratio}",
                  flush=True)


def vocab_table(base):
    print("\n2. GPT-2 124M shape, random weights, the same 8 rows' lengths: peak GB by vocabulary")
    print(f"{'loss':<22}{'vocab 50,257':>14}{'vocab 150,000':>15}{'growth GB':>11}"
          f"{'head weights x4 GB':>20}")
    for name, full in (("chunked (ours)", False), ("full logits (before)", True)):
        peaks = []
        for vocab in (50257, 150000):
            res = run_child({**base, "kind": "ours", "model": "gpt2", "vocab": vocab, "ckpt": False,
                             "full_logits": full, "precision": "fp32"})
            peaks.append(res["peak_gb"] if res else float("nan"))
        # the head's (tied) weights, their gradient and AdamW's two moments, fp32
        head = 4 * (150000 - 50257) * 768 * 4 / 1e9
        print(f"{name:<22}{peaks[0]:>14.2f}{peaks[1]:>15.2f}{peaks[1] - peaks[0]:>11.2f}{head:>20.2f}",
              flush=True)


def decode_table(base):
    print("\n3. Greedy decoding on SmolLM2, GSM prompts, 128 new tokens, fp32 (the floor: weight "
          "bytes / copy bandwidth, one read of every weight a step)")
    print(f"{'batch':<7}{'ours tok/s':>11}{'unpacked':>10}{'transformers':>14}{'ratio':>8}"
          f"{'identical rows':>16}{'floor tok/s':>13}")
    for batch in (1, 8):
        res = run_child({**base, "kind": "decode", "batch": batch, "new": 128,
                         "rows": 4 if batch == 1 else 8})
        if res:
            floor = batch * res["copy_gb_s"] / res["weight_gb"]
            print(f"{batch:<7}{res['ours_tok_s']:>11.1f}{res['plain_tok_s']:>10.1f}"
                  f"{res['hf_tok_s']:>14.1f}{res['ours_tok_s'] / res['hf_tok_s']:>7.2f}x"
                  f"{res['rows_identical']:>6}+{res['plain_identical']} of {res['rows']}"
                  f"{floor:>13.1f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--only", choices=("smollm2", "vocab", "decode"), default=None)
    p.add_argument("--steps", type=int, default=4,
                   help="steps per configuration (median of all but the first)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--all", action="store_true", help="also TRL with gradient checkpointing")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    base = {"steps": args.steps, "threads": args.threads, "device": args.device}
    print(f"{os.cpu_count()} CPUs seen, {args.threads} threads, device {args.device}; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    tables = (("smollm2", lambda b: smollm2_table(b, args.all, args.precisions)), ("vocab", vocab_table),
              ("decode", decode_table))
    for part, table in tables:
        if args.only in (None, part):
            table(base)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
