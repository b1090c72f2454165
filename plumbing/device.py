"""Running on the device at hand: the precision (bf16 autocast), copies to the device that do not
make the host wait, the blocks compiled for training (--compile), how many rows a decode batch
may hold, and Linear weights laid out for decoding. A reader of the paper can skip this file: it
changes how fast and in how much memory the code runs, never what it computes (measured gains:
docs/benchmarks.md).
"""
import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.sync_counter import staging


def allow_tf32(device):
    """On CUDA, fp32 matmuls and convolutions (the validation loss, --precision fp32) in TF32 on
    the tensor cores: a 10-bit mantissa for the products, fp32 for the sums. Set when a run
    starts on CUDA, never on a CPU (these are CUDA's switches only)."""
    if torch.device(device).type == "cuda":  # the flags of every torch >= 2.6 (not the newer
        # fp32_precision ones: set, they make any later read of these flags raise)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device, precision="auto"):
    """bf16 autocast on CUDA and plain fp32 elsewhere ("auto"), or the precision asked for: bf16
    halves a CPU training step where the CPU has bf16 instructions (avx512_bf16, AMX)."""
    if computes_in_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def computes_in_bf16(device, precision: str) -> bool:
    """What --precision means on `device`: bf16 if asked, or "auto" on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """autocast's dtype where it is on for device_type, else `default`."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def compute_dtype(model) -> torch.dtype:
    """The dtype a forward computes in: autocast's where it is on (bf16 on CUDA, or under
    --precision bf16), else the weights'. The KV cache is kept in it."""
    return autocast_dtype(model.device.type, model.dtype)


def to_device(data, device, dtype=torch.long) -> torch.Tensor:
    """A tensor of Python data (numbers, or equal-length lists of them) on `device`, without a
    host sync: on CUDA it is built in pinned memory and copied asynchronously (a copy from
    pageable memory makes the host wait for the GPU); on a CPU it is the tensor itself."""
    device = torch.device(device)
    with staging():  # plumbing/sync_counter.py: a staged copy, not a sync
        host = torch.tensor(data, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def compile_blocks(model):
    """--compile: each block's training forward compiled once for every batch size and length
    (dynamic shapes; torch still makes one more graph the first time a micro-batch of one row
    comes). The embeddings, the head and its chunked loss (model.chunked_nll, whose number of
    chunks changes with the scored tokens) stay eager, and so does every forward with a KV cache
    or a mask, or without gradients (decoding, scoring), whose shapes change at every step."""
    for block in model.h:
        compiled = torch.compile(block.forward, dynamic=True)
        block.forward = functools.partial(_compiled_in_training, block.forward, compiled)


def _compiled_in_training(eager, compiled, x, rope, mask, cache):
    train = mask is None and cache is None and torch.is_grad_enabled()
    return (compiled if train else eager)(x, rope, mask, cache)


# bytes that a chunk of RAC's labelling pass may take, and a decode batch's budget on a CPU (and
# on CUDA where --build-memory-gb is given)
BUILD_BYTES = 1 << 30
# on CUDA without --build-memory-gb: the share of the free device memory a decode batch may take;
# the rest is the margin for what decode_rows does not count (allocator fragmentation, the
# autocast copies of the weights, kernels' workspaces)
FREE_SHARE = 0.8


def free_memory(device) -> int:
    """Bytes a new allocation on a CUDA device can take: the driver's free memory plus what
    PyTorch's caching allocator holds reserved but unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def decode_rows(cfg, prompt_len: int, columns: int, itemsize: int, budget: int = BUILD_BYTES):
    """How many rows of a decode batch fit in `budget` bytes. Per row: the KV cache (keys and
    values of `columns` columns in every layer, `itemsize` bytes each), the prefill's fp32
    attention scores and MLP activations over `prompt_len` positions, and a step's fp32 logits
    with sample()'s buffers (three of them)."""
    cache = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * columns * itemsize
    prefill = 4 * prompt_len * (cfg.n_head * columns + 2 * cfg.n_inner)
    return max(1, budget // (cache + prefill + 3 * 4 * cfg.vocab_size))


def fitting_batch(model, rows, batch_size, new_tokens, precision, gb=None) -> int:
    """Rows per decode batch: batch_size, or fewer where their KV cache (the longest prompt +
    new_tokens columns, in the dtype decoding keeps it in: bf16 under autocast), prefill and
    logits would pass the budget (decode_rows): `gb` GB (--build-memory-gb), or where it is None,
    FREE_SHARE of the device's free memory on CUDA and BUILD_BYTES on a CPU (so that a CPU's
    batches do not depend on the machine)."""
    P = max(len(x.prompt) for x in rows)
    cuda = model.device.type == "cuda"
    itemsize = 2 if computes_in_bf16(model.device, precision) else model.dtype.itemsize
    budget = (int(gb * 1e9) if gb is not None else
              int(FREE_SHARE * free_memory(model.device)) if cuda else BUILD_BYTES)
    return min(batch_size, decode_rows(model.config, P, P + new_tokens, itemsize, budget))


def label_rows(cfg, labelled: int, length: int) -> int:
    """Rows per forward of RAC's labelling pass (generate.rac_labels): their fp32 logits at the
    `labelled` positions and their attention scores over `length` columns fit in BUILD_BYTES."""
    per_row = 4 * (labelled * cfg.vocab_size + cfg.n_head * length * length)
    return max(1, BUILD_BYTES // per_row)


def decode_bytes(model, batch: int, length: int) -> int:
    """What decoding `batch` rows of `length` tokens with `model` allocates: the KV cache (keys
    and values of every layer, in the compute dtype, as decode keeps it: bf16 under autocast)
    plus the activations and logits of one step (a generous bound)."""
    cfg, itemsize = model.config, compute_dtype(model).itemsize
    cache = 2 * cfg.n_layer * batch * cfg.n_kv_head * length * cfg.head_dim * itemsize
    return cache + batch * (length * cfg.n_embd * 16 + cfg.vocab_size * 8)


class PackedLinear(nn.Module):
    """A Linear layer for CPU inference whose weight oneDNN has re-laid out once for the matmul.

    A decode step multiplies a few rows by every weight, which runs faster on oneDNN's re-laid-out
    weights than on the plain layout (same results). Private ops, because the public ones
    (torch.utils.mkldnn's MkldnnLinear, torch.compile without freezing) were no faster than the
    plain layout (docs/benchmarks.md).
    """

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.bias, self.plain = linear.bias, linear

    def forward(self, x):
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):  # e.g. a bf16 forward
            return self.plain(x)  # inside the packing (DPO's reference log-probs): plain layout
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class CastLinear(nn.Module):
    """A Linear layer for a compiled decode step under autocast (--compile-decode), its weight
    and bias cast to the compute dtype once. Eager autocast casts a weight once per autocast
    context (its cache); inside a compiled graph the casts are ops of the graph, run at every
    step: a read of the fp32 weight and a write and read of its bf16 copy, against one bf16 read.
    Same values as autocast's casts."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.plain = linear
        self.register_buffer("weight", linear.weight.detach().to(dtype), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias, persistent=False)
        for t in (self.weight, self.bias):  # a CUDA graph reads them in place
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def forward(self, x):
        if autocast_dtype(x.device.type, None) != self.weight.dtype:  # e.g. an fp32 forward
            return self.plain(x)  # inside the swap: the weights themselves
        return F.linear(x, self.weight, self.bias)


def decode_linear(model, rows: int):
    """What packed_linears swaps each Linear for: a PackedLinear on a CPU in fp32 (eager), a
    CastLinear under autocast over weights of another dtype with --compile-decode, else None."""
    device, compiled = model.device.type, getattr(model, "compile_decode", False)
    dtype = autocast_dtype(device, model.dtype)
    if compiled and dtype != model.dtype:
        return lambda linear: CastLinear(linear, dtype)
    if (not compiled and device == "cpu" and model.dtype == dtype == torch.float32
            and torch.backends.mkldnn.is_available()):  # under bf16 autocast: the plain path
        return lambda linear: PackedLinear(linear, rows)
    return None


@contextlib.contextmanager
def packed_linears(model, rows: int):
    """Swap every Linear of `model` for one laid out for decoding (decode_linear): oneDNN's
    layout on a CPU in fp32, the compute dtype for --compile-decode under autocast; restore them
    after. Entered once around a whole build or evaluation, the weights are laid out once: a
    packed_linears entered inside it finds them swapped and does nothing."""
    make = decode_linear(model, rows)
    packed = isinstance(model.lm_head, (PackedLinear, CastLinear))  # an outer one wins
    if packed or make is None:
        yield
        return
    swapped = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    try:
        for parent, name, child in swapped:
            setattr(parent, name, make(child))
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
