"""The GPU check, in one command: what a CUDA machine should be measured on, printed as one report.

  1. training MFU: train.py's step (J_SFT + J_BASH over one global batch, micro-batched, AdamW)
     in bf16 autocast over fp32 weights, GPT-2 124M and SmolLM2-135M shapes, with and without
     --activation-checkpointing; MFU = (6 N + 12 L d T) tokens/s / the device's peak bf16 FLOP/s
  2. decode tokens/s at batch 1, 8 and 64: our generate, eager and with the fixed-shape compiled
     step, against transformers' generate on the same weights (SmolLM2-135M, greedy, exactly
     --new-tokens each)
  3. the time of one BASH and one RAC offline build of --build-rows GSM-style rows (SmolLM2-135M
     from scripts/fetch_assets.py, its tokenizer, the math template), decode batches sized as
     train.py sizes them

    python scripts/bench_gpu.py --device cuda --peak-tflops 989   # H100 / H200 bf16 dense peak
    python scripts/bench_gpu.py --small                           # the same code, CPU-sized

Random weights for part 1 (speed does not depend on them); the fetched SmolLM2 weights for parts
2 and 3, so that RAC's labels and the samples' lengths are a real model's. Nothing is written.
"""
import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from data import Row, load_rows  # noqa: E402
from generate import generate  # noqa: E402
from model import GPT, GPTConfig, from_pretrained  # noqa: E402
from plumbing.device import autocast, fitting_batch  # noqa: E402
from plumbing.tokenizer import load_tokenizer  # noqa: E402

SMOL = ROOT / "assets" / "smollm2-135m-instruct"
GSM = ROOT / "assets" / "gsm" / "train.jsonl"
SHAPES = {"gpt2-124m": dict(arch="gpt2", vocab_size=50257, block_size=1024, n_layer=12,
                            n_head=12, n_embd=768),
          "smollm2-135m": dict(arch="llama", vocab_size=49152, block_size=2048, n_layer=30,
                               n_head=9, n_kv_head=3, n_embd=576, n_inner=1536,
                               tie_embeddings=True)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeats, device) -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up."""
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------------------------
# 1. Training MFU


def random_rows(n, prompt, response, vocab, seed) -> list[Row]:
    g = torch.Generator().manual_seed(seed)
    return [Row(torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                torch.randint(0, vocab, (response,), generator=g).tolist(), [], None, "")
            for _ in range(n)]


def train_mfu(name, args, device, checkpointing) -> dict:
    """Tokens/s and MFU of one optimizer step over SFT + BASH rows (the BASH rows mixed by the
    model itself, so the step is train.py's)."""
    torch.manual_seed(0)
    cfg = GPTConfig(**{**SHAPES[name], **({"n_layer": 2} if args.small else {})})
    model = GPT(cfg).to(device)
    model.checkpointing = checkpointing
    rows = random_rows(args.train_rows, args.seq // 4, args.seq - args.seq // 4, cfg.vocab_size, 1)
    with autocast(device, "bf16" if device.type == "cuda" else "fp32"):
        mixed = train.bash_rows(model.eval(), rows, 0.2, 1.0, 0)
    model.train()
    offline, idx = dict(enumerate(mixed)), list(range(len(rows)))
    opt = train.make_optimizer(model, argparse.Namespace(lr=1e-5, weight_decay=0.1))
    precision = "bf16" if device.type == "cuda" else "fp32"
    run = argparse.Namespace(args=argparse.Namespace(micro_batch_size=args.micro_batch,
                                                     neftune_alpha=0.0, precision=precision),
                             rows=rows, model=model, raw=model)

    def step():
        for part in train.sft_parts(run, idx, idx, offline, train.METHODS["bash"]):
            part()[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = best_time(step, args.repeats, device)
    tokens = 2 * sum(len(r.prompt) + len(r.response) - 1 for r in rows)  # SFT + BASH rows
    n = sum(p.numel() for p in model.parameters())
    flops = (6 * n + 12 * cfg.n_layer * cfg.n_embd * args.seq) * tokens / seconds
    out = {"shape": name, "checkpointing": checkpointing, "step_s": seconds,
           "tok_s": tokens / seconds, "tflops": flops / 1e12}
    if args.peak_tflops:
        out["mfu"] = flops / 1e12 / args.peak_tflops
    del model, opt
    return out


# ----------------------------------------------------------------------------------------------
# 2. Decode tokens/s against transformers


def decode_speed(args, device, batch) -> dict:
    import transformers
    precision = "bf16" if device.type == "cuda" else "fp32"
    ours = from_pretrained(SMOL, device=device).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(SMOL, torch_dtype=torch.float32)
    hf = hf.to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_len), generator=g)
    new = args.new_tokens

    def ours_run(compiled):
        ours.compile_decode = compiled  # --compile-decode: plumbing/decode_step.py
        with autocast(device, precision):
            rows = generate(ours, prompts.tolist(), new)
        assert all(len(r) == new for r in rows)

    def hf_run():
        ids = prompts.to(device)
        with torch.inference_mode(), autocast(device, precision):
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == args.prompt_len + new
    res = {"batch": batch,
           "ours_eager_tok_s": batch * new / best_time(functools.partial(ours_run, False),
                                                       args.repeats, device),
           "transformers_tok_s": batch * new / best_time(hf_run, args.repeats, device),
           "ours_compiled_tok_s": batch * new / best_time(functools.partial(ours_run, True),
                                                          args.repeats, device)}
    return res


# ----------------------------------------------------------------------------------------------
# 3. Offline builds


def offline_builds(args, device) -> dict:
    tok = load_tokenizer(SMOL)
    model = from_pretrained(SMOL, device=device).eval()
    rows, _ = load_rows(str(GSM), tok, "math", model.config.block_size, "truncate",
                        need_ref=True)
    rows = (rows * math.ceil(args.build_rows / len(rows)))[:args.build_rows]
    precision = "bf16" if device.type == "cuda" else "fp32"
    new = max(len(r.response) for r in rows) + 16
    batch = fitting_batch(model, rows, 256, new, precision, args.build_memory_gb)
    out = {"rows": len(rows), "decode_batch": batch}
    builds = {"bash": lambda m, rs, s: train.bash_rows(m, rs, 0.2, 1.0, s),
              "rac": lambda m, rs, s: train.rac_rows(m, rs, new, 1.0, s, tok.eos_id)}
    for name, build in builds.items():
        sync(device)
        t0 = time.perf_counter()
        train.build_offline(model, rows, build, batch, 0, 0, 1, precision)
        sync(device)
        out[f"{name}_build_s"] = time.perf_counter() - t0
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true",
                   help="CPU-sized: 2 layers, short rows, few of them (the code path, not numbers)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak bf16 dense TFLOP/s, for MFU (H100 / H200: 989)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq", type=int, default=1024, help="1. tokens per training row")
    p.add_argument("--train-rows", type=int, default=64, help="1. rows per global batch")
    p.add_argument("--micro-batch", type=int, default=16, help="1. rows per forward/backward")
    p.add_argument("--prompt-len", type=int, default=128, help="2. prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="2. new tokens per row")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="2. decode batches")
    p.add_argument("--build-rows", type=int, default=1024, help="3. GSM-style rows per build")
    p.add_argument("--build-memory-gb", type=float, default=None,
                   help="3. decode-batch budget (default as train.py: from free memory on CUDA)")
    args = p.parse_args()
    if args.small:
        args.seq, args.train_rows, args.micro_batch, args.repeats = 64, 8, 4, 1
        args.prompt_len, args.new_tokens, args.batches, args.build_rows = 16, 8, [1, 2], 8
    device = torch.device(args.device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    print("1. training step, J_SFT + J_BASH, AdamW" + (", bf16 autocast" if device.type == "cuda"
                                                       else ", fp32"))
    for name in SHAPES:
        for ckpt in (False, True):
            r = train_mfu(name, args, device, ckpt)
            mfu = f", MFU {100 * r['mfu']:.1f} %" if "mfu" in r else ""
            print(f"   {name:13s} checkpointing {'on ' if ckpt else 'off'}: {r['step_s']:.3f} s "
                  f"per step, {r['tok_s']:,.0f} tok/s, {r['tflops']:.2f} TFLOP/s{mfu}")
    print(f"2. decode, SmolLM2-135M, greedy, {args.prompt_len} + {args.new_tokens} tokens")
    for batch in args.batches:
        r = decode_speed(args, device, batch)
        compiled = f", compiled {r['ours_compiled_tok_s']:,.0f} tok/s"
        print(f"   batch {batch:3d}: ours eager {r['ours_eager_tok_s']:,.0f} tok/s{compiled}, "
              f"transformers {r['transformers_tok_s']:,.0f} tok/s "
              f"(eager {r['ours_eager_tok_s'] / r['transformers_tok_s']:.2f}x theirs)")
    r = offline_builds(args, device)
    print(f"3. offline builds, {r['rows']} GSM-style rows, decode batches of {r['decode_batch']}: "
          f"BASH {r['bash_build_s']:.1f} s, RAC {r['rac_build_s']:.1f} s")


if __name__ == "__main__":
    main()
