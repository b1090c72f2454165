"""Decoding speed, eager step vs --compile-decode's fixed-shape compiled step, on SmolLM2-135M
(assets/smollm2-135m-instruct): greedy generate of the same prompts at each batch size, new
tokens/s of each, their ratio, the compile time, and whether the token ids are the same.

    python scripts/bench_decode.py                     # CPU, 2 threads, batch 1 and 8, 64 + 64
    python scripts/bench_decode.py --device cuda --batch 1 8 64    # CUDA graphs, bf16 autocast

On a CPU the eager step multiplies by oneDNN-packed weights (packed_linears) and the compiled one
by inductor's kernels; on CUDA the compiled step is replayed as one CUDA graph
(mode="reduce-overhead") and both run under bf16 autocast (--precision auto). The compiled step is
compiled afresh for each batch size (dynamo reset), so each gets static shapes.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from generate import generate  # noqa: E402
from model import from_pretrained  # noqa: E402
from plumbing.device import autocast  # noqa: E402

SMOL = ROOT / "assets" / "smollm2-135m-instruct"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """(best seconds of `repeats` runs, what the last returned); fn has been warmed up."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def decode_speed(model, batch, prompt_len, new_tokens, compiled, repeats=3, seed=0):
    """New tokens/s of greedy generate on `batch` random prompts of prompt_len tokens, exactly
    new_tokens each (no eos); the compiled step's first call (compiling) timed apart. Returns
    (tokens/s, compile seconds or 0, each row's token ids)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    model.compile_decode = compiled
    torch._dynamo.reset()

    def run():
        return generate(model, prompts, new_tokens)

    sync(model.device)
    t0 = time.perf_counter()
    run()  # warm-up: the compile, allocator, first-call caches
    sync(model.device)
    first = time.perf_counter() - t0
    best, out = timed(run, model.device, repeats)
    model.compile_decode = False
    return batch * new_tokens / best, (first - best if compiled else 0.0), out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--init", default=str(SMOL), help="checkpoint (default SmolLM2-135M)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = from_pretrained(args.init, device=device).eval()
    name = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{Path(args.init).name} ({model.num_params() / 1e6:.0f}M params), {name}, "
          f"--precision {args.precision}, {args.threads} threads, {args.prompt_len}-token "
          f"prompts, {args.new_tokens} new tokens, torch {torch.__version__}")
    print(f"{'batch':>5}{'eager tok/s':>13}{'compiled tok/s':>16}{'ratio':>8}"
          f"{'compile s':>11}  rows with the same ids")
    with autocast(device, args.precision):
        for batch in args.batch:
            eager, _, ids = decode_speed(model, batch, args.prompt_len, args.new_tokens, False,
                                         args.repeats)
            fast, compile_s, ids_c = decode_speed(model, batch, args.prompt_len,
                                                  args.new_tokens, True, args.repeats)
            print(f"{batch:>5}{eager:>13.1f}{fast:>16.1f}{fast / eager:>7.2f}x"
                  f"{compile_s:>11.1f}  {sum(a == b for a, b in zip(ids, ids_c))}/{batch}",
                  flush=True)
    skips = counters["inductor"]["cudagraph_skips"]  # a step that CUDA graphs could not capture
    print(f"graphs compiled: {counters['stats']['unique_graphs']}"
          + (f", CUDA graph skips: {skips}" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
