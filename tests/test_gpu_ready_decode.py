"""Decoding ready for a GPU, checked on the CPU (issue 32, items 2, 3, 4, 7 and the fixed-shape
step): no dtype round trips of the KV cache under bf16 autocast, the caller's precision reaching
decode, the decode batch sized from the device's free memory in the cache's real dtype, at most one
host sync per decoded token, and --compile-decode's fixed-shape step giving the eager path's and
transformers' tokens."""
import collections
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import generate as generate_module
import plumbing.decode_step as decode_step
import plumbing.device as device_module
import train
from generate import bash_mix, decode, generate, rac_labels
from model import GPT, GPTConfig, from_pretrained, save_pretrained
from plumbing.device import BUILD_BYTES, autocast, decode_bytes, decode_rows, fitting_batch
from test_generate import NEW, PROMPTS, cut_after, hf_greedy, pick_eos
from test_train import tiny_args, weights, write_jsonl

BF16 = torch.bfloat16


def tiny_llama(seed=0, **kw):
    """Grouped-query attention (4 query heads, 2 key/value heads of 8), random weights."""
    torch.manual_seed(seed)
    cfg = dict(arch="llama", vocab_size=128, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
               n_embd=32)
    return GPT(GPTConfig(**cfg | kw)).eval()


def cpu_autocast():
    return torch.autocast("cpu", dtype=BF16)


class Ops(TorchDispatchMode):
    """Every aten op under the mode, with its tensor arguments, for counting."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func.overloadpacket.__name__, args, out))
        return out


def dtype_copies(calls):
    """(source shape, source dtype, result dtype) of every copy between two float dtypes: `to` /
    `_to_copy` that made a new tensor, and copy_ across dtypes."""
    found = []
    for name, args, out in calls:
        if name in ("to", "_to_copy") and isinstance(out, torch.Tensor) and out is not args[0]:
            src = args[0]
        elif name == "copy_":
            src, out = args[1], args[0]
        else:
            continue
        if src.dtype.is_floating_point and out.dtype != src.dtype:
            found.append((tuple(src.shape), src.dtype, out.dtype))
    return found


def is_bool(t):
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def syncs(calls):
    """The ops that wait for the device on CUDA: a value read on the host (item, bool(tensor),
    tolist's per-element reads), nonzero, and the boolean indexing that needs nonzero."""
    n = 0
    for name, args, _ in calls:
        if name in ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select"):
            n += 1
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            n += any(is_bool(i) for i in args[1] if i is not None)
    return n


# ----------------------------------------------------------------------------------------------
# item 2: the KV cache, q, k and v in one dtype under bf16 autocast


def test_no_cache_dtype_round_trip_under_bf16_autocast():
    """Under bf16 autocast the cache is bf16; fp32 rotary tables made q and k fp32, so every layer
    of every step copied the cache prefix (B, H_kv, T, D) up to fp32 and back down for SDPA.
    Now no tensor of a prefix's shape changes dtype, and SDPA gets bf16 q, k, v."""
    model = tiny_llama()
    cfg, steps = model.config, 6
    with cpu_autocast(), Ops() as ops:
        generate(model, PROMPTS, steps)
    prefix = [(s, a, b) for s, a, b in dtype_copies(ops.calls)
              if len(s) == 4 and s[1] == cfg.n_kv_head and s[3] == cfg.head_dim and s[2] > 1]
    assert prefix == [], f"{len(prefix)} cache-prefix dtype copies, e.g. {prefix[:2]}"
    sdpa = [[a.dtype for a in args[:3]] for name, args, _ in ops.calls
            if "scaled_dot_product" in name]
    assert len(sdpa) == cfg.n_layer * steps  # the prefill and steps - 1 decode steps
    assert all(d == [BF16] * 3 for d in sdpa), sdpa


def test_each_weight_cast_once_per_autocast_context():
    """Under inference_mode autocast's cache of bf16 weight copies is off: every Linear weight was
    cast to bf16 again at every step (fp32 read + bf16 write + bf16 read per parameter, a few
    times the memory traffic of a bf16 step on a GPU). decode runs under no_grad: once each."""
    model = tiny_llama()
    shapes = collections.Counter(tuple(m.weight.shape) for m in model.modules()
                                 if isinstance(m, torch.nn.Linear))
    with cpu_autocast(), Ops() as ops:
        generate(model, PROMPTS, 6)
        rac_labels(model, PROMPTS, PROMPTS, 4, temperature=0.0)
    casts = collections.Counter(s for s, a, b in dtype_copies(ops.calls)
                                if a == torch.float32 and b == BF16 and s in shapes)
    assert casts and all(casts[s] <= n for s, n in shapes.items()), (casts, shapes)


def test_fp32_decoding_makes_no_dtype_copy():
    model = tiny_llama()
    with Ops() as ops:
        generate(model, PROMPTS, 4)
    assert dtype_copies(ops.calls) == []


# ----------------------------------------------------------------------------------------------
# item 3: decode and rac_labels follow the caller's precision


def as_if_cuda(device, precision="auto"):
    """plumbing.device.autocast deciding as on a CUDA device: "auto" is bf16."""
    return autocast(device, "bf16" if precision == "auto" else precision)


def mlp_dtypes(model):
    """The dtype each forward computed in (the first MLP's output: its Linear layers are packed
    on a CPU, not the MLP)."""
    seen = []
    model.h[0].mlp.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", BF16)])
def test_decoding_follows_the_callers_precision(monkeypatch, precision, dtype):
    """On CUDA decode and rac_labels entered autocast(device) themselves, so --precision fp32
    still decoded in bf16 (shown here with autocast deciding as on CUDA)."""
    monkeypatch.setattr(generate_module, "autocast", as_if_cuda)
    monkeypatch.setattr(device_module, "autocast", as_if_cuda)
    model = tiny_llama()
    seen = mlp_dtypes(model)
    with autocast(model.device, precision):  # what train.py's callers enter
        generate(model, PROMPTS, 3)
        bash_mix(model, PROMPTS, [[1, 2, 3]] * len(PROMPTS), beta=1.0, seed=0)
        rac_labels(model, PROMPTS, PROMPTS, 3, seed=0)
    assert len(seen) >= 3 + 3 + 3 and set(seen) == {dtype}


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", BF16)])
def test_generate_command_takes_a_precision(byte_ckpt, monkeypatch, precision, dtype):
    """generate.py --precision: the cache and the logits in that dtype (default auto)."""
    made = []
    real_decode = generate_module.decode

    def spy(model, *a, **k):
        made.append(generate_module.compute_dtype(model))
        return real_decode(model, *a, **k)

    monkeypatch.setattr(generate_module, "decode", spy)
    path = byte_ckpt
    generate_module.main(["--init", str(path), "--prompt", "ab", "--max-new-tokens", "3",
                          "--num-samples", "2", "--device", "cpu", "--precision", precision])
    assert made == [dtype]


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory):
    """A tiny random llama with the byte tokenizer, as train.py saves it: generate.py's input."""
    path = tmp_path_factory.mktemp("bytes")
    save_pretrained(tiny_llama(vocab_size=257), path, {"tiktoken": "bytes"})
    return path


# ----------------------------------------------------------------------------------------------
# item 4: the decode batch from the device's free memory, in the cache's real dtype

PYTHIA_1B = GPTConfig(arch="gpt_neox", vocab_size=50304, block_size=2048, n_layer=16, n_head=8,
                      n_embd=2048, rotary_pct=0.25)


def gsm_rows(n=4, prompt=200):
    return [SimpleNamespace(prompt=[1] * prompt) for _ in range(n)]


def on(device_type, cfg=PYTHIA_1B):
    """What fitting_batch reads of a model (config, device, weights' dtype), on any device."""
    return SimpleNamespace(config=cfg, device=torch.device(device_type), dtype=torch.float32)


def test_cuda_decode_batch_is_sized_from_free_memory(monkeypatch):
    """With --build-memory-gb not given: on CUDA FREE_SHARE of the free memory (a stand-in for
    torch.cuda.mem_get_info: 60 GB), in bf16, the cache's dtype under autocast; on a CPU the
    1 GB of before. The old 1 GB default gave Pythia-1B 12 rows on GSM8K-length rows."""
    free = 60e9
    monkeypatch.setattr(device_module, "free_memory", lambda device: free)
    P, new = 200, 300
    cuda = fitting_batch(on("cuda"), gsm_rows(), 256, new, "auto", None)
    assert cuda == min(256, decode_rows(PYTHIA_1B, P, P + new, 2, int(0.8 * free))) == 256
    gb1 = fitting_batch(on("cuda"), gsm_rows(), 256, new, "auto", 1.0)  # asked for: kept
    assert gb1 == decode_rows(PYTHIA_1B, P, P + new, 2, int(1e9)) == 12
    most = fitting_batch(on("cuda"), gsm_rows(), 4096, new, "auto", None)
    assert most == decode_rows(PYTHIA_1B, P, P + new, 2, int(0.8 * free)) > 256
    fp32 = fitting_batch(on("cuda"), gsm_rows(), 4096, new, "fp32", None)  # fp32's cache
    assert fp32 == decode_rows(PYTHIA_1B, P, P + new, 4, int(0.8 * free)) < most

    def no_cuda(device):
        raise AssertionError("a CPU's batch must not depend on the machine")

    monkeypatch.setattr(device_module, "free_memory", no_cuda)
    assert fitting_batch(on("cpu"), gsm_rows(), 256, new, "auto", None) == \
        decode_rows(PYTHIA_1B, P, P + new, 4, BUILD_BYTES)


def test_free_memory_counts_what_the_allocator_holds_unused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100, 1000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 70)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 50)
    assert device_module.free_memory("cuda") == 120


def test_train_build_memory_defaults_to_the_device():
    args = train.get_args(["--init", "scratch", "--data", "x.jsonl", "--method", "bash"])
    assert args.build_memory_gb is None


def test_decode_bytes_in_the_cache_dtype(byte_ckpt, monkeypatch):
    """generate.py's --num-samples check counted an fp32 cache on CUDA too (2x over in bf16)."""
    model = tiny_llama()
    cfg = model.config
    cache = 2 * cfg.n_layer * 3 * cfg.n_kv_head * 10 * cfg.head_dim  # elements
    fp32 = decode_bytes(model, 3, 10)
    with cpu_autocast():
        assert fp32 - decode_bytes(model, 3, 10) == cache * 2
    needs = []
    monkeypatch.setattr(generate_module, "check_memory", lambda need, *a: needs.append(need))
    path = byte_ckpt
    for precision in ("fp32", "bf16"):
        generate_module.main(["--init", str(path), "--prompt", "abc", "--max-new-tokens", "5",
                              "--num-samples", "3", "--device", "cpu", "--precision", precision])
    model = from_pretrained(path)
    fp32 = decode_bytes(model, 3, 8)
    with cpu_autocast():
        assert needs == [fp32, decode_bytes(model, 3, 8)] and needs[0] > needs[1]


# ----------------------------------------------------------------------------------------------
# item 7: at most one host sync per decoded token


def test_bash_mixing_syncs_once_per_token():
    """BASH's mixing selected the rows that take z^j with a boolean mask, twice a step
    (h[took[:, t]] and y_hat[took[:, t]] = ...), each a nonzero that waits for the device. Now
    the rows are indices made once, and the only wait left is the end-of-text check."""
    model = tiny_llama()
    responses = [[3] * 9, [4] * 7, [5] * 9, [6] * 8]
    with Ops() as ops:
        out = bash_mix(model, PROMPTS, responses, beta=0.5, seed=0)
    assert any(any(t) for t in out[1]) and not all(all(t) for t in out[1])
    steps = max(map(len, responses))
    assert syncs(ops.calls) <= steps, f"{syncs(ops.calls)} syncs for {steps} tokens"


def test_generate_syncs_once_per_token():
    model = tiny_llama()
    for kwargs in (dict(), dict(temperature=1.0, top_k=5, seed=0), dict(temperature=1.0,
                                                                            top_p=0.9, seed=0)):
        with Ops() as ops:
            generate(model, PROMPTS, 8, **kwargs)
        assert syncs(ops.calls) <= 8, kwargs


def test_bash_mix_keeps_y_where_the_coin_does_not_take():
    """Eq. 4 with the row indices: every position whose coin did not take z^j holds y^j (the
    bit-identical offline sets of tests/test_methods.py and the hashes check the rest)."""
    model = tiny_llama()
    responses = [[3] * 9, [4] * 7, [5] * 9, [6] * 8]
    mixed, took = bash_mix(model, PROMPTS, responses, beta=0.5, seed=3)
    for m, t, y in zip(mixed, took, responses):
        assert len(m) == len(t) == len(y)
        assert all(a == b for a, b, k in zip(m, y, t) if not k)  # not taken: y^j itself


# ----------------------------------------------------------------------------------------------
# the fixed-shape decode step (--compile-decode)


@pytest.fixture
def compiled(monkeypatch):
    """--compile-decode's step compiled with the eager backend (dynamo's capture and guards,
    without inductor's minutes of code generation); counters from zero."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(decode_step, "COMPILED",
                        {"cpu": torch.compile(decode_step.step, backend="eager", fullgraph=True)})
    yield counters
    torch._dynamo.reset()


def compiled_model(model):
    model.compile_decode = True
    return model


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "llama_tied"])
def test_fixed_step_greedy_equals_eager_and_transformers(hf_checkpoint, compiled, name):
    hf = hf_checkpoint(name).hf
    refs = [hf_greedy(hf, p, NEW) for p in PROMPTS]
    eager = generate(from_pretrained(hf_checkpoint(name).path).eval(), PROMPTS, NEW)
    model = compiled_model(from_pretrained(hf_checkpoint(name).path).eval())
    assert generate(model, PROMPTS, NEW) == eager == refs
    eos = pick_eos(refs)
    assert generate(model, PROMPTS, NEW, eos_id=eos) == [cut_after(r, eos) for r in refs]
    assert compiled["stats"]["unique_graphs"] >= 1


def test_fixed_step_is_one_graph_without_recompiles(hf_checkpoint, compiled):
    """One capture serves every step and every decode call of the same shapes: no guard on the
    step's column, the cache's fill count or the tensors' addresses."""
    model = compiled_model(from_pretrained(hf_checkpoint("llama_gqa").path).eval())
    first = generate(model, PROMPTS, NEW)
    assert compiled["stats"]["unique_graphs"] == 1
    assert generate(model, PROMPTS, NEW) == first
    assert generate(model, PROMPTS[::-1], NEW) == first[::-1]
    assert compiled["stats"]["unique_graphs"] == 1
    assert sum(compiled["graph_break"].values()) == 0


def test_fixed_step_builders_equal_eager(hf_checkpoint, compiled):
    """BASH's mixing (sampled, the head on the taking rows only) and RAC's labels give the eager
    path's tokens."""
    path = hf_checkpoint("llama_tied").path
    eager, model = from_pretrained(path).eval(), compiled_model(from_pretrained(path).eval())
    responses = [[3] * 9, [4] * 7, [5] * 9, [6] * 8]
    for m in (eager, model):
        m.out = (bash_mix(m, PROMPTS, responses, beta=0.5, seed=1),
                 rac_labels(m, PROMPTS, [p + [9] for p in PROMPTS], 8, seed=2),
                 generate(m, PROMPTS, 10, temperature=1.0, top_p=0.9, seed=3))
    assert model.out == eager.out


def test_fixed_step_under_bf16_autocast_runs_in_bf16(hf_checkpoint, compiled):
    """The compiled step computes in the caller's precision too: bf16 logits at every step."""
    model = compiled_model(from_pretrained(hf_checkpoint("llama_gqa").path).eval())
    seen = []

    def pick(t, logits):  # outside the compiled region (a hook inside would be traced into it)
        seen.append(logits.dtype)
        return logits.argmax(-1), torch.zeros(len(logits), dtype=torch.bool)

    with cpu_autocast():
        out = decode(model, PROMPTS, NEW, pick)
    assert out.shape == (len(PROMPTS), NEW) and seen == [BF16] * NEW
    assert compiled["stats"]["unique_graphs"] == 1


def test_compiled_step_casts_no_weight_under_autocast(monkeypatch):
    """Under autocast a compiled graph casts each fp32 weight to bf16 at every step (autocast's
    weight cache does not reach into it); with --compile-decode the step reads weights cast once
    (CastLinear), the same values: the eager path's tokens."""
    from torch._dynamo.backends.common import aot_autograd
    graphs = []

    def keep(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(decode_step, "COMPILED", {"cpu": torch.compile(
        decode_step.step, backend=aot_autograd(fw_compiler=keep), fullgraph=True)})
    model = compiled_model(tiny_llama())
    with cpu_autocast():
        rows = generate(model, PROMPTS, NEW)
        assert rows == generate(tiny_llama(), PROMPTS, NEW)
    weights = {tuple(p.shape) for p in model.parameters() if p.ndim == 2}
    casts = [n for g in graphs for n in g.graph.nodes
             if n.target is torch.ops.aten._to_copy.default
             and tuple(n.args[0].meta["val"].shape) in weights]
    assert graphs and casts == []
    assert all(type(m) is torch.nn.Linear for m in model.modules() if "Linear" in type(m).__name__)
    torch._dynamo.reset()


def test_generate_command_compile_decode(byte_ckpt, compiled, monkeypatch, capsys):
    path = byte_ckpt
    texts = []
    for extra in ([], ["--compile-decode"]):
        generate_module.main(["--init", str(path), "--prompt", "abc", "--max-new-tokens", "8",
                              "--num-samples", "2", "--temperature", "0", "--device", "cpu",
                              *extra])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and compiled["stats"]["unique_graphs"] == 1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """tests/test_train.py's tiny arithmetic data: 32 training rows, 8 evaluation rows."""
    d = tmp_path_factory.mktemp("data")
    return (write_jsonl(d / "train.jsonl", data.builtin_task(32, seed=0, terms=(2, 4))),
            write_jsonl(d / "dev.jsonl", data.builtin_task(8, seed=1, terms=(2, 4))))


def test_train_compile_decode_builds_the_same_sets(files, tmp_path, compiled):
    """train.py --compile-decode: BASH's offline sets and the evaluation's answers through the
    compiled step; the same tokens, so the same weights."""
    assert not train.get_args(["--init", "scratch", "--data", "x.jsonl"]).compile_decode
    outs = []
    for extra in ([], ["--compile-decode"]):
        out = tmp_path / f"bash{len(extra)}"
        train.main(tiny_args(files, out, "--method", "bash", "--sft-epochs", "1",
                             "--iter-epochs", "1", "--build-batch-size", "64", *extra))
        outs.append(weights(out / "checkpoint"))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert compiled["stats"]["unique_graphs"] >= 1
