"""Run folders, checkpoints, resuming and signals. A reader of the paper can skip this file: it
holds no method, only what keeps a run from losing work (nanochat's checkpoint_manager.py is the
precedent).

- Writing: nothing inside --out is written through a symbolic link; a checkpoint is written to a
  fresh checkpoint.tmp and swapped in by renames, so a kill at any moment leaves a whole one.
- Run folders: one run per --out (flock on the folder itself); a folder holding a run is refused
  unless --resume (settings, tokenizer, data, world size and train_state.pt checked) or
  --overwrite (the old run kept until the new one's first checkpoint is whole).
- SIGINT / SIGTERM end a run like a failure, in one line, its folder resumable.
(docs/safety.md; tests/test_safety.py checks each point.)
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from plumbing.checks import EXPECTED, error_line, inside, is_int, read_json

# ----------------------------------------------------------------------------------------------
# Writing inside --out: never through a symbolic link, files created fresh

# Everything a run writes or removes inside --out: a link at any of these names is refused.
RUN_WRITES = ("checkpoint.tmp", "checkpoint", "checkpoint.old", "log.jsonl", ".lock",
              ".overwrite", ".overwrite.ready", ".replaced.part", ".replaced", ".replaced.del")


def no_link(path: Path) -> Path:
    if path.is_symlink():
        raise ValueError(f"{path}: is a symbolic link where the run writes (remove it; a run "
                         "never writes through a link)")
    return path


def open_no_link(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symbolic link at path (O_NOFOLLOW), naming it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            no_link(path)
        raise


def write_new(path: Path, raw: bytes):
    """A file that did not exist (O_EXCL: never an existing file or a link's target)."""
    with os.fdopen(open_no_link(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
        f.write(raw)


def remove_tree(path: Path):
    """Remove a folder of ours (never through a link); a failure is raised, naming the file."""
    if no_link(path).exists():
        shutil.rmtree(path)


class KeptError:
    """A file object for torch.save that keeps the OSError of a failed write: torch turns it into
    a RuntimeError without the errno ('unexpected pos ...'), and a full disk must say so."""

    def __init__(self, f):
        self.f, self.failed = f, None

    def write(self, raw):
        try:
            return self.f.write(raw)
        except OSError as e:
            self.failed = e
            raise

    def flush(self):
        self.f.flush()


def save_new(obj, path: Path):
    """torch.save to a new file; a failed write is the OSError it was (ENOSPC, EFBIG, ...)."""
    with os.fdopen(open_no_link(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
        kept = KeptError(f)
        try:
            torch.save(obj, kept)
        except RuntimeError:
            if kept.failed is None:
                raise
            raise OSError(kept.failed.errno, kept.failed.strerror, str(path)) from None


def write_model_files(write_model, folder: Path):
    """write_model(folder), with safetensors' failed writes as the OSError they were."""
    try:
        write_model(folder)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise ValueError(f"{folder}: cannot write the weights ({e})") from None
        n = int(code.group(1))
        raise OSError(n, os.strerror(n), str(folder / "model.safetensors")) from None


# ----------------------------------------------------------------------------------------------
# Checkpoints: the model in the Hugging Face layout + training state, replaced atomically

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def tokenizer_files(folder) -> dict[str, bytes]:
    """The tokenizer files of --init that every checkpoint carries, read once at the start (so an
    --init inside --out is taken before an --overwrite replaces it); none may be a link."""
    paths = [inside(Path(folder), name) for name in TOKENIZER_FILES] if folder else []
    return {f.name: f.read_bytes() for f in paths if f.exists()}


def tokenizer_sha256(tok, files: dict[str, bytes]) -> str:
    """The tokenizer by content: every token's bytes, the special tokens and its files."""
    h = hashlib.sha256(tok.name.encode())
    for i in range(tok.enc.n_vocab):
        try:
            h.update(b"%d:" % i + tok.enc.decode_single_token_bytes(i))
        except KeyError:  # an id the vocabulary skips
            h.update(b"%d-" % i)
    h.update(repr(sorted(tok.enc.special_tokens_set)).encode())
    for name in sorted(files):
        h.update(name.encode() + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def write_dir(out: Path) -> Path:
    """Where the run writes now: out, or out/.overwrite while an --overwrite run has not yet
    replaced the old run (prepare_out removes any older one before the run starts)."""
    stage = out / ".overwrite"
    return stage if stage.is_dir() and not stage.is_symlink() else out


def save_checkpoint(write_model, opt, state, out: Path, tokenizer=None, run_info=None,
                    opt_state=None):
    """Write checkpoint.tmp, a fresh folder, completely, then swap it in: at every moment a whole
    checkpoint exists at checkpoint or checkpoint.old. write_model(folder) writes the model's
    files; tokenizer: {name: bytes} to carry; run_info: run.json, what --resume checks (the
    step and the log's size are added); opt_state: the optimizer's state when it is not
    opt.state_dict() (a sharded run's, gathered whole). An --overwrite run's first checkpoint
    replaces the old run (commit_overwrite)."""
    with signals_held():
        write_checkpoint(write_model, opt, state, out, tokenizer, run_info, opt_state)


def write_checkpoint(write_model, opt, state, out: Path, tokenizer, run_info, opt_state):
    where = write_dir(out)
    tmp, final, old = (no_link(where / n) for n in ("checkpoint.tmp", "checkpoint",
                                                     "checkpoint.old"))
    remove_tree(tmp)
    remove_tree(old)  # a folder we cannot empty fails here, before anything changed
    os.mkdir(tmp)
    write_model_files(write_model, tmp)
    for name, raw in (tokenizer or {}).items():  # self-contained for generate.py, transformers
        write_new(tmp / name, raw)
    if run_info is not None:
        log_file = no_link(where / "log.jsonl")
        info = {**run_info, "step": state["step"],  # where --resume cuts the log back to
                "log_bytes": log_file.stat().st_size if log_file.exists() else 0}
        write_new(tmp / "run.json", json.dumps(info, indent=1).encode())
    opt_state = opt.state_dict() if opt_state is None else opt_state
    save_new({**state, "optimizer": opt_state, "rng": torch.get_rng_state(),
              "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
             tmp / "train_state.pt")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    remove_tree(old)
    if where != out:
        commit_overwrite(out)


def find_checkpoint(out: Path):
    for d in (out / "checkpoint", out / "checkpoint.old"):
        if not no_link(d).is_dir():
            continue
        if inside(d, "train_state.pt").exists():
            return d
    raise FileNotFoundError(f"--resume: no checkpoint in {out} "
                            "(looked for checkpoint/ and checkpoint.old/)")


def finite(record: dict) -> dict:
    """NaN and inf as the strings 'nan' and 'inf': a log line stays valid JSON."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def log(out: Path, record: dict):
    line = (json.dumps(finite(record), allow_nan=False) + "\n").encode()
    fd = open_no_link(write_dir(out) / "log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "wb") as f:
        f.write(line)


# ----------------------------------------------------------------------------------------------
# Resuming: train_state.pt read without pickle's code, then every field checked

STATE_FIELDS = {"step", "iteration", "offline", "stats", "optimizer", "rng", "cuda_rng"}


def load_train_state(ckpt: Path, opt, record, plan: dict, load_optimizer=None) -> dict:
    """Restore the optimizer and every random state saved in ckpt; return the saved training
    state (step, iteration, offline set of `record`s, its statistics). plan: what the fields
    must fit, {"steps", "iterations", "rows", "vocab"}. load_optimizer(state): how the optimizer
    takes its saved state when not opt.load_state_dict (a sharded run's, which checks it). The
    file is memory-mapped: processes on one machine share its pages. Read onto the CPU: rank 0
    saved it from cuda:0, and the optimizer moves each state to its parameter's device."""
    path = inside(ckpt, "train_state.pt")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        # torch's message advises weights_only=False, the unsafe option: not quoted
        what = str(e).split("\n")[0].split(". ")[0].removesuffix(".")
        raise ValueError(f"{path}: unreadable or not a plain training state ({what})") from None
    check_train_state(saved, path, None if load_optimizer else opt, record, plan)
    try:
        (load_optimizer or opt.load_state_dict)(saved["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: field optimizer: not this run's optimizer state ({e})") from None
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"]:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    offline = saved["offline"] and [record(*o) for o in saved["offline"]]
    return {"step": saved["step"], "iteration": saved["iteration"], "offline": offline,
            "stats": saved["stats"]}


def check_train_state(saved, path: Path, opt, record, plan: dict):
    """Every field of train_state.pt has its type and range, or one ValueError naming it (opt
    None: the optimizer state is checked by the sharded loader instead)."""
    def bad(field, what):
        raise ValueError(f"{path}: field {field}: {what} (a damaged or foreign checkpoint: "
                         "use another)")

    if not isinstance(saved, dict) or saved.keys() != STATE_FIELDS:
        bad("(top)", f"expected the fields {sorted(STATE_FIELDS)}, got "
                     f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__}")
    for field, lo, hi in (("step", 0, plan["steps"]), ("iteration", -1, plan["iterations"] - 1)):
        if not is_int(saved[field]) or not lo <= saved[field] <= hi:
            bad(field, f"{saved[field]!r}, expected an integer in [{lo}, {hi}] for this run")
    stats = saved["stats"]
    if not isinstance(stats, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                              for k, v in stats.items()):
        bad("stats", "expected an object of numbers")
    rng = saved["rng"]
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8
            and rng.shape == torch.get_rng_state().shape):
        bad("rng", "not the CPU generator's state (a uint8 tensor of "
                   f"{torch.get_rng_state().numel()} bytes)")
    cuda = saved["cuda_rng"]
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                             for t in cuda):
        bad("cuda_rng", "expected a list of uint8 tensors")
    if cuda and len(cuda) != torch.cuda.device_count():
        bad("cuda_rng", f"{len(cuda)} GPUs' states, this machine has {torch.cuda.device_count()}")
    if saved["offline"] is not None:
        check_offline(saved["offline"], record, plan, bad)
    if opt is not None:
        check_optimizer(saved["optimizer"], opt, bad)


def check_offline(offline, record, plan: dict, bad):
    """The offline set: one row per data row, each a `record` of token-id lists in the
    vocabulary (a TrainRow's inputs, targets and mask of one length), or floats."""
    if not isinstance(offline, list) or len(offline) != plan["rows"]:
        bad("offline", f"expected {plan['rows']} rows (one per data row)")
    for i, row in enumerate(offline):
        if not isinstance(row, (tuple, list)) or len(row) != len(record._fields):
            bad(f"offline[{i}]", f"expected the {len(record._fields)} fields {record._fields}")
        for name, value in zip(record._fields, row):
            if not row_field_ok(name, value, plan["vocab"]):
                bad(f"offline[{i}].{name}", "not a finite number" if name.startswith("ref_")
                    else "not a list of token ids in the vocabulary")
        if record._fields[1] == "inputs" and (len({len(row[1]), len(row[2]), len(row[3])}) > 1
                                              or not set(row[3]) <= {0, 1}):
            bad(f"offline[{i}]", "inputs, targets and mask differ in length, or mask is not 0/1")


def row_field_ok(name: str, value, vocab: int) -> bool:
    if name.startswith("ref_"):  # a PairRow's reference log-probs
        return isinstance(value, float) and math.isfinite(value)
    if name == "took":  # a BASH row's flags, or None
        return value is None or isinstance(value, list) and all(isinstance(t, bool)
                                                               for t in value)
    return isinstance(value, list) and all(is_int(t) and 0 <= t < vocab for t in value)


def check_optimizer(state, opt, bad):
    """The optimizer state: the groups and parameters of this model, each moment its shape."""
    ours = opt.state_dict()
    if (not isinstance(state, dict) or state.keys() != ours.keys()
            or not isinstance(state["param_groups"], list)
            or len(state["param_groups"]) != len(ours["param_groups"])):
        bad("optimizer", "not this optimizer's state (other parameter groups)")
    for g, mine in zip(state["param_groups"], ours["param_groups"]):
        if not isinstance(g, dict) or g.get("params") != mine["params"]:
            bad("optimizer.param_groups", "other parameters than this model's")
    params = [p for group in opt.param_groups for p in group["params"]]
    shapes = dict(zip(range(len(params)), (p.shape for p in params)))
    if not isinstance(state["state"], dict) or not set(state["state"]) <= set(shapes):
        bad("optimizer.state", "moments of parameters this model does not have")
    for k, moments in state["state"].items():
        if not isinstance(moments, dict):
            bad(f"optimizer.state[{k}]", "expected an object of tensors")
        for name, t in moments.items():
            want = () if name == "step" else shapes[k]
            if not (isinstance(t, torch.Tensor) and t.dtype.is_floating_point
                    and t.shape == want and torch.isfinite(t).all()):
                bad(f"optimizer.state[{k}].{name}", f"expected a finite float tensor of shape "
                                                   f"{tuple(want)}")


# ----------------------------------------------------------------------------------------------
# Run folders: one run per --out, locked for the run's life; --resume checks the saved settings

RUN_ENTRIES = ("checkpoint", "checkpoint.old", "log.jsonl")  # any of these: the folder holds a run
# What does not change the result: where it is written, how often it reports, the device. Not
# compared on --resume (the model, tokenizer and data are compared by content instead of path).
NOT_COMPARED = {"out", "device", "eval_every", "save_every", "stop_after", "resume", "overwrite",
                "resume_with_new_settings", "build_batch_size", "eval_data", "eval_max_new_tokens",
                "eval_temperature", "eval_samples", "init", "data", "activation_checkpointing",
                "build_memory_gb"}


def run_settings(args, tok, model_config: dict, data_sha256: str, tokenizer: dict[str, bytes],
                 world: int) -> dict:
    """The settings that decide a run's result, as saved in its checkpoint's run.json: the flags,
    the model's config, the tokenizer and the data by content, the number of processes (their
    floating-point sums differ, so a resume across world sizes would not be exact)."""
    s = {k: v for k, v in vars(args).items() if k not in NOT_COMPARED}
    s.update({f"model.{k}": v for k, v in model_config.items()})
    s.update(tokenizer=f"{tok.name} ({tok.vocab_size} tokens, sha256 "
                       f"{tokenizer_sha256(tok, tokenizer)})",
             data_sha256=data_sha256, world_size=world)
    return json.loads(json.dumps(s))  # as it reads back from run.json


def lock_out(out: Path) -> int:
    """flock on the --out folder itself for the run's life: no file deleted or replaced inside
    can lose it, and the kernel drops it when its holder dies (a killed run's lock is taken
    over). out/.lock holds the holder's PID, for a second run's message only."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"--out {out}: in use by another run, process {holder(out)} (wait for "
                         "it to end, or choose another --out)") from None
    try:
        no_link(out / ".lock").unlink(missing_ok=True)
        write_new(out / ".lock", f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def holder(out: Path) -> str:
    """The PID the lock holder wrote, or '?' (informational: the lock is the folder's flock)."""
    try:
        fd = open_no_link(out / ".lock", os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError):
        return "?"
    with os.fdopen(fd, "rb") as f:
        return f.read(32).decode(errors="replace").strip() or "?"


def claim_out(out: Path, args, settings) -> tuple[int, Path | None]:
    """Create and lock --out (only now, once everything else was checked), then make it ready.
    Returns (the lock, the highest folder we created or None) for release_out."""
    made = ([p for p in (out, *out.parents) if not p.exists()] or [None])[-1]
    if made and args.resume:
        raise ValueError(f"--out {out}: does not exist, so there is no run to --resume "
                         "(check the path)")
    out.mkdir(parents=True, exist_ok=True)
    fd = None
    try:
        writable(out)
        fd = lock_out(out)
        prepare_out(out, args, settings)
        return fd, made
    except BaseException:
        release_out(out, fd, made)
        raise


def writable(path: Path):
    """A folder (or the log) the run will write or empty, checked before training starts."""
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{path}: not writable, and the run writes there (check its permissions "
                         "or the disk, or choose another --out)")


def prepare_out(out: Path, args, settings):
    """Refuse links where the run writes; finish what a killed run left half-done; then refuse a
    folder holding another run unless --resume (settings checked) or --overwrite (the new run
    writes in out/.overwrite until its first checkpoint replaces the old run)."""
    for name in RUN_WRITES:
        no_link(out / name)
    finish_overwrite(out)
    remove_tree(out / "checkpoint.tmp")  # a save cut short: never valid
    for name in RUN_ENTRIES:
        writable(out / name)
    held = [n for n in RUN_ENTRIES if (out / n).exists()]
    if args.resume:
        if not held:
            raise ValueError(f"--out {out}: holds no run to --resume (no checkpoint or log.jsonl)")
        check_resume(out, args, settings)
    elif held:
        if not args.overwrite:
            raise ValueError(f"--out {out}: holds a run ({', '.join(held)}) (--resume to continue "
                             "it, --overwrite to replace it, or choose another --out)")
        os.mkdir(out / ".overwrite")


def commit_overwrite(out: Path):
    """An --overwrite run's first checkpoint is whole in out/.overwrite: it becomes the run. The
    rename to .overwrite.ready is the moment of the swap; the moves after it are redone by
    finish_overwrite if a kill cuts them short."""
    (out / ".overwrite").rename(out / ".overwrite.ready")
    finish_overwrite(out)


def finish_overwrite(out: Path):
    """An --overwrite run that never saved (.overwrite) is dropped: the old run stays the run.
    A swap in progress (.overwrite.ready) is completed: every old entry set aside in .replaced
    (named so once all are there), the new ones moved in, the old ones removed."""
    ready, part, old, gone = (out / n for n in (".overwrite.ready", ".replaced.part",
                                                ".replaced", ".replaced.del"))
    remove_tree(out / ".overwrite")
    if ready.exists():
        if not old.exists():
            part.mkdir(exist_ok=True)
            for name in RUN_ENTRIES:
                if (out / name).exists():
                    (out / name).rename(part / name)
            part.rename(old)
        for entry in ready.iterdir():
            entry.rename(out / entry.name)
        ready.rmdir()
    if old.exists():
        old.rename(gone)
    remove_tree(gone)


def check_resume(out: Path, args, settings):
    """--resume: the checkpoint's saved settings must equal this run's (or, with
    --resume-with-new-settings, its model must); the log is cut back to where the checkpoint was
    taken, so the steps after it are logged once, when they are redone."""
    try:
        ckpt = find_checkpoint(out)
    except FileNotFoundError:  # killed before its first checkpoint: a fresh start
        print(f"{out}: no complete checkpoint yet, starting from step 0", file=sys.stderr)
        ckpt, info = out, {"settings": settings, "log_bytes": 0}
    else:
        info = read_json(inside(ckpt, "run.json")) if (ckpt / "run.json").exists() else {}
    saved = info.get("settings")
    if not isinstance(saved, dict):
        if not args.resume_with_new_settings:
            raise ValueError(f"{ckpt}: has no run.json with its settings (made by an older "
                             "train.py); add --resume-with-new-settings to continue anyway")
        saved = settings
    diff = [k for k in sorted(settings.keys() | saved.keys()) if settings.get(k) != saved.get(k)]
    if diff and (not args.resume_with_new_settings or any(k.startswith("model.") for k in diff)):
        what = ", ".join(f"{'--' + k.replace('_', '-') if k in vars(args) else k} "
                         f"{settings.get(k)} (saved: {saved.get(k)})" for k in diff)
        raise ValueError(f"--resume: {out} was trained with other settings: {what} (run with the "
                         "saved ones, or add --resume-with-new-settings; the model cannot change)")
    if "log_bytes" in info:
        cut_log(out / "log.jsonl", info["log_bytes"], ckpt / "run.json")


def cut_log(log_file: Path, size, where: Path):
    """The log back to `size` bytes, where the checkpoint was taken; never longer than it is."""
    have = no_link(log_file).stat().st_size if log_file.exists() else 0
    if not is_int(size) or not 0 <= size <= have:
        raise ValueError(f"{where}: log_bytes is {size!r}, but {log_file} holds {have} bytes "
                         "(a log or run.json edited by hand: restore them, or start anew)")
    if log_file.exists():
        fd = open_no_link(log_file, os.O_WRONLY)
        os.ftruncate(fd, size)
        os.close(fd)


def release_out(out: Path, fd, made: Path | None):
    """Drop the lock (an --overwrite run that never saved leaves the old run as it was); remove
    the folders claim_out created if the run left nothing in them."""
    if fd is not None:
        remove_tree(out / ".overwrite")
        (out / ".lock").unlink(missing_ok=True)
        os.close(fd)
    for d in (out, *out.parents):
        if not made or not d.is_relative_to(made):
            break
        try:
            d.rmdir()
        except OSError:  # not empty: the run wrote something
            break


# ----------------------------------------------------------------------------------------------
# Signals: SIGINT and SIGTERM end a run like a failure, in one line, its folder resumable


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM, raised where the run is: the folder is released as after any
    failure, and the last checkpoint stays what --resume continues from."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.line = signum, None


HELD = {"depth": 0, "signum": None}  # signals_held's state: blocks open, a signal waiting


@contextlib.contextmanager
def signals_held():
    """SIGINT / SIGTERM arriving inside the block wait until it ends, then interrupt: a
    checkpoint being written is finished first (raised inside torch.save, the exception would
    surface as a RuntimeError and the checkpoint.tmp be left half-written)."""
    HELD["depth"] += 1
    try:
        yield
    finally:
        HELD["depth"] -= 1
    if not HELD["depth"] and HELD["signum"] is not None:
        signum, HELD["signum"] = HELD["signum"], None
        raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals():
    def stop(signum, frame):
        if HELD["depth"]:
            HELD["signum"] = signum
            return
        raise Interrupted(signum)
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def interrupted_line(out: Path, signum: int) -> str:
    """'error: interrupted by SIGINT at step N; ...the last checkpoint...', for a run in out."""
    where, step = write_dir(out), "0"
    if (where / "log.jsonl").exists():
        with open(no_link(where / "log.jsonl"), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            last = f.read().splitlines()[-1:]
        step = str(json.loads(last[0]).get("step", "?")) if last else "0"
    name = signal.Signals(signum).name
    if where != out:
        return (f"error: interrupted by {name} at step {step}, before this --overwrite run's "
                f"first checkpoint: the old run in {out} is kept as it was")
    try:
        ckpt = find_checkpoint(out)
    except FileNotFoundError:
        return (f"error: interrupted by {name} at step {step}; no checkpoint yet (--resume "
                "starts again from step 0)")
    saved = read_json(inside(ckpt, "run.json")).get("step", "?") if (
        ckpt / "run.json").exists() else "?"
    return (f"error: interrupted by {name} at step {step}; the last checkpoint is {ckpt} "
            f"(step {saved}): --resume continues from it")


def run_command(body, finish):
    """Run a command's body under stop_on_signals. An expected failure ends in its one error line
    and exit 1; SIGINT / SIGTERM in rank 0's line (Interrupted.line; "" on the other ranks) and
    exit 128 + the signal, printed once the progress bar has printed its last state. finish()
    runs however the body ends."""
    stopped = None
    try:
        with stop_on_signals():
            body()
    except EXPECTED as e:
        sys.exit(error_line(e))
    except Interrupted as e:
        stopped = (e.line if e.line is not None else f"error: interrupted by "
                   f"{signal.Signals(e.signum).name} before training started", 128 + e.signum)
    finally:
        finish()
    if stopped:
        if stopped[0]:
            print(stopped[0], file=sys.stderr)
        sys.exit(stopped[1])
