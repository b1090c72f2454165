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
import plumbing
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
    plumbing.log(tmp_path, {"step": 1, "loss": float("nan"), "lr": float("inf")})
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
    fd = plumbing.lock_out(out)  # a separate open file: flock refuses it even in this process
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


def test_disk_full_is_one_line_and_keeps_the_checkpoint(good, train_file, tmp_path, monkeypatch):
    out = copy_run(good, tmp_path)
    before = snapshot(out / "checkpoint")

    def full(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(torch, "save", full)
    fails(train.main, args_for(train_file, out, "--resume"), "train_state.pt",
          "No space left on device (free some space)")
    assert snapshot(out / "checkpoint") == before


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
        holds_run = any((out / n).exists() for n in plumbing.RUN_ENTRIES)
        proc = start("train.py", *argv, *["--resume"] * holds_run)
        kill_when(proc, out, rng, during_save=attempt == 0)
    proc = start("train.py", *argv, "--resume")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert_finished_like(out, reference)
