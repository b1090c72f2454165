"""Run folders, checkpoints and the checks on every input. A reader of the paper can skip this
file: it holds no method, only what keeps a run from losing work or trusting bad input
(nanochat's checkpoint_manager.py and nanoGPT's configurator.py are the precedent).

What it guarantees (README, "Safety and failure"; tests/test_safety.py checks each point):
- Reading: a checkpoint's files lie in its folder (no '..', absolute or symlinked names); JSON
  is an object without duplicate keys; safetensors files are readable; sizes are range-checked
  before anything is allocated; flags are typed and range-checked when parsed.
- Writing: a checkpoint is written to checkpoint.tmp and swapped in by renames, so a kill at any
  moment leaves a whole checkpoint; the log stays valid JSON Lines.
- Run folders: one run per --out, locked (flock) for the run's life; a folder holding a run is
  refused unless --resume (its saved settings compared) or --overwrite (the old run kept until the
  new one writes).
- Failures: every expected failure (bad input, a bad checkpoint, a full or read-only disk) is
  one line, 'error: <file or flag>: <what> (<what to do>)'.
"""
import argparse
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# ----------------------------------------------------------------------------------------------
# Failures: what bad input, a bad checkpoint or a full or read-only disk raise, as one line

EXPECTED = (ValueError, OSError, KeyError, SafetensorError)
OS_HINTS = {errno.ENOSPC: "free some space", errno.EROFS: "choose a writable place",
            errno.EACCES: "check its permissions", errno.ENOENT: "check the path",
            errno.EISDIR: "give a file, not a directory"}


def error_line(e: BaseException) -> str:
    """'error: <file or flag>: <what> (<what to do>)', on one line, for an EXPECTED failure."""
    if isinstance(e, OSError) and e.filename:
        hint = OS_HINTS.get(e.errno)
        what = f"{e.filename}: {e.strerror}" + (f" ({hint})" if hint else "")
    else:
        what = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    return "error: " + " ".join(what.split())


# ----------------------------------------------------------------------------------------------
# Flags: argparse types that check the range when the command line is parsed


def ranged(kind, lo=None, hi=None, above=None):
    """An argparse type: kind(text), finite, >= lo (or > above) and <= hi. argparse reports a
    bad value as 'argument --flag: expected <the range>, got <value>'."""
    bounds = [f"{op} {v:g}" for op, v in ((">=", lo), (">", above), ("<=", hi)) if v is not None]
    what = f"{'an integer' if kind is int else 'a number'} {' and '.join(bounds)}"

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and (lo is None or x >= lo) and (above is None or x > above)
                and (hi is None or x <= hi)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return x
    return parse


positive_int, non_negative_int = ranged(int, lo=1), ranged(int, lo=0)
positive_float, non_negative_float = ranged(float, above=0), ranged(float, lo=0)
fraction = ranged(float, lo=0, hi=1)


def device_name(text):
    try:
        kind = torch.device(text).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine (use cpu)")
    return text


# ----------------------------------------------------------------------------------------------
# Reading files: names confined to their folder, JSON objects, safetensors, sizes in range


def inside(folder: Path, name: str, named_in: Path | None = None) -> Path:
    """folder/name, refused unless it lies in folder itself: a relative name without '..' and no
    symbolic link on the way, so a checkpoint cannot make us read (or copy out) files elsewhere.
    named_in: the file that gave the name, for the message."""
    rel = Path(name)
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{named_in or folder}: {name!r} points outside the checkpoint folder "
                         "(a checkpoint's files must lie in its folder)")
    path = folder
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise ValueError(f"{path}: is a symbolic link (copy the real file into {folder})")
    return path


def unique_keys(pairs):
    """json object_pairs_hook: a key given twice is an error, not 'the last one wins'."""
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def json_object(obj, where, error=ValueError) -> dict:
    """obj if it is a JSON object (a dict), else `error` naming `where`."""
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_json(text: str, where, error=ValueError):
    """json.loads without duplicate keys; a malformed text is `error` naming `where`."""
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if "\n" in text.rstrip() else f"column {e.colno}"
        raise error(f"{where}: malformed JSON ({e.msg} at {at})") from None
    except ValueError as e:  # from unique_keys
        raise error(f"{where}: {e}") from None


def read_json(path: Path) -> dict:
    """A JSON file holding an object, or ValueError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return json_object(parse_json(text, path), path)


def open_safetensors(path: Path):
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_fields(fields: dict, limits: dict, where: str, names: dict | None = None):
    """Every field named in limits, {field: (type, lowest, highest)}, has its type and range;
    otherwise ValueError naming `where` and the field (`names` maps a field to what the user
    wrote, e.g. a config.json key or a flag)."""
    names = names or {}
    for key, value in fields.items():
        if key not in limits or value is None:
            continue
        kind, lo, hi = limits[key]
        ok = isinstance(value, bool) if kind is bool else (
            is_int(value) or kind is float and isinstance(value, float)) and lo <= value <= hi
        if not ok:
            what = "true or false" if kind is bool else (
                f"{'an integer' if kind is int else 'a number'} in [{lo:g}, {hi:g}]")
            raise ValueError(f"{where}: {names.get(key, key)} is {value!r}, expected {what}")


# ----------------------------------------------------------------------------------------------
# Checkpoints: the model in the Hugging Face layout + training state, replaced atomically

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def tokenizer_files(folder) -> list[Path]:
    """The tokenizer files of --init that a checkpoint carries (none may be a link elsewhere)."""
    paths = [inside(Path(folder), name) for name in TOKENIZER_FILES] if folder else []
    return [f for f in paths if f.exists()]


def save_checkpoint(write_model, opt, state, out: Path, tokenizer_dir, run_info=None):
    """Write out/checkpoint.tmp completely, then swap it in: at every moment a whole checkpoint
    exists at out/checkpoint or out/checkpoint.old. write_model(folder) writes the model's files;
    run_info: run.json, what --resume checks."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(tmp)
    for f in tokenizer_files(tokenizer_dir):  # self-contained for generate.py and transformers
        shutil.copy(f, tmp / f.name)
    if run_info is not None:
        (tmp / "run.json").write_text(json.dumps(run_info, indent=1))
    torch.save({**state, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / "train_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path):
    for d in (out / "checkpoint", out / "checkpoint.old"):
        if (d / "train_state.pt").exists():
            return d
    raise FileNotFoundError(f"--resume: no checkpoint in {out} "
                            "(looked for checkpoint/ and checkpoint.old/)")


def load_train_state(ckpt: Path, opt, record) -> dict:
    """Restore the optimizer and every random state saved in ckpt; return the saved training
    state (step, iteration, offline set of `record`s, its statistics)."""
    try:
        saved = torch.load(ckpt / "train_state.pt", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{ckpt / 'train_state.pt'}: unreadable ({e})") from None
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"]:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    offline = saved["offline"] and [record(*o) for o in saved["offline"]]
    return {"step": saved["step"], "iteration": saved["iteration"], "offline": offline,
            "stats": saved["stats"]}


def finite(record: dict) -> dict:
    """NaN and inf as the strings 'nan' and 'inf': a log line stays valid JSON."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def log(out: Path, record: dict):
    forget_replaced(out)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(finite(record), allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Run folders: one run per --out, locked for the run's life; --resume checks the saved settings

RUN_ENTRIES = ("checkpoint", "checkpoint.old", "log.jsonl")  # any of these: the folder holds a run
# What does not change the result: where it is written, how often it reports, the device. Not
# compared on --resume (the model, tokenizer and data are compared by content instead of path).
NOT_COMPARED = {"out", "device", "eval_every", "save_every", "stop_after", "resume", "overwrite",
                "resume_with_new_settings", "build_batch_size", "eval_data", "eval_max_new_tokens",
                "eval_temperature", "eval_samples", "init", "data"}


def run_settings(args, tok, model_config: dict) -> dict:
    """The settings that decide a run's result, as saved in its checkpoint's run.json."""
    s = {k: v for k, v in vars(args).items() if k not in NOT_COMPARED}
    s.update({f"model.{k}": v for k, v in model_config.items()})
    s.update(tokenizer=f"{tok.name} ({tok.vocab_size} tokens)",
             data_sha256=hashlib.sha256(Path(args.data).read_bytes()).hexdigest())
    return json.loads(json.dumps(s))  # as it reads back from run.json


def lock_out(out: Path) -> int:
    """Hold out/.lock for the run's life (flock), our PID written in it for a second run's
    message. The kernel drops the lock when its holder dies: a killed run's lock is taken over."""
    path = out / ".lock"
    for _ in range(3):  # the file may be unlinked by its holder between our open and our flock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"--out {out}: in use by another run, process {holder} (wait for "
                             "it to end, or choose another --out)") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise ValueError(f"--out {out}: the lock keeps changing hands (try again)")


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
        fd = lock_out(out)
        prepare_out(out, args, settings)
        return fd, made
    except BaseException:
        release_out(out, fd, made)
        raise


def prepare_out(out: Path, args, settings):
    """Clear what a killed run left half-done, then refuse a folder holding another run unless
    --resume (settings checked) or --overwrite (the old run set aside until the new one writes)."""
    shutil.rmtree(out / "checkpoint.tmp", ignore_errors=True)  # a save cut short: never valid
    shutil.rmtree(out / ".replaced.del", ignore_errors=True)
    restore_replaced(out)
    replaced, held = out / ".replaced", [n for n in RUN_ENTRIES if (out / n).exists()]
    if args.resume:
        if not held:
            raise ValueError(f"--out {out}: holds no run to --resume (no checkpoint or log.jsonl)")
        check_resume(out, args, settings)
    elif held:
        if not args.overwrite:
            raise ValueError(f"--out {out}: holds a run ({', '.join(held)}) (--resume to continue "
                             "it, --overwrite to replace it, or choose another --out)")
        replaced.mkdir()
        for name in held:
            (out / name).rename(replaced / name)


def check_resume(out: Path, args, settings):
    """--resume: the checkpoint's saved settings must equal this run's (or, with
    --resume-with-new-settings, its model must); the log is cut back to where the checkpoint was
    taken, so the steps after it are logged once, when they are redone."""
    try:
        ckpt = find_checkpoint(out)
    except FileNotFoundError:  # killed before its first checkpoint: a fresh start
        print(f"{out}: no complete checkpoint yet, starting from step 0", file=sys.stderr)
        info = {"settings": settings, "log_bytes": 0}
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
    if isinstance(info.get("log_bytes"), int) and (out / "log.jsonl").exists():
        os.truncate(out / "log.jsonl", info["log_bytes"])


def restore_replaced(out: Path):
    """An --overwrite run that ended (or was killed) before it wrote: the old run is still the
    run, put it back."""
    if (out / ".replaced").exists():
        for entry in (out / ".replaced").iterdir():
            entry.rename(out / entry.name)
        (out / ".replaced").rmdir()


def forget_replaced(out: Path):
    """--overwrite: the old run is removed when the new one first writes (renamed first, so a
    kill mid-removal never leaves half an old run to be restored)."""
    if (out / ".replaced").exists():
        (out / ".replaced").rename(out / ".replaced.del")
        shutil.rmtree(out / ".replaced.del")


def release_out(out: Path, fd, made: Path | None):
    """Drop the lock; remove the folders claim_out created if the run left nothing in them."""
    restore_replaced(out)
    if fd is not None:
        (out / ".lock").unlink(missing_ok=True)
        os.close(fd)
    for d in (out, *out.parents):
        if not made or not d.is_relative_to(made):
            break
        try:
            d.rmdir()
        except OSError:  # not empty: the run wrote something
            break
