"""The training loop: loss masking, token-weighted accumulation, exact resume, torchrun (gloo, CPU)
against one process, bad input, and the checkpoint it writes (transformers is a test-only oracle).

Every run is tiny (1 layer, width 32, 32 rows) so the whole file stays well under a minute on 2 cores;
runs go through train.main / train.run in-process, and through a subprocess only where an exit code,
a fresh interpreter or torchrun is the point. Subprocesses of one test are started together.
"""
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import data  # noqa: E402
import plumbing.runs as plumbing  # noqa: E402
from plumbing.device import fitting_batch  # noqa: E402
from plumbing.tokenizer import byte_tokenizer  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig, from_pretrained, save_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY = ["--init", "scratch", "--task", "arith", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--block-size", "64", "--save-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is faster on 2 shared cores (restored for other modules)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_jsonl(path: Path, examples):
    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """train.jsonl (32 rows, 4 global batches of 8) and dev.jsonl (8 rows), all within 64 tokens."""
    d = tmp_path_factory.mktemp("data")
    train_ex = data.builtin_task(32, seed=0, terms=(2, 4))
    dev_ex = data.builtin_task(8, seed=1, terms=(2, 4))
    tok = byte_tokenizer()
    for ex in train_ex + dev_ex:  # x ++ y and f(x, y) + 1 fit, so nothing is truncated
        r = data.encode_example(ex, tok, "arith")
        assert len(r.prompt) + len(r.response) <= 64 and len(r.ref_prompt) + 1 <= 64
    return write_jsonl(d / "train.jsonl", train_ex), write_jsonl(d / "dev.jsonl", dev_ex)


def tiny_args(files, out, *extra, batch=8, micro=4):
    tr, dev = files
    return [*TINY, "--data", str(tr), "--eval-data", str(dev), "--out", str(out),
            "--batch-size", str(batch), "--micro-batch-size", str(micro), *map(str, extra)]


def weights(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


def tiny_gpt(seed=0, vocab=64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(arch="llama", vocab_size=vocab, block_size=64, n_layer=1, n_head=2, n_embd=32,
                         bias=False, tie_embeddings=True)).float()


def sub_env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def start(cmd, cwd=ROOT):
    # its own session, so a hung torchrun can be ended with all its workers
    return subprocess.Popen(cmd, cwd=cwd, env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)


def finish(proc, timeout=120):
    """(returncode, stdout, stderr); a process still running after `timeout` s is killed and reported."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[test] killed after {timeout} s: the run hung"
    return proc.returncode, out, err


# ----------------------------------------------------------------------------------------------
# 1. Prompt and padding positions never reach the loss


class HiddenSpy(torch.nn.Module):
    """Wraps a GPT so the test can read d(loss)/d(final hidden states) after step_loss's backward.
    A position's logits depend on its own final hidden state alone, so a position whose hidden
    state gets no gradient got none through its logits either."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.hidden, self.logits_dtype = None, None
        model.ln_f.register_forward_hook(self.keep)
        model.lm_head.register_forward_hook(self.head)

    def keep(self, module, inputs, out):
        if out.requires_grad:
            out.retain_grad()
        self.hidden = out

    def head(self, module, inputs, out):
        self.logits_dtype = out.dtype

    def forward(self, x, **kw):
        return self.model(x, **kw)


def spy_collate(monkeypatch, new_pad=None, scramble_masked_targets=False, seed=0):
    """Replace train.collate: record its output; optionally pad with another id, and write random
    tokens into every target whose mask is 0 (prompt positions and padding)."""
    seen = {}
    g = torch.Generator().manual_seed(seed)

    def fake(prompts, inputs, targets, pad_id, masks=None, device="cpu"):
        x, y, m = data.collate(prompts, inputs, targets, pad_id if new_pad is None else new_pad, masks=masks,
                               device=device)
        if scramble_masked_targets:
            y = torch.where(m == 0, torch.randint(0, 64, y.shape, generator=g), y)
        seen.update(x=x, y=y, mask=m)
        return x, y, m

    monkeypatch.setattr(train, "collate", fake)
    return seen


def two_rows():
    # row 0: short prompt, long response; row 1: long prompt, short response, so row 1 is padded
    return [data.Row([5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 63], [1], None, ""),
            data.Row([30, 31, 32, 33, 34, 35, 36, 37], [40, 63], [1], None, "")]


def test_prompt_and_padding_get_no_gradient(monkeypatch):
    rows = two_rows()
    model = HiddenSpy(tiny_gpt())
    seen = spy_collate(monkeypatch)
    sft, aux = train.loss_rows(rows, [0, 1], None)
    assert aux == []
    denom = train.sft_tokens(rows, [0, 1])
    assert denom == 12 + 2
    terms, n_tok = train.step_loss(model, sft, aux, denom, 0.0, CPU)
    terms.sum().backward()

    # the mask is exactly the response positions: position P-1+j predicts response[j]
    expected = torch.zeros(2, 14)
    for i, r in enumerate(rows):
        expected[i, len(r.prompt) - 1:len(r.prompt) - 1 + len(r.response)] = 1
    assert torch.equal(seen["mask"], expected)
    assert n_tok == (3 + 12 - 1) + (8 + 2 - 1)  # every token the forward reads, prompts included
    grad = model.hidden.grad
    assert grad is not None and grad.shape[:2] == (2, 14)
    masked = seen["mask"] == 0
    assert masked[1, -5:].all() and masked[0, :2].all()  # there is padding and there are prompt positions
    assert torch.count_nonzero(grad[masked]) == 0, "a prompt or padding position got a gradient"
    assert (grad[~masked].abs().sum(-1) > 0).all(), "a response position got no gradient"

    # the value: mean NLL over the 14 response tokens, each row scored on its own unpadded sequence
    with torch.no_grad():
        nll = 0.0
        for r in rows:
            seq = torch.tensor([r.prompt + r.response[:-1]])
            logp = model.model(seq)[0].log_softmax(-1)
            P = len(r.prompt)
            nll -= sum(logp[P - 1 + j, t].item() for j, t in enumerate(r.response))
    assert terms[0].item() == pytest.approx(nll / 14, rel=1e-5)
    assert terms[1].item() == 0.0


def test_loss_unchanged_by_pad_id_and_prompt_targets(monkeypatch):
    rows = two_rows()
    model = tiny_gpt()
    sft, aux = train.loss_rows(rows, [0, 1], None)
    counts = train.sft_tokens(rows, [0, 1])
    with torch.no_grad():
        spy_collate(monkeypatch)
        base, _ = train.step_loss(model, sft, aux, counts, 0.0, CPU)
        for pad in (1, 17, 63):
            seen = spy_collate(monkeypatch, new_pad=pad, scramble_masked_targets=True, seed=pad)
            other, _ = train.step_loss(model, sft, aux, counts, 0.0, CPU)
            assert (seen["x"][1, -5:] == pad).all()
            torch.testing.assert_close(other, base, rtol=0, atol=1e-6)
        # the check is sharp: changing one scored target does change the loss
        spy_collate(monkeypatch)
        changed = [r._replace(targets=r.targets[:-1] + [(r.targets[-1] + 1) % 64]) for r in sft]
        moved, _ = train.step_loss(model, changed, aux, counts, 0.0, CPU)
        assert abs(moved[0].item() - base[0].item()) > 1e-4


def test_rac_unmasked_positions_get_no_gradient(monkeypatch):
    """Eq. 7: only positions with z̄ != z are scored; the others behave like the prompt."""
    rows = two_rows()
    offline = {0: train.TrainRow(rows[0].prompt, [10, 9, 12, 8, 14], [10, 11, 12, 13, 14], [0, 1, 0, 1, 0]),
               1: train.TrainRow(rows[1].prompt, [40, 63], [40, 63], [0, 0])}
    model = HiddenSpy(tiny_gpt())
    seen = spy_collate(monkeypatch)
    sft, aux = train.loss_rows(rows, [0, 1], offline)
    assert len(aux) == 1  # the row with no correction adds nothing
    denom = train.sft_tokens(rows, [0, 1])
    assert denom == 14
    terms, _ = train.step_loss(model, sft, aux, denom, 0.0, CPU)
    terms[1].backward()
    g = model.hidden.grad[2]  # the RAC row comes after the two SFT rows
    scored = seen["mask"][2] == 1
    assert scored.nonzero().flatten().tolist() == [len(rows[0].prompt) - 1 + 1, len(rows[0].prompt) - 1 + 3]
    assert torch.count_nonzero(g[~scored]) == 0
    assert (g[scored].abs().sum(-1) > 0).all()
    assert torch.count_nonzero(model.hidden.grad[:2]) == 0  # terms[1] alone never touches the SFT rows


# ----------------------------------------------------------------------------------------------
# 2. Token-weighted accumulation equals one big batch; a mean of micro-batch means does not


RESPONSE_LENGTHS = [1, 40, 2, 3, 33, 5, 1, 24]


def varied_rows(seed=0):
    rng = random.Random(seed)
    rows, offline_bash, offline_rac = [], {}, {}
    for i, n in enumerate(RESPONSE_LENGTHS):
        prompt = [rng.randrange(1, 63) for _ in range(rng.randint(1, 6))]
        resp = [rng.randrange(1, 63) for _ in range(n - 1)] + [63]
        rows.append(data.Row(prompt, resp, prompt, None, ""))
        offline_bash[i] = train.TrainRow(prompt, [t if rng.random() < 0.7 else rng.randrange(1, 63) for t in resp],
                                         resp, [1] * len(resp), [rng.random() < 0.3 for _ in resp])
        z = [rng.randrange(1, 64) for _ in range(rng.randint(1, 30))]
        mask = [int(rng.random() < 0.4) for _ in z] if i % 3 else [0] * len(z)  # some rows: no correction
        offline_rac[i] = train.TrainRow(prompt, z, [rng.randrange(1, 64) if m else t for t, m in zip(z, mask)], mask)
    return rows, {"sft": None, "bash": offline_bash, "rac": offline_rac}


def accumulated_grads(model, rows, idx, method, offline, mb, term, naive=False):
    """The train loop's accumulation: loss_rows over the global batch, sliced into micro-batches.
    naive: each micro-batch normalised by its own SFT tokens, then averaged over micro-batches."""
    model.zero_grad(set_to_none=True)
    sft, aux = train.loss_rows(rows, idx, offline)
    counts = train.sft_tokens(rows, idx)
    n_micro = max(-(-len(sft) // mb), -(-len(aux) // mb))
    total = torch.zeros(2)
    for j in range(n_micro):
        s, a = sft[j * mb:(j + 1) * mb], aux[j * mb:(j + 1) * mb]
        c = sum(sum(r.mask) for r in s) if naive else counts
        terms, _ = train.step_loss(model, s, a, c, 0.0, CPU)
        loss = {"sft": terms[0], "aux": terms[1], "both": terms.sum()}[term]
        (loss / n_micro if naive else loss).backward()
        total += terms.detach()
    return {k: p.grad.clone() for k, p in model.named_parameters()}, total


@pytest.mark.parametrize("method,term", [("sft", "sft"), ("bash", "sft"), ("bash", "aux"), ("bash", "both"),
                                         ("rac", "aux"), ("rac", "both")])
def test_token_weighted_accumulation_matches_one_batch(method, term):
    rows, offline = varied_rows()
    idx = list(range(len(rows)))
    model = tiny_gpt(seed=1)
    assert train.sft_tokens(rows, idx) == sum(RESPONSE_LENGTHS)

    one, loss_one = accumulated_grads(model, rows, idx, method, offline[method], mb=len(rows), term=term)
    four, loss_four = accumulated_grads(model, rows, idx, method, offline[method], mb=2, term=term)
    torch.testing.assert_close(loss_four, loss_one, rtol=0, atol=1e-6)
    for k in one:
        torch.testing.assert_close(four[k], one[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")

    naive, _ = accumulated_grads(model, rows, idx, method, offline[method], mb=2, term=term, naive=True)
    worst = max((naive[k] - one[k]).abs().max().item() for k in one)
    scale = max(one[k].abs().max().item() for k in one)
    assert worst > 0.05 * scale, "a mean of micro-batch means should not equal the token-weighted gradient"


def test_micro_batches_hold_rows_of_like_length(monkeypatch):
    """sft_parts sorts the step's rows by length before slicing them: micro-batches of 2 of the
    lengths above pad to their own longest row, and the parts still add up to one batch."""
    rows, offline = varied_rows()
    idx = list(range(len(rows)))
    model = tiny_gpt(seed=1)
    flags = SimpleNamespace(micro_batch_size=2, neftune_alpha=0.0, precision="fp32")
    run = SimpleNamespace(args=flags, rows=rows, model=model, raw=model)
    seen, step_loss = [], train.step_loss

    def spy(model, sft, method, *rest):
        seen.append(([len(r.prompt) + len(r.inputs) for r in sft],
                     [len(r.prompt) + len(r.inputs) for r in method]))
        return step_loss(model, sft, method, *rest)
    monkeypatch.setattr(train, "step_loss", spy)
    model.zero_grad(set_to_none=True)
    for part in train.sft_parts(run, idx, idx, offline["bash"], train.METHODS["bash"]):
        part()[0].backward()
    parts = {k: p.grad.clone() for k, p in model.named_parameters()}
    lengths = sorted(len(r.prompt) + len(r.response) for r in rows)
    assert [s for s, _ in seen] == [lengths[j:j + 2] for j in range(0, len(rows), 2)]
    assert [m for _, m in seen] == [s for s, _ in seen]  # BASH rows are as long as their SFT rows
    one, _ = accumulated_grads(model, rows, idx, "bash", offline["bash"], len(rows), "both")
    for k in one:
        torch.testing.assert_close(parts[k], one[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_micro_batch_size_does_not_change_training(files, tmp_path):
    """The loop itself: 8 rows per step in 1 micro-batch or in 4 gives the same weights, and so
    does --activation-checkpointing (each block recomputed in backward)."""
    outs = []
    for micro, extra in ((8, []), (2, []), (2, ["--activation-checkpointing"])):
        out = tmp_path / f"mb{micro}{len(extra)}"
        train.main(tiny_args(files, out, "--method", "bash", "--sft-epochs", "1", "--iter-epochs", "1",
                             "--build-batch-size", "64", *extra, batch=8, micro=micro))
        outs.append(weights(out / "checkpoint"))
    for k in outs[0]:
        torch.testing.assert_close(outs[1][k], outs[0][k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(outs[2][k], outs[1][k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_bf16_precision_on_cpu_runs_the_training_forward_in_bf16(files, tmp_path):
    """--precision bf16: the logits come from bf16 matmuls, close to fp32's but not equal, and
    the flag reaches the training loop; auto on a CPU is exactly fp32."""
    rows, model = two_rows(), HiddenSpy(tiny_gpt())
    sft, aux = train.loss_rows(rows, [0, 1], None)
    denom = train.sft_tokens(rows, [0, 1])
    terms = {}
    for precision in ("fp32", "auto", "bf16"):
        terms[precision], _ = train.step_loss(model, sft, aux, denom, 0.0, CPU, precision)
        assert model.logits_dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert torch.equal(terms["auto"], terms["fp32"])
    assert not torch.equal(terms["bf16"], terms["fp32"])
    torch.testing.assert_close(terms["bf16"], terms["fp32"], rtol=2e-2, atol=2e-2)

    ckpts = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        train.main(tiny_args(files, out, "--method", "sft", "--iter-epochs", "1", "--precision",
                             precision))
        ckpts[precision] = weights(out / "checkpoint")
    assert any(not torch.equal(ckpts["bf16"][k], ckpts["fp32"][k]) for k in ckpts["fp32"])


# ----------------------------------------------------------------------------------------------
# Data order and checkpoint files


def test_build_batch_fits_the_memory_budget():
    """--build-memory-gb: the decode batch is cut to the rows whose KV cache (in the compute
    dtype), prefill and logits fit; bf16 fits about twice the rows of fp32."""
    model, rows = tiny_gpt(), two_rows()
    P, new = 8, 10
    # 1 layer, 2 key/value heads of 16, fp32: the cache; the prefill's scores over 2 heads and
    # MLP of 2 x 128; three fp32 copies of 64 logits
    per_row = 2 * 1 * 2 * 16 * (P + new) * 4 + 4 * P * (2 * (P + new) + 2 * 128) + 12 * 64
    assert fitting_batch(model, rows, 256, new, "fp32", 1.0) == 256
    assert fitting_batch(model, rows, 256, new, "fp32", 10 * per_row / 1e9) == 10
    assert fitting_batch(model, rows, 256, new, "fp32", 1e-12) == 1
    assert fitting_batch(model, rows, 256, new, "bf16", 10 * per_row / 1e9) > 10


def test_batch_indices_cover_each_epoch_once():
    n, G, seed = 37, 8, 3
    per_epoch = train.steps_per_epoch(n, G)
    assert per_epoch == 4
    epochs = []
    for e in range(3):
        rows = [train.batch_indices(e * per_epoch + b, n, G, seed) for b in range(per_epoch)]
        assert all(len(r) == G for r in rows)
        flat = [i for r in rows for i in r]
        assert len(set(flat)) == len(flat) == per_epoch * G and set(flat) <= set(range(n))
        epochs.append(flat)
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh shuffle each epoch
    assert train.batch_indices(5, n, G, seed) == train.batch_indices(5, n, G, seed)  # recomputable on resume
    assert train.batch_indices(5, n, G, seed) != train.batch_indices(5, n, G, seed + 1)


def test_save_checkpoint_replaces_atomically(tmp_path):
    model = tiny_gpt(vocab=257)
    opt = torch.optim.AdamW(model.parameters())
    (tmp_path / "checkpoint.tmp").mkdir()  # a stale half-written save from a crash
    (tmp_path / "checkpoint.tmp" / "junk").write_text("x")
    plumbing.save_checkpoint(lambda d: save_pretrained(model, d, {"tiktoken": "bytes"}), opt, {"step": 1}, tmp_path, None)
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    plumbing.save_checkpoint(lambda d: save_pretrained(model, d, {"tiktoken": "bytes"}), opt, {"step": 2}, tmp_path, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    ck = tmp_path / "checkpoint"
    assert {"config.json", "model.safetensors", "train_state.pt"} <= {p.name for p in ck.iterdir()}
    assert torch.load(ck / "train_state.pt", weights_only=True)["step"] == 2
    assert torch.equal(from_pretrained(ck).wte.weight, model.wte.weight)
    assert plumbing.find_checkpoint(tmp_path) == ck
    ck.rename(tmp_path / "checkpoint.old")  # a crash between the two renames: the old one is found
    assert plumbing.find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"


# ----------------------------------------------------------------------------------------------
# 3. Stop and resume is bitwise equal to one uninterrupted run


@pytest.mark.parametrize("method_args,stop", [
    (["--method", "sft", "--iter-epochs", "3"], 6),  # 12 steps; stop in the middle of the second epoch
    (["--method", "bash", "--sft-epochs", "1", "--iterations", "2", "--iter-epochs", "1"], 10),  # inside iteration 2
], ids=["sft", "bash"])
def test_stop_and_resume_is_bitwise_equal(files, tmp_path, method_args, stop):
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(tiny_args(files, a, *method_args))
    train.main(tiny_args(files, b, *method_args, "--stop-after", stop))
    state = torch.load(b / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == stop
    at_stop = weights(b / "checkpoint")
    train.main(tiny_args(files, b, *method_args, "--resume"))

    wa, wb = weights(a / "checkpoint"), weights(b / "checkpoint")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after stop at {stop} and resume"
    assert any(not torch.equal(wa[k], at_stop[k]) for k in wa), "the resumed run did not train"
    assert torch.load(b / "checkpoint" / "train_state.pt", weights_only=True)["step"] == 12

    def train_steps(out):
        recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if "loss" in r]
    assert [s for s, _ in train_steps(b)] == list(range(1, 13))  # every step once: resume did not restart
    assert train_steps(b) == train_steps(a)  # the same losses, logged step by step


# ----------------------------------------------------------------------------------------------
# 4. Two processes under torchrun (gloo) match one process on the same global batch


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py", *args]


DIST_RUNS = {  # name: (method args, steps); global batch 8, micro-batch 2: 4 micro-batches on 1 process, 2 on each of 2
    "sft": (["--method", "sft", "--iter-epochs", "2"], 8),
    "bash": (["--method", "bash", "--sft-epochs", "1", "--iterations", "1", "--iter-epochs", "1"], 8),
}


@pytest.fixture(scope="module")
def dist_runs(files, tmp_path_factory):
    """Each DIST_RUNS case as `python train.py` and as torchrun with 2 processes, without --eval-data;
    plus a torchrun with --eval-data. All started together: they are mostly interpreter start-up."""
    root = tmp_path_factory.mktemp("dist")
    procs = {}
    for name, (method_args, _) in DIST_RUNS.items():
        for n in (1, 2):
            out = root / f"{name}-{n}"
            args = [*TINY, "--data", str(files[0]), "--out", str(out), "--batch-size", "8", "--micro-batch-size", "2",
                    *method_args]
            procs[name, n] = (out, start(torchrun_cmd(args) if n == 2 else [sys.executable, "train.py", *args]))
    out = root / "eval-2"
    procs["eval", 2] = (out, start(torchrun_cmd(tiny_args(files, out, "--method", "sft", "--iter-epochs", "1",
                                                          batch=8, micro=2))))
    # --fsdp (FSDP2 over gloo) on bash: trains, builds its offline set and evaluates sharded; and
    # the same run stopped inside its iteration, to be resumed
    for name, extra in (("bash", ["--eval-data", str(files[1])]), ("stop", ["--stop-after", "5"])):
        out = root / f"{name}-fsdp"
        procs[name, "fsdp"] = (out, start(torchrun_cmd(fsdp_args(files, out, *extra))))
    return {key: (out, *finish(p, timeout=180)) for key, (out, p) in procs.items()}


def fsdp_args(files, out, *extra):
    return [*TINY, "--data", str(files[0]), "--out", str(out), "--batch-size", "8", "--micro-batch-size", "2",
            *DIST_RUNS["bash"][0], "--fsdp", *extra]


def check_dist_run(dist_runs, key):
    out, rc, _, err = dist_runs[key]
    what = {1: "one process", 2: "torchrun with 2 gloo processes"}.get(key[1], "torchrun --fsdp, 2 processes")
    assert rc == 0, f"{what} failed (rc {rc}):\n{err[-5000:]}"
    return out


def check_log(out, total):
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, total + 1)), f"expected one line per step from rank 0 only, got steps {steps}"


@pytest.mark.parametrize("name", list(DIST_RUNS))
def test_torchrun_two_processes_match_one(dist_runs, name):
    one, two = check_dist_run(dist_runs, (name, 1)), check_dist_run(dist_runs, (name, 2))
    check_log(two, DIST_RUNS[name][1])
    w1, w2 = weights(one / "checkpoint"), weights(two / "checkpoint")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_fsdp_two_processes_match_one(dist_runs):
    """--fsdp: parameters, gradients and AdamW's state sharded over 2 processes; the same weights
    as one process on the same global batch (SFT steps, BASH's offline set built from a gathered
    copy, BASH steps), written whole in the Hugging Face layout; evaluation ran at both phases."""
    one, two = check_dist_run(dist_runs, ("bash", 1)), check_dist_run(dist_runs, ("bash", "fsdp"))
    check_log(two, DIST_RUNS["bash"][1])
    w1, w2 = weights(one / "checkpoint"), weights(two / "checkpoint")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    recs = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert sum("val_loss" in r for r in recs) == 2


def test_fsdp_stop_and_resume_is_exact(dist_runs, files):
    """Stopped after 5 of 8 steps (inside BASH's iteration), resumed under --fsdp (the gathered
    optimizer state sharded again): the uninterrupted --fsdp run's weights, bit for bit; the
    checkpoint loads in transformers."""
    out = check_dist_run(dist_runs, ("stop", "fsdp"))
    assert torch.load(out / "checkpoint" / "train_state.pt", weights_only=True)["step"] == 5
    rc, _, err = finish(start(torchrun_cmd(fsdp_args(files, out, "--resume"))), timeout=180)
    assert rc == 0, err[-5000:]
    whole = check_dist_run(dist_runs, ("bash", "fsdp"))
    wa, wb = weights(whole / "checkpoint"), weights(out / "checkpoint")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after stop and resume under --fsdp"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "checkpoint", torch_dtype=torch.float32).eval()
    ids = torch.tensor([list(b"12+34-5=12+34=46,46-5=41 #### 41")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, from_pretrained(out / "checkpoint")(ids), rtol=0, atol=1e-5)


def test_a_two_process_run_is_not_resumed_in_one(dist_runs, files, tmp_path):
    """Their floating-point sums differ: run.json records the world size and --resume compares it."""
    two = check_dist_run(dist_runs, ("sft", 2))
    out = tmp_path / "run"
    shutil.copytree(two, out)
    args = [*TINY, "--data", str(files[0]), "--out", str(out), "--batch-size", "8",
            "--micro-batch-size", "2", *DIST_RUNS["sft"][0], "--resume"]
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert "world_size 1 (saved: 2)" in str(e.value.code), e.value.code


def test_torchrun_with_eval_data_finishes(dist_runs):
    """Evaluation runs on rank 0 only; every rank must still reach the same barriers."""
    out = check_dist_run(dist_runs, ("eval", 2))
    check_log(out, 4)
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum("val_loss" in r for r in recs) == 1


# ----------------------------------------------------------------------------------------------
# 5. Bad input: a message naming the file and line, a non-zero exit, nothing written


GOOD = '{"prompt": "12+34=", "response": "12+34=46 #### 46"}\n{"prompt": "5+6=", "response": "5+6=11 #### 11"}\n'
OVER = ["--max-len", "40", "--overflow", "fail"]
BAD_LINE3 = {
    "malformed_json": ('{"prompt": "1+1=", "response": "2"\n', []),
    "missing_response": ('{"prompt": "1+1="}\n', []),
    "empty_response": ('{"prompt": "1+1=", "response": "   "}\n', []),
    "not_utf8": (b'{"prompt": "1+1=\xff\xfe", "response": "2"}\n', []),
    "prompt_over_max_len": ('{"prompt": "' + "1+" * 30 + '1=", "response": "61"}\n', OVER),
    "response_over_max_len": ('{"prompt": "1+1=", "response": "' + "2" * 50 + '"}\n', OVER),
}


def bad_case(root: Path, case: str):
    """(the file at fault, out dir, argv) for one bad-input case."""
    out = root / f"out_{case}"
    if case == "bad_eval_file":  # the fault is in --eval-data: the message must name that file
        good, path = root / "good.jsonl", root / "bad_dev.jsonl"
        good.write_text(GOOD * 4)
        path.write_text(GOOD + BAD_LINE3["malformed_json"][0])
        return path, out, [*TINY, "--data", str(good), "--eval-data", str(path), "--out", str(out),
                           "--batch-size", "2", "--micro-batch-size", "2"]
    line3, extra = BAD_LINE3[case]
    path = root / f"bad_{case}.jsonl"
    path.write_bytes(GOOD.encode() + (line3 if isinstance(line3, bytes) else line3.encode()))
    return path, out, [*TINY, "--data", str(path), "--out", str(out), "--batch-size", "2", "--micro-batch-size", "2",
                       *extra]


def assert_clean_failure(case, path, out, message):
    assert "Traceback" not in message, f"{case}: a traceback instead of a message:\n{message[-2000:]}"
    assert path.name in message, f"{case}: message does not name {path.name}: {message.strip()[-500:]!r}"
    assert re.search(r"(:3\b|\bline 3\b)", message), f"{case}: message does not name line 3: {message.strip()[-500:]!r}"
    left = list(out.rglob("*")) if out.exists() else []
    assert not [p for p in left if p.is_file() or p.name.startswith("checkpoint")], f"{case}: left {left}"


@pytest.mark.parametrize("case", [*BAD_LINE3, "bad_eval_file"])
def test_bad_input_names_file_and_line(tmp_path, case):
    """In-process: main() exits through sys.exit(message), which a process reports with status 1."""
    path, out, argv = bad_case(tmp_path, case)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert isinstance(e.value.code, str) or e.value.code not in (0, None), f"{case}: exit status 0"
    assert_clean_failure(case, path, out, str(e.value.code))


@pytest.mark.parametrize("case", ["not_utf8", "prompt_over_max_len"])
def test_bad_input_subprocess_exit_code(tmp_path, case):
    path, out, argv = bad_case(tmp_path, case)
    rc, _, err = finish(start([sys.executable, "train.py", *argv]))
    assert rc != 0, f"{case}: exit 0 on bad input"
    assert_clean_failure(case, path, out, err)


def test_init_without_config_fails_clearly(files, tmp_path):
    empty = tmp_path / "no_config_here"
    (empty / "sub").mkdir(parents=True)
    out = tmp_path / "out"
    rc, _, err = finish(start([sys.executable, "train.py", *TINY[2:], "--init", str(empty), "--data", str(files[0]),
                               "--out", str(out)]))
    assert rc != 0
    assert "Traceback" not in err, err[-2000:]
    assert str(empty) in err and "config.json" in err, err.strip()[-500:]
    assert not out.exists() or not any(out.rglob("*"))


# ----------------------------------------------------------------------------------------------
# 6. The checkpoint loads in transformers with equal logits, and generate.py samples from it


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    res, model = train.run(train.get_args(tiny_args(files, out, "--method", "sft", "--iter-epochs", "1")))
    assert res["steps"] == 4
    return out / "checkpoint", model.eval()


def test_checkpoint_loads_in_transformers(trained):
    transformers = pytest.importorskip("transformers")
    ckpt, model = trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    ids = torch.tensor([list(b"12+34-5=12+34=46,46-5=41 #### 41"), list(b"99-98+7=99-98=1,1+7=8 #### 8 .\n<")])
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
        reloaded = from_pretrained(ckpt)(ids)
    assert theirs.shape == ours.shape == (2, ids.shape[1], 257)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(reloaded, ours, rtol=0, atol=0)


def test_generate_cli_runs_on_trained_checkpoint(trained):
    ckpt, _ = trained
    rc, out, err = finish(start([sys.executable, "generate.py", "--init", str(ckpt), "--prompt", "12+34=",
                                 "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]))
    assert rc == 0, err[-3000:]
    assert out.startswith("12+34=") and len(out.strip()) > len("12+34="), repr(out)


def test_eval_samples_average_strict_accuracy(tmp_path):
    """--eval-temperature 0.1 --eval-samples 3 (the paper's math evaluation): accuracy is the mean
    over the samples of strict matches (the number after '####'), accuracy_sd their spread, and
    the last-number fallback is counted apart, as accuracy_lenient; greedy once is the default."""
    rows = [{"prompt": f"{i}?", "response": f"#### {3 + 4 * (i % 2)}"} for i in range(32)]
    path, taught = tmp_path / "hashes.jsonl", tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a quarter of the training replies say "so 7" (7: right for those prompts, but no '####')
    taught.write_text("".join(json.dumps({**r, "response": "so 7"} if i % 4 == 1 else r) + "\n"
                              for i, r in enumerate(rows)))
    out = tmp_path / "run"
    argv = [*TINY, "--data", str(taught), "--eval-data", str(path), "--out", str(out), "--method",
            "sft", "--iter-epochs", "12", "--lr", "1e-2", "--batch-size", "8",
            "--micro-batch-size", "8", "--eval-temperature", "1.0", "--eval-samples", "3", "--seed", "5"]
    res, model = train.run(train.get_args(argv))
    model.eval()
    tok = byte_tokenizer()
    enc, _ = data.load_rows(path, tok, "arith", 64, "fail", False)
    runs = [train.generate_answers(model, enc, tok, 256, None, 1.0, train.seed_for(5, "eval", s))
            for s in range(3)]
    truth = [r["response"].split()[-1] for r in rows]

    def after_hashes(t):  # the digits right after the last '####', or None
        found = re.match(r"\s*(\d+)", t.rsplit("####", 1)[1]) if "####" in t else None
        return found and found[1]
    strict = [sum(after_hashes(t) == a for t, a in zip(texts, truth)) / 32 for texts in runs]
    lenient = [sum((after_hashes(t) if "####" in t else (re.findall(r"\d+", t) or [None])[-1]) == a
                   for t, a in zip(texts, truth)) / 32 for texts in runs]
    assert 0 < min(strict) and len(set(strict)) > 1  # the samples differ: the mean is a mean
    assert res["accuracy"] == pytest.approx(sum(strict) / 3)
    assert res["accuracy_sd"] == pytest.approx(torch.tensor(strict).std().item())
    assert res["accuracy_lenient"] == pytest.approx(sum(lenient) / 3)
    assert res["accuracy_lenient"] > res["accuracy"]  # e.g. "### 7" counts only when lenient

    greedy = train.evaluate(model, enc, tok, "arith", 8, 256)
    once = train.generate_answers(model, enc, tok, 256)
    assert "accuracy_sd" not in greedy
    assert greedy["accuracy"] == sum(after_hashes(t) == a for t, a in zip(once, truth)) / 32


# ----------------------------------------------------------------------------------------------
# 7. --help


def test_help():
    rc, out, err = finish(start([sys.executable, "train.py", "--help"]))
    assert rc == 0, err
    for flag in ("--method", "--init", "--data", "--resume", "--micro-batch-size"):
        assert flag in out


# ----------------------------------------------------------------------------------------------
# 8. First contact: defaults a user never chose, and a scratch checkpoint other tools read


def test_batch_size_alone_trains(files, tmp_path):
    """--batch-size 8 with no --micro-batch-size: the micro-batch follows the batch (at most 64)."""
    tr, _ = files
    args = train.get_args([*TINY, "--data", str(tr), "--out", str(tmp_path / "o"), "--batch-size", "8"])
    assert args.micro_batch_size == 8
    assert train.get_args([*TINY, "--data", str(tr), "--batch-size", "512"]).micro_batch_size == 64
    res, _ = train.run(args)
    assert res["steps"] == 4


def test_transformers_generate_stops_on_a_scratch_checkpoints_end_of_text(tmp_path):
    """A scratch checkpoint names the tokenizer's own end-of-text in config.json, so transformers'
    generate stops on it exactly where ours does (with eos_token_id null it ran on to the cap)."""
    transformers = pytest.importorskip("transformers")
    from generate import generate
    d = tmp_path / "stop.jsonl"  # answers of 1-3 bytes: a few steps teach the model to stop
    d.write_text("".join(json.dumps({"prompt": f"{a}=", "response": "xyz"[:1 + a % 3]}) + "\n"
                         for a in range(32)))
    res, model = train.run(train.get_args([*TINY, "--data", str(d), "--out", str(tmp_path / "o"),
                                           "--batch-size", "8", "--iter-epochs", "12",
                                           "--lr", "1e-2"]))
    ckpt = tmp_path / "o" / "checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    eos = byte_tokenizer().eos_id
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (eos, eos, eos)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    stopped = 0
    for a in (4, 5, 6, 7):
        prompt = list(f"{a}=".encode())
        ours = generate(model.eval(), [prompt], 20, eos_id=eos)[0]
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0]
        assert theirs[len(prompt):].tolist() == ours, (a, ours)
        stopped += ours[-1] == eos and len(ours) < 20
    assert stopped == 4  # every answer ended on end-of-text before the cap
