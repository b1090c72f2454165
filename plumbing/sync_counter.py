"""Counting the operations that make the host wait for a GPU (host-device synchronisations), on
any machine. A reader of the paper can skip this file: it measures, it never changes a result.

On CUDA the host queues kernels and runs ahead; an operation whose result the host must read
(`item`, `int(t)`, `bool(t)`, `tolist`), whose output size depends on the data (`nonzero`,
boolean-mask indexing, `masked_select`), or a copy from pageable host memory (`torch.tensor(list,
device=cuda)`, `.to(device)` of an unpinned tensor) stops it until the GPU catches up, so the
next micro-batch's work never overlaps the current one's. SyncCounter is a TorchDispatchMode that
counts them by kind:

    with SyncCounter(device) as syncs:
        ...
    syncs.total, syncs.counts  # {"item": 2, "nonzero": 1, ...}

What it sees, and what it cannot:
- On CUDA (device not a CPU): every listed op that goes through the dispatcher, and each
  host-to-device copy from unpinned memory (a real pageable copy) or device-to-host copy.
- On a CPU (the stand-in for a GPU in tests): there is no device, so no copy happens. Every tensor
  is taken to be device data, and each tensor built from Python data (`torch.tensor(list)`,
  `new_tensor`; 0-dim scalars excepted, which CUDA kernels take by value) counts as the pageable
  copy it would be on a GPU, unless it is built inside `staging()`, as plumbing.device.to_device
  builds the pinned host tensors it copies without a sync. `Tensor.tolist`, which bypasses the
  dispatcher, is counted by wrapping it while the counter is active. Host-only work done with
  tensors is over-counted: keep host data in Python lists.
- Neither sees a sync inside a kernel (e.g. a kernel reading its own output size on the host),
  `torch.cuda.synchronize`, allocator retries, collectives that wait, or `Tensor.numpy()`. On a
  GPU, `torch.cuda.set_sync_debug_mode("warn")` reports those.
"""
import collections
import contextlib
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_LOCAL = threading.local()  # .staging: depth of staging() in this thread; .tolist: inside tolist

SCALAR_READS = {aten._local_scalar_dense.default: "item", aten.equal.default: "equal"}
DATA_SIZED = {aten.nonzero.default: "nonzero", aten.masked_select.default: "masked_select",
              aten.nonzero.out: "nonzero", aten.masked_select.out: "masked_select"}
BOOL_INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
              aten._index_put_impl_.default}
COPIES = {aten._to_copy.default, aten.copy_.default}


@contextlib.contextmanager
def staging():
    """Host tensors built here are staged for a pinned, non-blocking copy: not counted."""
    _LOCAL.staging = getattr(_LOCAL, "staging", 0) + 1
    try:
        yield
    finally:
        _LOCAL.staging -= 1


def _device(x):
    return x.device.type if isinstance(x, torch.Tensor) else None


class SyncCounter(TorchDispatchMode):
    def __init__(self, device="cpu"):
        super().__init__()
        self.stand_in = torch.device(device).type == "cpu"
        self.counts = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self):
        counter, plain = self, torch.Tensor.__dict__.get("tolist")

        def tolist(t):
            if counter.stand_in or t.device.type != "cpu":
                counter.counts["tolist"] += 1
            _LOCAL.tolist = True  # its own device-to-host copy is this one
            try:
                return torch._C.TensorBase.tolist(t)
            finally:
                _LOCAL.tolist = False
        self._plain_tolist = plain
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        if self._plain_tolist is None:
            del torch.Tensor.tolist
        else:
            torch.Tensor.tolist = self._plain_tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = self.kind(func, args, kwargs, out)
        if kind:
            self.counts[kind] += 1
        return out

    def kind(self, func, args, kwargs, out):
        """What kind of sync func(*args, **kwargs) -> out is, or None."""
        if func in SCALAR_READS:
            return SCALAR_READS[func]
        if func in DATA_SIZED:
            return DATA_SIZED[func]
        if func in BOOL_INDEX:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices):
                return "boolean index"
            return None
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            return "repeat_interleave"
        if func in COPIES:
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0] if func is aten.copy_.default else out
            if _device(src) == "cpu" and _device(dst) != "cpu" and not src.is_pinned():
                return "pageable host-to-device copy"
            if (_device(src) != "cpu" and _device(dst) == "cpu" and not kwargs.get("non_blocking")
                    and not getattr(_LOCAL, "tolist", False)):
                return "device-to-host copy"
            return None
        if func is aten.lift_fresh.default and out.dim() > 0:  # torch.tensor(Python data)
            if out.device.type != "cpu":  # torch.tensor(list, device=cuda): a pageable copy
                return "pageable host-to-device copy"
            if self.stand_in and not getattr(_LOCAL, "staging", 0):
                return "host data for the device"
        return None
