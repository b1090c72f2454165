"""A decode step of fixed shapes that torch.compile captures as one graph (--compile-decode). A
reader of the paper can skip this file: the step computes what generate.decode's eager step does.

decode's eager step attends to the cache columns written so far, a slice one column longer at
every step: every step has new shapes, which a CUDA graph cannot replay. This step is gpt-fast's:
the token's keys and values are written at its column of the whole pre-allocated cache, by a
tensor index (not a Python int), and attention reads every column, the mask hiding those not
written yet. Its shapes are the same at every step of a decode, so
torch.compile(mode="reduce-overhead") captures it once as a CUDA graph and replays it for every
token: one launch instead of a few hundred kernels' (docs/benchmarks.md). On a CPU it compiles with
inductor and no CUDA graph. The prefill stays eager; so do the head and the sampler, whose rows
vary in BASH's mixing (only the rows that take the model's token).
"""
import torch

# torch.compile of step per device type, made on first use (tests put other backends here)
COMPILED = {}


class StaticCache:
    """A model.KVCache's tensors with its interface (update, filled) for the fixed-shape step:
    update writes this step's keys and values at column `col` (a (1,) tensor) of every row and
    returns every column."""

    # GPT.hidden advances a KVCache's Python count of written columns; here the column is the
    # tensor col, and a Python count would be a constant that torch.compile guards on: a
    # recompile at the next step. Reading it gives 0 and writing it does nothing.
    filled = property(lambda self: 0, lambda self, value: None)

    def __init__(self, cache, col):
        self.k, self.v, self.col = cache.k, cache.v, col

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].index_copy_(2, self.col, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.col, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]


def step(model, cache: StaticCache, tok, pos, real):
    """The final hidden states (B, d) after one token per row (tok, (B,)) written at column
    cache.col: each row's position is pos's at that column, and it reads its real columns up to
    that one (real: (B, columns) bool, generate.left_pad's)."""
    col = cache.col
    seen = real & (torch.arange(real.shape[1], device=col.device) <= col)
    return model.hidden(tok[:, None], pos=pos.index_select(1, col), mask=seen[:, None, None],
                        cache=cache)[:, -1]


def compiled_step(device_type: str):
    """step compiled as one graph (fullgraph: a graph break is an error, not a silent split):
    with CUDA graphs on CUDA ("reduce-overhead"), with inductor elsewhere."""
    if device_type not in COMPILED:
        mode = "reduce-overhead" if device_type == "cuda" else None
        COMPILED[device_type] = torch.compile(step, mode=mode, fullgraph=True)
    return COMPILED[device_type]


def fixed_step(model, cache, pos, real):
    """decode's step as the compiled fixed-shape one where model.compile_decode is set (the
    --compile-decode flag), else None (decode runs its eager step). Called after the prefill,
    which filled cache.filled columns: the first step writes the next one. The returned
    step(tok) feeds tok (B,) and returns the hidden states (B, d)."""
    if not getattr(model, "compile_decode", False):
        return None
    static = StaticCache(cache, torch.full((1,), cache.filled, device=pos.device))
    # fixed addresses for the CUDA graph: it writes the cache in place and reads the others
    # without copying them in first (new tensors at the next decode call: a new capture)
    for t in (static.k, static.v, static.col, pos, real):
        torch._dynamo.mark_static_address(t)
    run = compiled_step(pos.device.type)

    def fixed(tok):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are not read again
        h = run(model, static, tok, pos, real)
        static.col += 1  # on the device: no wait
        return h
    return fixed
