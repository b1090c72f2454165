"""Training ready for a GPU, checked on the CPU (issue 32, items 7 and 8):

- host syncs: a micro-batch's forward and backward make none, an optimizer step one (its logged
  numbers, read once), counted by plumbing/sync_counter.py's SyncCounter with the CPU standing in
  for the GPU;
- --compile: the blocks compiled once for every micro-batch shape; the chunked loss, whose number
  of chunks changes with the scored tokens, stays eager: no graph breaks and no new graphs after
  the first step (torch's dynamo counters, with the aot_eager backend: inductor's C++ compiles
  would take minutes on 2 cores, and the graphs, breaks and recompiles are dynamo's either way).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from plumbing.sync_counter import SyncCounter  # noqa: E402
from test_train import one_thread  # noqa: E402,F401  (one intra-op thread, module-wide)

CPU = torch.device("cpu")
STEP_SYNCS = 1  # train_step reads its logged terms, tokens and gradient norm once


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(arch="llama", vocab_size=64, block_size=64, n_layer=1, n_head=2,
                         n_embd=32))


def sft_rows():
    rows = [data.Row([5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 63], [1], None, ""),
            data.Row([30, 31, 32, 33, 34, 35], [40, 41, 63], [1], None, "")]
    return train.loss_rows(rows, [0, 1], None)[0]


def bash_rows(sft):
    """ŷ: y with its second token replaced by the model's, scored on y."""
    return [train.TrainRow(r.prompt, r.inputs[:1] + [9] + r.inputs[2:], r.targets,
                           [1] * len(r.targets), [False, True] + [False] * (len(r.targets) - 2))
            for r in sft]


def rac_rows(sft):
    """z with two tokens corrected by z̄: only those are scored."""
    r = sft[0]
    z = r.inputs[:2] + [9] + r.inputs[3:5] + [8] + r.inputs[6:]
    return [train.TrainRow(r.prompt, z, r.targets, [int(a != b) for a, b in zip(z, r.targets)])]


# ----------------------------------------------------------------------------------------------
# The counter itself


def test_the_counter_sees_each_kind_of_sync():
    t = torch.arange(6.0)
    with SyncCounter(CPU) as syncs:
        t.sum().item()
        int(t[1]), float(t[2]), bool(t[3] > 0)
        t.tolist()
        t.nonzero()
        t[t > 2]
        t.masked_select(t > 2)
        torch.tensor([1, 2, 3])  # Python data for the device: a pageable copy on a GPU
        t.new_tensor([4.0])
        torch.tensor(2.0)  # a 0-dim scalar: CUDA kernels take it by value
        t * 2 + t[t.long()[:2]].sum()  # no sync: arithmetic, a long index
    assert syncs.counts == {"item": 4, "tolist": 1, "nonzero": 1, "boolean index": 1,
                            "masked_select": 1, "host data for the device": 2}, syncs.counts
    assert "tolist" not in torch.Tensor.__dict__  # its wrapper is gone again


def test_the_counter_sees_pageable_copies_and_not_staged_ones():
    from plumbing.device import to_device
    t = torch.arange(4)
    with SyncCounter("meta") as syncs:  # meta stands for a device: a copy there is a real one
        t.to("meta")
        to_device([1, 2], "meta")  # unpinned off CUDA, so counted too
    assert syncs.counts == {"pageable host-to-device copy": 2}, syncs.counts
    with SyncCounter(CPU) as syncs:
        x = to_device([[1, 2], [3, 4]], CPU)
    assert syncs.total == 0 and x.tolist() == [[1, 2], [3, 4]]


# ----------------------------------------------------------------------------------------------
# Item 7: no host sync in a micro-batch, one per optimizer step


@pytest.mark.parametrize("method", ["bash", "rac"])
def test_a_micro_batch_makes_no_host_sync(method):
    """step_loss's forward and backward over SFT rows and BASH (or RAC) rows: the scored
    positions come from the rows on the host, the batch reaches the device by a staged copy."""
    model, sft = tiny_gpt(), sft_rows()
    own = bash_rows(sft) if method == "bash" else rac_rows(sft)
    with SyncCounter(CPU) as syncs:
        terms, _ = train.step_loss(model, sft, own, 11, 0.0, CPU)
        terms.sum().backward()
    assert syncs.total == 0, f"a micro-batch made host syncs: {dict(syncs.counts)}"
    assert terms[0] > 0 and terms[1] > 0 and model.wte.weight.grad.abs().sum() > 0


def test_a_dpo_micro_batch_makes_no_host_sync():
    model, sft = tiny_gpt(), sft_rows()
    pairs = [train.PairRow(r.prompt, r.targets, b.inputs, -3.0, -4.0)
             for r, b in zip(sft, bash_rows(sft))]
    with SyncCounter(CPU) as syncs:
        loss, logged, _ = train.pair_loss(model, pairs, 2, 0.1, CPU)
        loss.backward()
    assert syncs.total == 0, f"a DPO micro-batch made host syncs: {dict(syncs.counts)}"


@pytest.fixture
def run(tmp_path):
    """A started tiny run: 16 rows, global batches of 8 in micro-batches of 4."""
    rows = data.builtin_task(16, seed=0, terms=(2, 4))
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n"
                            for e in rows))
    args = ["--init", "scratch", "--task", "arith", "--n-layer", "1", "--n-head", "2",
            "--n-embd", "32", "--block-size", "64", "--device", "cpu", "--data", str(path),
            "--out", str(tmp_path / "out"), "--batch-size", "8", "--micro-batch-size", "4"]

    def start(*extra):
        r = train.start(train.get_args([*args, *extra]))
        opened.append(r)
        return r
    opened = []
    yield start
    for r in opened:
        train.release_out(r.out, r.lock, r.made)


def offline_rac(r):
    """RAC rows by hand for every row: z with one token changed (scored there); every third row
    has nothing corrected, so the micro-batches hold different numbers of rows."""
    out = []
    for i, row in enumerate(r.rows):
        z = row.response[:1] + [(row.response[1] + 1) % 200] + row.response[2:]
        mask = [0] * len(z) if i % 3 == 0 else [int(a != b) for a, b in zip(z, row.response)]
        out.append(train.TrainRow(row.prompt, z, row.response, mask))
    return out


def test_an_optimizer_step_makes_one_host_sync(run):
    r = run("--method", "rac")
    for step, (offline, method) in enumerate([(None, "sft"), (offline_rac(r), "rac")]):
        with SyncCounter(CPU) as syncs:
            terms, tokens, _ = train.train_step(r, step, list(range(8)), offline,
                                                train.METHODS[method])
        assert syncs.total <= STEP_SYNCS, f"{method}: {dict(syncs.counts)}"
        assert tokens > 0 and all(v > 0 for v in terms.values()), terms


# ----------------------------------------------------------------------------------------------
# Item 8: --compile, one set of graphs for a run whose shapes and loss chunks vary


def test_compile_makes_no_new_graph_after_the_first_step(run, monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: real(f, **{**kw, "backend": "aot_eager"}))
    monkeypatch.setattr("model.LOGIT_BYTES", 4 * 257 * 4)  # chunks of 4 scored tokens
    torch._dynamo.reset()
    counters.clear()
    try:
        r = run("--method", "rac", "--compile")
        offline = offline_rac(r)
        batches = [list(range(k, k + 8)) for k in (0, 8, 3, 5, 1)]  # other lengths, other rows
        chunks, graphs = set(), []
        for step, idx in enumerate(batches):
            mine = [i for i in idx if any(offline[i].mask)]
            chunks.add(-(-sum(len(r.rows[i].response) for i in idx) // 4)
                       + -(-sum(sum(offline[i].mask) for i in mine) // 4))
            terms, _, _ = train.train_step(r, step, idx, offline, train.METHODS["rac"])
            assert all(torch.isfinite(torch.tensor(list(terms.values()))))
            graphs.append(counters["stats"]["unique_graphs"])
        breaks = dict(counters["graph_break"])
        limits = [k for k in counters["unimplemented"] if "recompile" in k.lower()]
    finally:
        torch._dynamo.reset()
    assert len(chunks) > 1, "the loss chunks did not vary: the test is not sharp"
    assert graphs[0] >= 1, "nothing was compiled"
    assert (graphs, sum(breaks.values()), limits) == ([graphs[0]] * len(batches), 0, []), \
        f"graphs after each step {graphs}; graph breaks {breaks}; limits hit {limits}"


def test_compiled_blocks_train_as_eager_and_decode_eager(monkeypatch):
    """Compiled blocks give eager's loss and gradients (aot_eager: the same kernels), and a
    forward with a KV cache (decoding) or without gradients never enters the compiled code."""
    from plumbing.device import compile_blocks
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: real(f, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    counters.clear()
    try:
        eager, compiled = tiny_gpt(), tiny_gpt()
        compile_blocks(compiled)
        sft = sft_rows()
        for model in (eager, compiled):
            terms, _ = train.step_loss(model, sft, bash_rows(sft), 11, 0.0, CPU)
            terms.sum().backward()
        torch.testing.assert_close(compiled.wte.weight.grad, eager.wte.weight.grad)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        from generate import generate
        with torch.no_grad():
            assert generate(compiled, [[5, 6, 7]], 4) == generate(eager, [[5, 6, 7]], 4)
            compiled(torch.tensor([[1, 2, 3]]))
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
