"""Ready for a GPU, checked on the CPU (issue 32, items 1, 5, 6 and 9): the memory checks under
--fsdp are per rank and after sharding, and loading checks the host memory of every process on the
machine; every saved state is read onto the CPU; --fsdp's validation loss is fp32; TF32 is on for
CUDA runs only. Stand-ins take the place of the device: plumbing.checks.available_memory for its
free memory, a model that reports a CUDA device for the bf16 gathered copy, torch.load's keywords.
"""
import ast
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import generate  # noqa: E402
import plumbing.checks as checks  # noqa: E402
import plumbing.device as device  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig, config_from_hf, from_pretrained, save_pretrained  # noqa: E402
from plumbing.hf_families import param_count  # noqa: E402
from plumbing.tokenizer import byte_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
TINY = ["--init", "scratch", "--task", "arith", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--block-size", "64", "--save-every", "0", "--device", "cpu"]
MISTRAL_7B = dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                  rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, hidden_act="silu",
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """train.jsonl (32 rows) and dev.jsonl (8 rows with answers), all within 64 tokens."""
    d = tmp_path_factory.mktemp("data")
    paths = []
    for name, n, seed in (("train", 32, 0), ("dev", 8, 1)):
        rows = data.builtin_task(n, seed=seed, terms=(2, 4))
        path = d / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n"
                                for e in rows))
        paths.append(path)
    return paths


def tiny_args(files, out, *extra):
    return [*TINY, "--data", str(files[0]), "--eval-data", str(files[1]), "--out", str(out),
            "--batch-size", "8", "--micro-batch-size", "4", *map(str, extra)]


def stand_in_memory(monkeypatch, free: dict, asked: list | None = None):
    """plumbing.checks.available_memory -> free[device type]; each device asked is recorded."""
    def fake(where):
        kind = torch.device(where).type
        if asked is not None:
            asked.append(kind)
        return free[kind]
    monkeypatch.setattr(checks, "available_memory", fake)


# ----------------------------------------------------------------------------------------------
# 1. Memory under --fsdp: per rank, after sharding; loading checks the host for every process


def mistral_7b_on(where):
    """What check_training_memory reads of a model: its parameter count and its device."""
    n = param_count(config_from_hf(MISTRAL_7B))
    assert n == 7_241_732_096
    return SimpleNamespace(num_params=lambda: n, device=torch.device(where))


def test_the_training_memory_of_fsdp_is_each_ranks_shard(monkeypatch):
    """The issue's case: Mistral-7B on 80 GB GPUs with 51.7 GiB free after loading. The whole
    model's gradients and moments (80.9 GiB) do not fit one GPU; under --fsdp over 8 each rank
    holds 1/8 of them (10.1 GiB), which does."""
    raw = mistral_7b_on("cuda:3")
    stand_in_memory(monkeypatch, {"cuda": int(51.7 * GiB)})
    args = SimpleNamespace(init="mistral-7b", fsdp=False)
    with pytest.raises(ValueError, match=r"needs 80\.9 GiB, more than the 51\.7 GiB free"):
        checks.check_training_memory(args, raw, 8)  # DDP: every rank holds all of it
    checks.check_training_memory(SimpleNamespace(init="mistral-7b", fsdp=True), raw, 8)
    stand_in_memory(monkeypatch, {"cuda": 5 * GiB})
    with pytest.raises(ValueError) as e:
        checks.check_training_memory(SimpleNamespace(init="mistral-7b", fsdp=True), raw, 8)
    line = str(e.value)
    assert "this rank's 1/8 of them: needs 10.1 GiB, more than the 5 GiB free on cuda:3" in line
    assert "shard it over more processes" in line


def test_start_checks_training_memory_after_sharding(files, tmp_path, monkeypatch):
    """train.start under a stand-in torchrun of 8 processes: the training memory is checked after
    wrap (sharding) and per rank. With 6 bytes per parameter free, --fsdp (1.5 bytes of gradients
    and moments per parameter on each rank) starts; without it (12 bytes) it is refused."""
    events = []
    monkeypatch.setattr(train, "setup", lambda where: (0, 8, torch.device("cpu")))
    monkeypatch.setattr(train, "from_rank0", lambda value, world: value)

    def fake_wrap(raw, where, world, fsdp, precision, compile):
        events.append("wrap")
        return raw
    monkeypatch.setattr(train, "wrap", fake_wrap)
    n = GPT(GPTConfig(arch="llama", vocab_size=byte_tokenizer().vocab_size, block_size=64,
                      n_layer=1, n_head=2, n_embd=32, tie_embeddings=True)).num_params()
    monkeypatch.setattr(checks, "available_memory", lambda where: events.append("free") or 6 * n)
    r = train.start(train.get_args(tiny_args(files, tmp_path / "fsdp", "--fsdp")))
    train.release_out(r.out, r.lock, r.made)
    assert r.raw.num_params() == n
    assert events[-2:] == ["wrap", "free"], events  # the last memory check follows the sharding
    with pytest.raises(ValueError, match=r"--init scratch: training its [\d,]+ parameters: needs"):
        train.start(train.get_args(tiny_args(files, tmp_path / "ddp")))
    assert not (tmp_path / "ddp").exists()  # refused before the folder was claimed


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    cfg = GPTConfig(arch="llama", vocab_size=byte_tokenizer().vocab_size, block_size=64,
                    n_layer=1, n_head=2, n_embd=32, tie_embeddings=True)
    save_pretrained(GPT(cfg), path, {"tiktoken": "bytes"})
    return path


def test_loading_checks_host_memory_for_every_process_on_the_machine(tiny_checkpoint, monkeypatch):
    """Every process builds the whole state in host memory before moving it to its device: 8
    processes on a machine need 8 times that at once (torchrun's LOCAL_WORLD_SIZE)."""
    need = 4 * param_count(from_pretrained(tiny_checkpoint).config)
    stand_in_memory(monkeypatch, {"cpu": 5 * need})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    from_pretrained(tiny_checkpoint)  # 4 x need fits
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="in each of the 8 processes on this machine: needs"):
        from_pretrained(tiny_checkpoint)


def test_loading_onto_cuda_checks_the_host_too(tiny_checkpoint, monkeypatch):
    """A CUDA load is refused for want of host memory before anything is read (this machine has
    no CUDA: a load that got past the checks would fail moving the model to it)."""
    asked = []
    stand_in_memory(monkeypatch, {"cpu": 1024, "cuda": 1 << 40}, asked)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="parameters: needs .* GiB free on cpu"):
        from_pretrained(tiny_checkpoint, device="cuda")
    assert "cpu" in asked


def test_free_cuda_memory_counts_what_the_allocator_holds_unused(monkeypatch):
    """Sharding frees the whole model's weights into torch's caching allocator, not to the
    driver: the check after sharding counts them as free (stand-ins for torch.cuda's counters)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda where=None: (3 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda where=None: 30 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda where=None: 4 * GiB)
    assert checks.available_memory("cuda:0") == (3 + 30 - 4) * GiB


# ----------------------------------------------------------------------------------------------
# 5. Saved state is read onto the CPU (a DDP resume would put every rank's on cuda:0)


def test_resume_reads_saved_state_with_map_location(files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = tiny_args(files, out, "--method", "sft", "--iter-epochs", "1")
    train.main([*args, "--stop-after", "2"])
    calls, real = [], torch.load

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)
    monkeypatch.setattr(torch, "load", spy)
    train.main([*args, "--resume"])
    assert calls, "the resume read no saved state"
    assert all(kw.get("map_location") == "cpu" for kw in calls), calls


def test_every_torch_load_in_the_code_names_map_location():
    """Statically: no torch.load in the code (tests aside) lets a saved tensor choose its device."""
    missing = []
    for path in sorted(ROOT.glob("**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".git") or "site-packages" in rel.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"
                    and "map_location" not in {k.arg for k in node.keywords}):
                missing.append(f"{rel}:{node.lineno}")
    assert not missing, f"torch.load without map_location: {missing}"


# ----------------------------------------------------------------------------------------------
# 6. --fsdp's validation loss in fp32


FAKE_CUDA = SimpleNamespace(type="cuda", index=0)


class ShardedOnCuda(GPT):
    """A stand-in for the sharded model on a GPU: the gathered decoder, the decode sizing and the
    precision see a CUDA device; the copy gathered from it (a new instance) is a CPU model."""
    on_cuda = False

    @property
    def device(self):
        return FAKE_CUDA if self.on_cuda else super().device


def eval_run(raw, rows, tok, out, fsdp):
    args = SimpleNamespace(fsdp=fsdp, precision="bf16", eval_max_new_tokens=8, build_batch_size=8,
                           build_memory_gb=1.0, micro_batch_size=4, eval_temperature=0.0,
                           eval_samples=1, seed=0)
    out.mkdir()
    return SimpleNamespace(raw=raw, args=args, eval_rows=rows, rank=0, world=1, tok=tok,
                           task="arith", out=out)


def test_fsdp_validation_loss_is_fp32(files, tmp_path, monkeypatch):
    """Under --fsdp on CUDA the gathered copy decodes on bf16 weights; the validation loss is
    computed first, on its fp32 weights: exactly the fp32 loss of the model itself. Decoding
    still sees bf16 weights (half the copy's memory), and the model itself stays fp32."""
    tok = byte_tokenizer()
    rows = data.load_rows(files[1], tok, "arith", 64, "fail", False)[0]
    torch.manual_seed(0)
    cfg = GPTConfig(arch="llama", vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                    n_embd=32, tie_embeddings=True)
    plain = GPT(cfg)
    raw = ShardedOnCuda(cfg)
    raw.load_state_dict(plain.state_dict())
    raw.on_cuda = True
    before = {k: v.clone() for k, v in raw.state_dict().items()}
    want = train.evaluate_run(eval_run(plain, rows, tok, tmp_path / "a", False), {"step": 0}, "t")
    decoded_in, real_generate = [], train.generate

    def spy(model, *a, **kw):
        decoded_in.append(model.dtype)
        return real_generate(model, *a, **kw)
    monkeypatch.setattr(train, "generate", spy)
    got = train.evaluate_run(eval_run(raw, rows, tok, tmp_path / "b", True), {"step": 0}, "t")
    assert got["val_loss"] == want["val_loss"], (got["val_loss"], want["val_loss"])
    assert decoded_in and set(decoded_in) == {torch.bfloat16}  # the copy decodes in bf16
    assert raw.dtype == torch.float32 and all(torch.equal(v, before[k])
                                              for k, v in raw.state_dict().items())


# ----------------------------------------------------------------------------------------------
# 9. TF32 for CUDA's fp32 matmuls, set when a run starts on CUDA and never on a CPU


@pytest.fixture
def tf32_flags():
    """The two global switches, off before the test and restored after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_tf32_is_set_for_cuda_only(tf32_flags):
    device.allow_tf32(torch.device("cpu"))
    device.allow_tf32("cpu")
    assert flags() == (False, False)
    device.allow_tf32(torch.device("cuda"))  # sets flags only: no CUDA op runs
    assert flags() == (True, True)


def test_runs_set_tf32_for_their_device(files, tiny_checkpoint, tmp_path, monkeypatch, tf32_flags):
    """train.start and generate's command line set it for the device they run on: here a CPU,
    so the switches stay off."""
    seen, real = [], device.allow_tf32

    def spy(where):
        seen.append(torch.device(where).type)
        real(where)
    monkeypatch.setattr(train, "allow_tf32", spy)
    monkeypatch.setattr(device, "allow_tf32", spy)
    r = train.start(train.get_args(tiny_args(files, tmp_path / "run")))
    train.release_out(r.out, r.lock, r.made)
    generate.main(["--init", str(tiny_checkpoint), "--max-new-tokens", "2", "--device", "cpu"])
    assert seen == ["cpu", "cpu"] and flags() == (False, False)
