"""Generation speed: our KV-cache `generate` against transformers' `generate(use_cache=True)`
on the same weights (GPT-2 124M shape, random init), same prompts, exactly the same number of
new tokens. Prints new tokens/s of each and the ratio.

    python scripts/bench_generate.py                  # fp32, CPU, 2 threads, batch 8, 64 + 64 tokens
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generate import generate  # noqa: E402
from plumbing.device import autocast  # noqa: E402
from model import from_pretrained  # noqa: E402


def timed(fn, repeats):
    fn()  # warm-up: allocator, kernels, first-call caches
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def ours_runner(model, ids, new_tokens, temperature=0.0, top_k=None):
    """Our generate on prompts ids (B, P), exactly new_tokens each (no eos)."""
    def run():
        rows = generate(model, ids.tolist(), new_tokens, temperature=temperature, top_k=top_k, seed=0)
        assert all(len(r) == new_tokens for r in rows)
    return run


def hf_runner(model, ids, new_tokens, **kw):
    """transformers' generate(use_cache=True) on the same prompts, forced to exactly new_tokens."""
    def run():
        with torch.inference_mode(), autocast(ids.device):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, use_cache=True, pad_token_id=50256, **kw)
        assert out.shape[1] == ids.shape[1] + new_tokens
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=12, help="GPT-2 124M has 12; fewer for a quick look")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=args.layers)).eval().to(args.device)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = from_pretrained(d, device=args.device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 50257, (args.batch, args.prompt_len), generator=g)
    n_new = args.batch * args.new_tokens
    print(f"GPT-2 ({args.layers} layers, {ours.num_params() / 1e6:.0f}M params), fp32, {args.device}, "
          f"{args.threads} threads, batch {args.batch}, {args.prompt_len}-token prompts, {args.new_tokens} new tokens")
    print(f"{'mode':<10}{'ours tok/s':>12}{'transformers tok/s':>20}{'ratio':>8}")
    for mode, kw in [("greedy", dict(do_sample=False)), ("sampling", dict(do_sample=True, top_k=50, temperature=1.0))]:
        ids = prompts.to(args.device)
        run_ours = ours_runner(ours, ids, args.new_tokens, kw.get("temperature", 0.0), kw.get("top_k"))
        run_hf = hf_runner(hf, ids, args.new_tokens, **kw)
        t_ours, t_hf = timed(run_ours, args.repeats), timed(run_hf, args.repeats)
        print(f"{mode:<10}{n_new / t_ours:>12.1f}{n_new / t_hf:>20.1f}{t_hf / t_ours:>7.2f}x")


if __name__ == "__main__":
    main()
