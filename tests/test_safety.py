"""Never lose a good run: one test class per numbered failure of the issue.

1 non-finite loss   2 reused --out   3 two runs at once   4 --resume settings   5 flag ranges
6 paths outside a checkpoint   7 untrusted config, vocabulary, safetensors   8 mixed data shapes
9 one-line errors naming the file or flag   10 debris from early crashes, kills at any moment

Tiny runs (1 layer, width 32, 32 rows) in-process where only the message matters (main() raises
SystemExit with it); subprocesses where the exit code, stderr or a SIGKILL is the point.
"""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import generate
from plumbing import checks, runs
from plumbing.tokenizer import load_tokenizer
import train
from model import from_pretrained

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--init", "scratch", "--task", "arith", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--block-size", "64", "--save-every", "0", "--device", "cpu", "--batch-size", "8",
        "--micro-batch-size", "4", "--method", "sft", "--iter-epochs", "2"]  # 8 steps


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = data.builtin_task(32, seed=0, terms=(2, 4))
    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n"
                            for e in rows))
    return path


def args_for(train_file, out, *extra):
    return [*TINY, "--data", str(train_file), "--out", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def good(train_file, tmp_path_factory):
    """A good run stopped after 2 of its 8 steps: the checkpoint later runs must not lose."""
    out = tmp_path_factory.mktemp("good") / "run"
    train.main(args_for(train_file, out, "--stop-after", 2))
    return out


def copy_run(good, tmp_path, name="run"):
    shutil.copytree(good, tmp_path / name)
    return tmp_path / name


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(main, argv, *words) -> str:
    """main(argv) ends with one line 'error: ...' holding every word."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for w in words:
        assert str(w) in msg, f"{w!r} not in {msg!r}"
    return msg


def sub_env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def start(*cmd):
    return subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, env=sub_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, errors="replace")


def error_of(proc) -> str:
    """The one error line a failed command ended with (tqdm's bar may come before it)."""
    _, err = proc.communicate(timeout=180)
    assert proc.returncode not in (0, None), f"exit 0:\n{err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and err.count("error: ") == 1, err[-2000:]
    return last


@pytest.fixture(scope="module")
def failed_commands(good, train_file, tmp_path_factory):
    """The subprocess cases, started together (they are mostly interpreter start-up)."""
    root = tmp_path_factory.mktemp("cmds")
    nan, reuse = copy_run(good, root, "nan"), copy_run(good, root, "reuse")
    before = {"nan": snapshot(nan / "checkpoint"), "reuse": snapshot(reuse)}
    procs = {
        "nan": start("train.py", *args_for(train_file, nan, "--resume", "--lr", "1e30",
                                            "--resume-with-new-settings")),
        "reuse": start("train.py", *args_for(train_file, reuse)),
        "flag": start("train.py", *args_for(train_file, root / "flag", "--lr", "0")),
        "context": start("generate.py", "--init", good / "checkpoint", "--prompt", "1+2=",
                         "--max-new-tokens", 100, "--device", "cpu"),
    }
    return {k: (p, before.get(k)) for k, p in procs.items()}, root


# ----------------------------------------------------------------------------------------------
# 1. A non-finite loss stops the run, naming the step, with the last checkpoint intact


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(failed_commands):
    (proc, before), root = failed_commands[0]["nan"], failed_commands[1]
    line = error_of(proc)
    assert "step " in line and "not finite" in line, line
    assert snapshot(root / "nan" / "checkpoint") == before, "the good checkpoint was written over"
    for text in (root / "nan" / "log.jsonl").read_text().splitlines():
        json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the log"))


def test_log_writes_non_finite_numbers_as_strings(tmp_path):
    runs.log(tmp_path, {"step": 1, "loss": float("nan"), "lr": float("inf")})
    rec = json.loads((tmp_path / "log.jsonl").read_text(), parse_constant=pytest.fail)
    assert rec == {"step": 1, "loss": "nan", "lr": "inf"}


# ----------------------------------------------------------------------------------------------
# 2. A folder holding a run is never reused silently


def test_out_holding_a_run_is_refused(failed_commands):
    (proc, before), root = failed_commands[0]["reuse"], failed_commands[1]
    line = error_of(proc)
    assert "--out" in line and "--resume" in line and "--overwrite" in line, line
    assert snapshot(root / "reuse") == before


def test_overwrite_removes_the_old_run_only_when_the_new_one_writes(good, train_file, tmp_path,
                                                                    monkeypatch):
    out = copy_run(good, tmp_path)
    before = snapshot(out)
    real = train.train_step

    def broken(*a, **k):
        raise OSError(errno.EIO, "Input/output error", "somewhere")
    monkeypatch.setattr(train, "train_step", broken)
    fails(train.main, args_for(train_file, out, "--overwrite"), "Input/output error")
    assert snapshot(out) == before, "a replacing run that never wrote removed the old run"

    monkeypatch.setattr(train, "train_step", real)
    train.main(args_for(train_file, out, "--overwrite"))
    steps = [json.loads(t)["step"] for t in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), "the new run's log is not its own"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "log.jsonl"]


# ----------------------------------------------------------------------------------------------
# 3. One run per folder at a time


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(good, train_file, tmp_path):
    out = copy_run(good, tmp_path)
    before = snapshot(out)
    fd = runs.lock_out(out)  # a separate open file: flock refuses it even in this process
    try:
        fails(train.main, args_for(train_file, out, "--resume"), "--out", f"process {os.getpid()}")
    finally:
        os.close(fd)
    (out / ".lock").unlink()
    assert snapshot(out) == before


def test_a_lock_left_by_a_dead_process_is_taken_over(good, train_file, tmp_path):
    out = copy_run(good, tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid}\n")
    train.main(args_for(train_file, out, "--resume"))
    assert torch.load(out / "checkpoint" / "train_state.pt", weights_only=True)["step"] == 8
    assert not (out / ".lock").exists()


# ----------------------------------------------------------------------------------------------
# 4. --resume checks the saved settings


def test_resume_refuses_other_settings_listing_each(good, train_file, tmp_path):
    out = copy_run(good, tmp_path)
    before = snapshot(out)
    fails(train.main, args_for(train_file, out, "--resume", "--lr", "0.01", "--batch-size", 16),
          "--lr 0.01 (saved: 0.002)", "--batch-size 16 (saved: 8)", "--resume-with-new-settings")
    other = tmp_path / "other.jsonl"
    other.write_text(train_file.read_text().replace("=", " =", 1))
    fails(train.main, [*args_for(other, out, "--resume")], "data_sha256")
    fails(train.main, args_for(train_file, out, "--resume", "--method", "neftune"), "--method")
    assert snapshot(out) == before


def test_resume_cannot_change_the_architecture(good, train_file, tmp_path):
    out = copy_run(good, tmp_path)
    before = snapshot(out)
    fails(train.main, args_for(train_file, out, "--resume", "--resume-with-new-settings",
                               "--n-embd", 64), "model.hidden_size 64 (saved: 32)")
    assert snapshot(out) == before


def test_resume_with_new_settings_continues_and_reporting_flags_are_free(good, train_file,
                                                                         tmp_path):
    out = copy_run(good, tmp_path)
    train.main(args_for(train_file, out, "--resume", "--eval-every", 3, "--stop-after", 4))
    train.main(args_for(train_file, out, "--resume", "--resume-with-new-settings", "--lr", 0.001))
    info = json.loads((out / "checkpoint" / "run.json").read_text())
    assert info["settings"]["lr"] == 0.001


# ----------------------------------------------------------------------------------------------
# 5. Every flag is range-checked when parsed, and against the others and the data

BAD_TRAIN_FLAGS = [("--micro-batch-size", "-1"), ("--iterations", "0"), ("--lr", "0"),
                   ("--lr", "nan"), ("--mix-temperature", "-1"), ("--rac-temperature", "-0.5"),
                   ("--beta", "1.5"), ("--warmup", "-0.1"), ("--grad-clip", "-1"),
                   ("--eval-every", "-1"), ("--save-every", "-2"), ("--batch-size", "0"),
                   ("--n-head", "0"), ("--iter-epochs", "0"), ("--sft-epochs", "-1"),
                   ("--max-len", "0"), ("--stop-after", "-1"), ("--device", "cdua")]


@pytest.mark.parametrize("flag,value", BAD_TRAIN_FLAGS)
def test_train_flag_out_of_range(train_file, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        train.main(args_for(train_file, tmp_path / "out", flag, value))
    assert e.value.code == 2
    assert f"error: argument {flag}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "0"),
                                        ("--top-p", "1.5"), ("--top-k", "0"),
                                        ("--max-new-tokens", "0"), ("--num-samples", "0"),
                                        ("--seed", "-3")])
def test_generate_flag_out_of_range(good, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        generate.main(["--init", str(good / "checkpoint"), flag, value])
    assert e.value.code == 2
    assert f"error: argument {flag}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_flags_checked_against_each_other_and_the_data(train_file, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        train.main(args_for(train_file, out, "--batch-size", 4, "--micro-batch-size", 8))
    assert "--micro-batch-size 8 is larger than --batch-size 4" in capsys.readouterr().err
    fails(train.main, args_for(train_file, out, "--batch-size", 64, "--micro-batch-size", 8),
          "--batch-size 64", "32 rows")
    fails(train.main, args_for(train_file, out, "--iter-epochs", 0.1), "--iter-epochs")
    fails(train.main, args_for(train_file, out, "--max-len", 100), "--max-len 100")
    assert not out.exists()


def test_bad_flag_subprocess_is_one_argparse_line(failed_commands):
    proc = failed_commands[0]["flag"][0]
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("argument --lr: expected a number > 0, got '0'")
    assert not (failed_commands[1] / "flag").exists()


# ----------------------------------------------------------------------------------------------
# 6. A checkpoint's files stay inside its folder


def test_shard_paths_outside_the_folder_are_refused(good, tmp_path):
    ck = copy_run(good / "checkpoint", tmp_path, "ck")
    (ck / "model.safetensors").rename(tmp_path / "outside.safetensors")
    names = list(load_file(str(tmp_path / "outside.safetensors")))
    for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        (ck / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {n: shard for n in names}}))
        with pytest.raises(ValueError, match="index.json: .* points outside the checkpoint"):
            from_pretrained(ck)


def test_symlinked_checkpoint_files_are_refused(good, train_file, tmp_path):
    ck = copy_run(good / "checkpoint", tmp_path, "ck")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output checkpoint")
    (ck / "special_tokens_map.json").symlink_to(secret)  # copied into our checkpoint before
    out = tmp_path / "out"
    fails(train.main, [*args_for(train_file, out), "--init", str(ck)],
          "special_tokens_map.json", "symbolic link")
    assert not out.exists()
    (ck / "special_tokens_map.json").unlink()
    (ck / "config.json").rename(tmp_path / "config.json")
    (ck / "config.json").symlink_to(tmp_path / "config.json")
    fails(generate.main, ["--init", str(ck)], "config.json", "symbolic link")


# ----------------------------------------------------------------------------------------------
# 7. A checkpoint is checked before it is trusted


def edit_config(ck: Path, **fields):
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, **fields}))


def test_huge_or_mistyped_config_is_refused_before_allocating(good, tmp_path):
    ck = copy_run(good / "checkpoint", tmp_path, "ck")
    edit_config(ck, max_position_embeddings=10 ** 12)
    t0 = time.perf_counter()
    fails(generate.main, ["--init", str(ck)], "config.json", "max_position_embeddings",
          "1000000000000")
    assert time.perf_counter() - t0 < 10
    edit_config(ck, max_position_embeddings=64, num_hidden_layers="1")
    fails(generate.main, ["--init", str(ck)], "config.json", "num_hidden_layers is '1'")
    edit_config(ck, num_hidden_layers=1, num_attention_heads=3)
    fails(generate.main, ["--init", str(ck)], "config.json", "n_head 3 is not a multiple")


def test_tokenizer_larger_than_the_model_is_refused(good, train_file, tmp_path):
    ck = copy_run(good / "checkpoint", tmp_path, "ck")
    edit_config(ck, tiktoken="r50k_base")  # 50257 tokens for a 257-row embedding
    fails(generate.main, ["--init", str(ck), "--prompt", "hi"], "50257 tokens", "only 257")
    fails(train.main, [*args_for(train_file, tmp_path / "out"), "--init", str(ck)],
          "50257 tokens", "only 257")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_is_one_line_naming_it(good, tmp_path):
    ck = copy_run(good / "checkpoint", tmp_path, "ck")
    raw = (ck / "model.safetensors").read_bytes()
    for cut in (len(raw) // 2, 20):
        (ck / "model.safetensors").write_bytes(raw[:cut])
        fails(generate.main, ["--init", str(ck)], "model.safetensors")


# ----------------------------------------------------------------------------------------------
# 8. Data is never misread silently


def test_one_shape_per_data_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "1+1=", "response": "2"}\n\n'
                    '{"question": "1+2?", "answer": "#### 3"}\n')
    with pytest.raises(data.DataError, match=r"mixed.jsonl:3: a \{question, \.\.\.\} row, but "
                                             r"line 1 is a \{prompt, \.\.\.\} row"):
        data.read_jsonl(path)


def test_duplicate_keys_are_refused(good, tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"prompt": "1+1=", "response": "2", "response": "3"}\n')
    with pytest.raises(data.DataError, match=r"dup.jsonl:1: duplicate key 'response'"):
        data.read_jsonl(path)
    ck = copy_run(good / "checkpoint", tmp_path, "ck")
    text = (ck / "config.json").read_text()
    (ck / "config.json").write_text(text.replace("{", '{"vocab_size": 9999999,', 1))
    fails(generate.main, ["--init", str(ck)], "config.json", "duplicate key 'vocab_size'")


# ----------------------------------------------------------------------------------------------
# 9. One line naming the file or flag, never a traceback


def test_bad_files_are_named(good, train_file, tmp_path):
    out = tmp_path / "out"
    fails(train.main, args_for(tmp_path, out), str(tmp_path), "is a directory")
    ck = copy_run(good / "checkpoint", tmp_path, "ck")
    (ck / "config.json").write_text('{"model_type": "llama",')
    fails(generate.main, ["--init", str(ck)], "config.json", "malformed JSON")
    ck2, ck3 = copy_run(good / "checkpoint", tmp_path, "ck2"), copy_run(ck, tmp_path, "ck3")
    cfg = json.loads((ck2 / "config.json").read_text())
    del cfg["tiktoken"]  # so the tokenizer comes from tokenizer.json
    (ck2 / "config.json").write_text(json.dumps(cfg))
    (ck2 / "tokenizer.json").write_text("{}")
    fails(generate.main, ["--init", str(ck2)], "tokenizer.json", "'model'")
    shutil.copy(good / "checkpoint" / "config.json", ck3)
    (ck3 / "model.safetensors").unlink()
    (ck3 / "model.safetensors.index.json").write_text("{}")
    fails(generate.main, ["--init", str(ck3)], "model.safetensors.index.json", "'weight_map'")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fails(train.main, args_for(train_file, blocker / "out"), "a_file")
    assert not out.exists()


def test_generate_past_the_context_is_one_line(failed_commands):
    line = error_of(failed_commands[0]["context"][0])
    assert "--max-new-tokens 100" in line and "context of 64" in line, line


# ----------------------------------------------------------------------------------------------
# 10. No debris from early failures; a kill at any moment is resumed exactly


def test_failure_at_start_up_leaves_no_folder(train_file, tmp_path):
    out = tmp_path / "new" / "out"
    fails(train.main, args_for(train_file, out, "--resume"), "no run to --resume")
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def reference(train_file, tmp_path_factory):
    """The uninterrupted run, saving at every step as the killed runs do."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train.main(args_for(train_file, out, "--save-every", 1))
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def assert_finished_like(out: Path, reference):
    got = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got), "resumed weights differ"
    steps = [json.loads(t)["step"] for t in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), f"each step logged once, got {steps}"


def test_kill_during_the_first_checkpoint_write_resumes(train_file, tmp_path, reference):
    out = tmp_path / "run"
    train.main(args_for(train_file, out, "--save-every", 1, "--stop-after", 1))
    (out / "checkpoint").rename(out / "checkpoint.tmp")  # what a kill before the rename leaves
    (out / "checkpoint.tmp" / "train_state.pt").unlink()
    train.main(args_for(train_file, out, "--save-every", 1, "--resume"))
    assert_finished_like(out, reference)


def log_size(out: Path) -> int:
    return (out / "log.jsonl").stat().st_size if (out / "log.jsonl").exists() else 0


def kill_when(proc, out: Path, rng, during_save: bool):
    """SIGKILL proc the moment a checkpoint is being written, or at a random moment once it
    trains (its log grows)."""
    deadline, logged = time.monotonic() + 120, log_size(out)
    while proc.poll() is None and time.monotonic() < deadline:
        if during_save and (out / "checkpoint.tmp").exists():
            break
        if not during_save and log_size(out) > logged:
            time.sleep(rng.uniform(0, 0.12))  # 8 short steps: land inside them
            break
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_moments_then_resume_is_exact(train_file, tmp_path, reference, seed):
    rng, out = random.Random(seed), tmp_path / "run"
    argv = args_for(train_file, out, "--save-every", 1)
    for attempt in range(3):  # the first kill lands in a checkpoint write
        holds_run = any((out / n).exists() for n in runs.RUN_ENTRIES)
        proc = start("train.py", *argv, *["--resume"] * holds_run)
        kill_when(proc, out, rng, during_save=attempt == 0)
    proc = start("train.py", *argv, "--resume")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert_finished_like(out, reference)


# ==============================================================================================
# Part 2 (issue 23): links, the lock, --overwrite, resume, loading, data, signals, the scripts


def read_only_folder(folder: Path):
    """folder read-only for real: chmod for a user; for root, whom permissions do not stop, a
    read-only bind mount (skipped where root cannot mount)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode:
        pytest.skip("running as root without mount: no way to make a folder read-only")
    subprocess.run(["mount", "-o", "remount,ro,bind", folder, folder], check=True)
    return lambda: subprocess.run(["umount", folder], check=True)


def limited(size):
    """preexec_fn: files of at most `size` bytes, a real write failure (EFBIG) past it."""
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.fixture(scope="module")
def part2_commands(good, train_file, tmp_path_factory):
    """Part 2's subprocesses, started together: SIGINT / SIGTERM mid-run, writes past a file size
    limit (torch.save's train_state.pt, then safetensors' weights)."""
    root = tmp_path_factory.mktemp("part2")
    long = ["--iter-epochs", 400, "--save-every", 5]  # 1600 steps: signalled long before the end
    procs = {sig: start("train.py", *args_for(train_file, root / sig.name, *long))
             for sig in (signal.SIGINT, signal.SIGTERM)}
    for name, size in (("state", 150_000), ("weights", 50_000)):
        out = copy_run(good, root, name)
        procs[name] = subprocess.Popen(
            [sys.executable, "train.py", *args_for(train_file, out, "--resume")], cwd=ROOT,
            env=sub_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            errors="replace", preexec_fn=limited(size))
    yield procs, root
    for proc in procs.values():  # a run whose test was deselected must not outlive the tests
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ----------------------------------------------------------------------------------------------
# 1. Nothing is written through a link; a checkpoint is never read through one


@pytest.mark.parametrize("name", ["checkpoint.tmp", "checkpoint.old", "log.jsonl", ".lock"])
def test_a_link_where_the_run_writes_is_refused(good, train_file, tmp_path, name):
    out = copy_run(good, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("keep me")
    target = elsewhere if name.startswith("checkpoint") else elsewhere / "config.json"
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(target)
    before = snapshot(out / "checkpoint")
    fails(train.main, args_for(train_file, out, "--resume"), name, "symbolic link")
    assert (elsewhere / "config.json").read_text() == "keep me"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["config.json"]
    assert snapshot(out / "checkpoint") == before


@pytest.mark.parametrize("name", ["train_state.pt", "run.json"])
def test_a_checkpoint_is_never_read_through_a_link(good, train_file, tmp_path, name):
    out = copy_run(good, tmp_path)
    outside = tmp_path / name
    (out / "checkpoint" / name).rename(outside)
    (out / "checkpoint" / name).symlink_to(outside)
    fails(train.main, args_for(train_file, out, "--resume"), name, "symbolic link")


def test_the_log_is_never_written_through_a_link(tmp_path):
    (tmp_path / "secret").write_text("x")
    (tmp_path / "log.jsonl").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match="log.jsonl: is a symbolic link"):
        runs.log(tmp_path, {"step": 1})
    assert (tmp_path / "secret").read_text() == "x"


# ----------------------------------------------------------------------------------------------
# 2. The lock is the folder's flock: deleting or replacing .lock cannot lose it


def test_deleting_the_lock_file_does_not_let_a_second_run_in(good, train_file, tmp_path):
    out = copy_run(good, tmp_path)
    fd = runs.lock_out(out)
    try:
        (out / ".lock").unlink()  # what a careless user (or a cleanup script) does
        fails(train.main, args_for(train_file, out, "--resume"), "--out", "in use by another run")
        (out / ".lock").write_text("forged\n")
        fails(train.main, args_for(train_file, out, "--resume"), "in use by another run")
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# 3. --overwrite: the old run stays the run until the new one's first checkpoint is whole


def test_overwrite_that_fails_before_its_first_checkpoint_keeps_the_old_run(good, train_file,
                                                                             tmp_path):
    out = copy_run(good, tmp_path)
    before = snapshot(out)
    # step 1 is finite and logged; its update makes step 2 not finite
    fails(train.main, args_for(train_file, out, "--overwrite", "--lr", "1e30"), "step 2",
          "not finite", "the last checkpoint is kept")
    assert snapshot(out) == before, "the old run was changed by a new one that never saved"


def test_overwrite_with_init_inside_out_keeps_its_tokenizer_files(good, train_file, tmp_path):
    out = copy_run(good, tmp_path)
    (out / "checkpoint" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    train.main(args_for(train_file, out, "--overwrite", "--init", out / "checkpoint"))
    assert (out / "checkpoint" / "tokenizer_config.json").read_text() == \
        '{"eos_token": "<|endoftext|>"}'
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "log.jsonl"]


def test_an_overwrite_swap_cut_short_is_completed(tmp_path):
    """Each state a kill during commit_overwrite can leave: the next start finishes the swap."""
    def setup(out):
        for where, tag in ((out, "old"), (out / ".overwrite", "new")):
            (where / "checkpoint").mkdir(parents=True)
            (where / "checkpoint" / "w").write_text(tag)
            (where / "log.jsonl").write_text(tag)
        (out / "checkpoint.old").mkdir()
    out = tmp_path / "run"
    setup(out)
    runs.commit_overwrite(out)
    renames = 0
    while True:  # cut after 0, 1, 2, ... renames until one run completes uncut
        shutil.rmtree(out)
        setup(out)
        real, count = Path.rename, [0]

        def cut(self, target):
            if count[0] == renames:
                raise KeyboardInterrupt  # the kill, at this rename
            count[0] += 1
            return real(self, target)
        Path.rename = cut
        try:
            runs.commit_overwrite(out)
            finished = True
        except KeyboardInterrupt:
            finished = False
        finally:
            Path.rename = real
        if renames and not finished:
            runs.finish_overwrite(out)  # what the next start does
            assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "log.jsonl"], renames
            assert (out / "checkpoint" / "w").read_text() == "new"
            assert (out / "log.jsonl").read_text() == "new"
        if finished:
            break
        renames += 1


# ----------------------------------------------------------------------------------------------
# 4. Resume checks the tokenizer by content, the log's size and every field of train_state.pt


def test_resume_compares_the_tokenizer_by_content(train_file, tmp_path):
    from test_data import hf_tokenizer
    from model import GPT, GPTConfig, save_pretrained
    ck = tmp_path / "ck"
    ck.mkdir()
    hf_tokenizer(ck)
    vocab = load_tokenizer(ck).vocab_size
    save_pretrained(GPT(GPTConfig(arch="llama", vocab_size=vocab, block_size=64, n_layer=1,
                                  n_head=2, n_embd=32)), ck)
    out = tmp_path / "run"
    argv = args_for(train_file, out, "--stop-after", 2, "--init", ck)
    train.main(argv)
    tj = json.loads((ck / "tokenizer.json").read_text())
    v = tj["model"]["vocab"]
    a, b = sorted(v, key=v.get)[300:302]  # two tokens change ids: same size, another tokenizer
    v[a], v[b] = v[b], v[a]
    (ck / "tokenizer.json").write_text(json.dumps(tj))
    assert load_tokenizer(ck).vocab_size == vocab
    fails(train.main, [*argv, "--resume"], "tokenizer tokenizer.json", "(saved: tokenizer.json")


def test_log_bytes_past_the_log_is_refused(good, train_file, tmp_path):
    out = copy_run(good, tmp_path)
    info = json.loads((out / "checkpoint" / "run.json").read_text())
    info["log_bytes"] = (out / "log.jsonl").stat().st_size + 100
    (out / "checkpoint" / "run.json").write_text(json.dumps(info))
    fails(train.main, args_for(train_file, out, "--resume"), "run.json", "log_bytes")
    assert b"\0" not in (out / "log.jsonl").read_bytes()


STATE_EDITS = {
    "step": lambda s: s.update(step=10 ** 9),
    "iteration": lambda s: s.update(iteration="0"),
    "stats": lambda s: s.update(stats=[1]),
    "rng": lambda s: s.update(rng=s["rng"].int()),
    "offline": lambda s: s.update(offline=[(1, 2)]),
    "optimizer.state[0].exp_avg": lambda s: s["optimizer"]["state"][0].update(
        exp_avg=torch.zeros(3)),
    "optimizer": lambda s: s["optimizer"]["param_groups"].pop(),
    "(top)": lambda s: s.pop("cuda_rng"),
}


@pytest.mark.parametrize("field", list(STATE_EDITS))
def test_every_field_of_train_state_is_checked(good, train_file, tmp_path, field):
    out = copy_run(good, tmp_path)
    path = out / "checkpoint" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    STATE_EDITS[field](state)
    torch.save(state, path)
    fails(train.main, args_for(train_file, out, "--resume"), "train_state.pt", f"field {field}")


def test_an_unsafe_pickle_is_refused_without_torchs_unsafe_advice(good, train_file, tmp_path):
    out = copy_run(good, tmp_path)
    torch.save({"x": argparse_namespace()}, out / "checkpoint" / "train_state.pt")
    msg = fails(train.main, args_for(train_file, out, "--resume"), "train_state.pt")
    assert "weights_only" not in msg and "False" not in msg, msg


def argparse_namespace():
    import argparse
    return argparse.Namespace(a=1)  # any class outside torch's allow-list


# ----------------------------------------------------------------------------------------------
# 5. Weights floating and finite, config values typed, nesting bounded, sizes within memory


@pytest.mark.parametrize("bad", ["nan", "int32"])
def test_bad_weights_are_refused_at_load_naming_the_tensor(good, train_file, tmp_path, bad):
    from safetensors.torch import save_file
    ck = copy_run(good / "checkpoint", tmp_path, "ck")
    w = load_file(str(ck / "model.safetensors"))
    name = "model.layers.0.post_attention_layernorm.weight"
    w[name] = w[name].clone().fill_(float("nan")) if bad == "nan" else w[name].int()
    save_file(w, str(ck / "model.safetensors"))
    fails(train.main, args_for(train_file, tmp_path / "out", "--init", ck), name,
          "NaN" if bad == "nan" else "int32")
    fails(generate.main, ["--init", str(ck), "--prompt", "1+"], name)
    assert not (tmp_path / "out").exists()


def test_deep_or_mistyped_config_is_one_line(good, tmp_path):
    ck = copy_run(good / "checkpoint", tmp_path, "ck")
    cfg = (ck / "config.json").read_text()
    (ck / "config.json").write_text(cfg.replace("{", '{"x": ' + "[" * 100_000 + "]" * 100_000
                                                + ",", 1))
    fails(generate.main, ["--init", str(ck)], "config.json", "nested deeper")
    edit = json.loads(cfg)
    edit["rope_theta"] = edit["rope_parameters"]["rope_theta"] = "10000"  # what is read
    (ck / "config.json").write_text(json.dumps(edit))
    fails(generate.main, ["--init", str(ck)], "config.json", "rope_theta is '10000'")
    edit["rope_theta"] = edit["rope_parameters"]["rope_theta"] = 10000.0
    edit["tiktoken"] = ["bytes"]
    (ck / "config.json").write_text(json.dumps(edit))
    fails(generate.main, ["--init", str(ck)], "config.json", "unknown tiktoken ['bytes']")


def test_a_model_too_large_for_memory_is_refused_before_allocating(train_file, tmp_path):
    fails(train.main, args_for(train_file, tmp_path / "out", "--n-embd", 65536, "--n-head", 512),
          "--init scratch", "GiB", "choose smaller sizes")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# 6. Data: regular files only, lines bounded, conversations checked, one shape per run


def test_only_regular_files_are_read(train_file, tmp_path):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)  # no writer: opening it to read would wait forever
    for path, what in ((fifo, "a pipe"), (Path("/dev/zero"), "a device")):
        fails(train.main, args_for(path, tmp_path / "out"), str(path), what)
        fails(train.main, args_for(train_file, tmp_path / "out", "--eval-data", path), what)
    assert not (tmp_path / "out").exists()


def test_a_line_past_the_bound_is_refused(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "x" * checks.MAX_LINE, "response": "y"}) + "\n")
    with pytest.raises(data.DataError, match=r"long.jsonl:1: a line longer than"):
        data.read_jsonl(path)


BAD_ROWS = {
    "nested": ('{"prompt": ' + "[" * 50_000 + "]" * 50_000 + ', "response": "2"}',
               "nested deeper"),
    "system-only": ('{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", '
                    '"content": "2"}]}', "end with a user turn"),
    "unknown-role": ('{"messages": [{"role": "usr", "content": "1+1="}, {"role": "assistant", '
                     '"content": "2"}]}', "role 'usr'"),
    "late-system": ('{"messages": [{"role": "user", "content": "1+1="}, {"role": "system", '
                    '"content": "s"}, {"role": "user", "content": "?"}, {"role": "assistant", '
                    '"content": "2"}]}', "messages[1] is a system turn"),
    "no-final-answer": ('{"question": "1+1?", "answer": "two"}', "no final '#### <number>'"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_rows_are_one_line_naming_the_file_and_line(tmp_path, kind):
    line, what = BAD_ROWS[kind]
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    args = args_for(path, tmp_path / "out", "--task", "auto", "--batch-size", 1,
                    "--micro-batch-size", 1, "--tokenizer", "r50k_base")
    msg = fails(train.main, args, "bad.jsonl", what)
    assert "bad.jsonl:1" in msg or "line 1" in msg, msg


def test_an_eval_file_of_another_shape_is_refused(train_file, tmp_path):
    other = tmp_path / "dev.jsonl"
    other.write_text('{"question": "1+2?", "answer": "#### 3"}\n')
    fails(train.main, args_for(train_file, tmp_path / "out", "--eval-data", other),
          "--eval-data", "{question, ...}", "{prompt, ...}")


# ----------------------------------------------------------------------------------------------
# 7. Signals, a full disk, read-only folders: one line, the last checkpoint intact


def test_a_signal_ends_the_run_in_one_line_and_it_resumes(part2_commands, train_file):
    procs, root = part2_commands
    sigs = (signal.SIGINT, signal.SIGTERM)
    for sig in sigs:  # each once a few checkpoints are written, both before either is checked
        deadline = time.monotonic() + 120
        while (log_size(root / sig.name) < 2000 and procs[sig].poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.005)
        procs[sig].send_signal(sig)
    for sig in sigs:
        proc, out = procs[sig], root / sig.name
        line = error_of(proc)
        assert proc.returncode == 128 + sig, proc.returncode
        assert f"interrupted by {sig.name} at step " in line and "--resume continues" in line, line
        saved = json.loads((out / "checkpoint" / "run.json").read_text())["step"]
        assert f"{out / 'checkpoint'} (step {saved})" in line, line
        train.main(args_for(train_file, out, "--iter-epochs", 400, "--save-every", 5, "--resume",
                            "--stop-after", saved + 1))
        steps = [json.loads(t)["step"] for t in (out / "log.jsonl").read_text().splitlines()]
        assert steps == list(range(1, saved + 2)), steps


@pytest.mark.parametrize("name,file", [("state", "train_state.pt"),
                                       ("weights", "model.safetensors")])
def test_a_full_disk_is_one_line_at_the_failing_write(part2_commands, good, train_file, name,
                                                      file):
    procs, root = part2_commands
    line = error_of(procs[name])
    assert file in line and "File too large" in line, line
    assert snapshot(root / name / "checkpoint") == snapshot(good / "checkpoint")
    train.main(args_for(train_file, root / name, "--resume"))  # resumable once there is room


def test_read_only_folders_are_noticed_before_training(good, train_file, tmp_path):
    out = copy_run(good, tmp_path)
    before = snapshot(out)
    undo = read_only_folder(out / "checkpoint")
    try:
        fails(train.main, args_for(train_file, out, "--resume"), "checkpoint", "not writable")
    finally:
        undo()
    undo = read_only_folder(out)
    try:
        fails(train.main, args_for(train_file, out, "--resume"), str(out), "not writable")
    finally:
        undo()
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------
# 8. The scripts check their flags at start; generate.py bounds its batch and its temperature

sys.path.insert(0, str(ROOT / "scripts"))


@pytest.mark.parametrize("script,argv,flag", [
    ("make_pairs", ["--init", "x", "--data", "y", "--out", "z", "--samples", "0"], "--samples"),
    ("make_pairs", ["--init", "x", "--data", "y", "--out", ".", "--samples", "1"], "--out"),
    ("make_pairs", ["--init", "x", "--data", "y", "--out", "z", "--batch-size", "-1"],
     "--batch-size"),
    ("study", ["--epochs", "0"], "--epochs"),
    ("study", ["--train-size", "-5"], "--train-size"),
    ("study", ["--out", __file__], "--out"),
    ("worked_example", ["--rows", "0"], "--rows"),
    ("worked_example", ["--beta", "2"], "--beta"),
])
def test_script_flags_are_checked_when_parsed(capsys, script, argv, flag):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"{script}.py: error: argument {flag}")


def test_cuda_without_cuda_is_refused_by_the_scripts(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import study
    with pytest.raises(SystemExit):
        study.main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_generate_bounds_num_samples_by_memory(good):
    fails(generate.main, ["--init", str(good / "checkpoint"), "--num-samples", "100000000",
                          "--max-new-tokens", "10"], "--num-samples 100000000", "GiB")


def test_a_temperature_that_underflows_samples_the_argmax(good, capsys):
    outs = []
    for t in ("1e-45", "0"):
        generate.main(["--init", str(good / "checkpoint"), "--prompt", "1+2=", "--temperature",
                       t, "--seed", "0", "--max-new-tokens", "20"])
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "\0" not in outs[0]


# ----------------------------------------------------------------------------------------------
# 9. DPO and SPIN under --precision bf16 on a CPU, through train.py itself


@pytest.mark.parametrize("method", ["dpo", "spin"])
def test_preference_methods_train_in_bf16_on_a_cpu(train_file, tmp_path, method):
    path = train_file
    if method == "dpo":
        path = tmp_path / "pairs.jsonl"
        rows = [json.loads(t) for t in train_file.read_text().splitlines()]
        path.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["response"],
                                            "rejected": r["response"][::-1]}) + "\n"
                                for r in rows))
    train.main([*args_for(path, tmp_path / "out", "--method", method, "--iter-epochs", 1),
                "--precision", "bf16"])
    assert (tmp_path / "out" / "checkpoint" / "train_state.pt").exists()


def test_a_signal_during_a_checkpoint_write_waits_for_it(tmp_path):
    """SIGTERM arriving while a checkpoint is written (here: from inside the model's write) lets
    the write finish, the checkpoint whole, then interrupts; raised inside torch.save it would
    surface as a RuntimeError with checkpoint.tmp half-written."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())

    def write_model(folder):
        os.kill(os.getpid(), signal.SIGTERM)
        (folder / "model.safetensors").write_bytes(b"weights")

    with pytest.raises(runs.Interrupted) as e:
        with runs.stop_on_signals():
            runs.save_checkpoint(write_model, opt, {"step": 3}, tmp_path, None, {"settings": {}})
    assert e.value.signum == signal.SIGTERM
    assert json.loads((tmp_path / "checkpoint" / "run.json").read_text())["step"] == 3
    assert (tmp_path / "checkpoint" / "train_state.pt").exists()
    assert not (tmp_path / "checkpoint.tmp").exists()
    assert runs.HELD == {"depth": 0, "signum": None}
