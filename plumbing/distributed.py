"""torchrun, DDP and FSDP for train.py. A reader of the paper can skip this file: one process
computes the same training as several (tests/test_train.py checks it), and everything here
exists only so that several can share the work.

- setup: rank, world size and device from torchrun's environment (gloo on CPUs, NCCL on GPUs).
- wrap: DDP, or FSDP2 sharding (--fsdp), and torch.compile.
- accumulate: one micro-batch's forward and backward, the gradient reduced once per step.
- the gathered decoder: under --fsdp, a whole copy of the model that decodes on its own (and
  scores evaluation's fp32 loss first).
- collectives the loop needs: sums, rank 0's value everywhere, the offline rows of every rank,
  the whole state dict for a checkpoint and its shards on resume.
"""
import functools
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from plumbing.device import compile_blocks


def setup(device):
    """(rank, world size, device): torchrun sets RANK; gloo on CPU, NCCL on GPUs."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), torch.device(device)
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    cuda = torch.device(device).type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def wrap(raw, device, world: int, fsdp: bool, precision: str, compile: bool):
    """The module training calls: raw itself (sharded in place under --fsdp) or DDP over it;
    --compile compiles raw's blocks in place (plumbing/device.compile_blocks)."""
    if fsdp and world == 1:
        raise ValueError("--fsdp shards over torchrun's processes: run it under torchrun "
                         "--nproc_per_node=N (N > 1)")
    model = raw
    if compile:  # before sharding, as torch's FSDP2 examples compile each block
        compile_blocks(raw)
    if fsdp:
        shard(raw, device, precision)
    elif world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=ids)
    return model


def bf16_weights(device, precision) -> bool:
    """Whether --fsdp computes from bf16 copies of the weights (MixedPrecisionPolicy), and its
    gathered decoder decodes on bf16 weights: on CUDA, unless --precision fp32."""
    return device.type == "cuda" and precision != "fp32"


def shard(model, device, precision):
    """--fsdp (FSDP2): each block, then the root (embeddings, final norm, head), sharded over the
    processes, so parameters, gradients and AdamW's moments each take 1/world per rank; a block's
    weights are gathered for its forward and backward only. On CUDA the forward and backward
    compute in bf16 from fp32 master weights, and gradients are reduced in fp32."""
    bf16 = bf16_weights(device, precision)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32)
    for block in model.h:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def accumulate(model, part, world: int, fsdp: bool, last: bool):
    """One micro-batch: part() returns (loss, *rest); its backward, and rest returned. DDP reduces
    the gradients once, at the last micro-batch; FSDP reduce-scatters each (it never holds a full
    gradient). Both average over ranks while the loss is a part of a global-batch sum: the loss is
    scaled by the world size to undo that."""
    with model.no_sync() if world > 1 and not fsdp and not last else nullcontext():
        loss, *rest = part()
        (loss * world).backward()
    return rest


def all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    """t summed over the ranks, in place."""
    if world > 1:
        dist.all_reduce(t)
    return t


def grad_norm(params) -> tuple[torch.Tensor, torch.Tensor]:
    """(the norm clip_grads_with_norm_ takes, the whole model's gradient norm as a plain tensor):
    under FSDP the first is a DTensor over the shards."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm, norm.full_tensor() if isinstance(norm, DTensor) else norm


def from_rank0(value, world: int):
    """Rank 0's value on every rank (what only rank 0 computed: its folder, its evaluation)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merged(part: dict, world: int) -> dict:
    """The union of every rank's dict (each rank built some of the offline rows)."""
    if world == 1:
        return part
    parts = [None] * world
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def barrier(world: int):
    if world > 1:
        dist.barrier()


def gathered_decoder(raw, fsdp: bool, precision: str, scores: bool = False):
    """The model that decodes (offline sets, SCS, evaluation): raw itself, or under --fsdp a full
    copy gathered on every rank. A sharded forward is a collective, and ranks decode different
    batches whose rows stop at different lengths: with shards they would wait on each other.
    scores: the copy keeps fp32 weights (evaluation's fp32 validation loss) until for_decoding
    casts it in place, where it would decode in bf16."""
    if not fsdp:
        return raw
    full = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True))
    bf16 = bf16_weights(raw.device, precision)  # as FSDP computes
    if bf16 and not scores:
        full = {k: v.to(torch.bfloat16) for k, v in full.items()}  # half the copy's memory
    with torch.device("meta"):
        copy = type(raw)(raw.config)
    copy.load_state_dict(full, assign=True)
    for name, buf in raw.named_buffers():  # the rotary tables: not sharded, not in the dict
        owner, _, leaf = name.rpartition(".")
        copy.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    if copy.config.tie_embeddings:
        copy.lm_head.weight = copy.wte.weight
    copy.decodes_in = torch.bfloat16 if bf16 and scores else None
    copy.compile_decode = getattr(raw, "compile_decode", False)  # --compile-decode
    return copy.train(raw.training)


def for_decoding(model):
    """model, ready to decode: a gathered copy kept in fp32 for its loss (gathered_decoder's
    scores) is cast to bf16 in place, halving its memory; any other model is left as it is."""
    dtype = getattr(model, "decodes_in", None)
    if dtype is not None:
        for p in model.parameters():  # not the buffers: the rotary tables stay fp32, as raw's
            p.data = p.data.to(dtype)
        model.decodes_in = None
    return model


def whole_state(raw, opt, fsdp: bool):
    """(weights, optimizer state or None) for a checkpoint: under --fsdp gathered whole onto rank
    0's CPU (a collective: every rank calls it), so the checkpoint has the single-process layout."""
    if not fsdp:
        return raw.state_dict(), None
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(raw, options=whole),
            get_optimizer_state_dict(raw, opt, options=whole))


def load_whole_state(raw, opt, weights: dict, fsdp: bool):
    """Load a checkpoint's whole weights; under --fsdp every rank keeps its own shards. Returns
    what loads the optimizer's whole state the same way (None: the plain load_state_dict)."""
    if not fsdp:
        raw.load_state_dict(weights)
        return None
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(raw, weights, options=whole)
    return functools.partial(set_optimizer_state_dict, raw, opt, options=whole)
