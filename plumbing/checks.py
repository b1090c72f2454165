"""The checks on every input, and the one-line failure. A reader of the paper can skip this file.

- Reading: a checkpoint's files lie in its folder (no '..', absolute or symlinked names); data
  files are regular files read once, lines bounded; JSON is an object without duplicate keys,
  nested at most MAX_DEPTH deep; weights are floating and finite; sizes are range-checked and
  bounded by the free memory before anything is allocated; flags are typed when parsed.
- Failures: every expected failure (bad input, a bad checkpoint, a full or read-only disk,
  SIGINT / SIGTERM) is one line, 'error: <file or flag>: <what> (<what to do>)'.
(docs/safety.md; tests/test_safety.py checks each point.)
"""
import argparse
import errno
import itertools
import json
import math
import os
import re
import stat
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# ----------------------------------------------------------------------------------------------
# Failures: what bad input, a bad checkpoint or a full or read-only disk raise, as one line

EXPECTED = (ValueError, OSError, KeyError, SafetensorError)
OS_HINTS = {errno.ENOSPC: "free some space", errno.EROFS: "choose a writable place",
            errno.EACCES: "check its permissions", errno.ENOENT: "check the path",
            errno.EISDIR: "give a file, not a directory",
            errno.EFBIG: "free some space, or raise the file size limit (ulimit -f)"}


def error_line(e: BaseException) -> str:
    """'error: <file or flag>: <what> (<what to do>)', on one line, for an EXPECTED failure."""
    if isinstance(e, OSError) and e.filename:
        hint = OS_HINTS.get(e.errno)
        what = f"{e.filename}: {e.strerror}" + (f" ({hint})" if hint else "")
    else:
        what = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    return "error: " + " ".join(what.split())


DEBUG_ENV = "BASH_RAC_DEBUG"  # set (to anything but 0) for tracebacks instead of error lines


def script_main(name: str, body, debug: bool = False):
    """Run a script's body; any exception that escapes it ends in one `error: <name>: ...` line
    and exit 1, unless --debug or $BASH_RAC_DEBUG asks for the traceback."""
    try:
        return body()
    except Exception as e:
        if debug or os.environ.get(DEBUG_ENV, "0") != "0":
            raise
        line = error_line(e) if isinstance(e, EXPECTED) else (
            f"error: {type(e).__name__}: {e} (--debug or {DEBUG_ENV}=1 shows the traceback)")
        sys.exit(" ".join(line.replace("error: ", f"error: {name}: ", 1).split()))


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


def out_folder(text):
    """An argparse type for a script's --out folder: refused up front if it is a file."""
    if os.path.lexists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder (choose another --out)")
    return text


def out_file(text):
    """An argparse type for a file a script writes: refused up front if it is a folder."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file (give a file name)")
    return text


# ----------------------------------------------------------------------------------------------
# Reading files: names confined to their folder, regular files only, JSON objects of bounded
# nesting, safetensors, sizes in range


def inside(folder: Path, name: str, named_in: Path | None = None) -> Path:
    """folder/name, refused unless it lies in folder itself: a relative name without '..' and no
    symbolic link on the way, so a checkpoint cannot make us read (or copy out) files elsewhere.
    The one link followed: a Hugging Face hub cache snapshot's, into its own repository's blobs/
    (hub_blob). named_in: the file that gave the name, for the message."""
    rel = Path(name)
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{named_in or folder}: {name!r} points outside the checkpoint folder "
                         "(a checkpoint's files must lie in its folder)")
    path = folder
    for part in rel.parts:
        path = path / part
        if path.is_symlink() and not hub_blob(path):
            raise ValueError(f"{path}: is a symbolic link (copy the real file into {folder})")
    return path


def hub_blob(link: Path) -> bool:
    """link is models--ORG--NAME/snapshots/REV/.../FILE and resolves to a file directly in that
    same models--ORG--NAME/blobs/, as the hub cache lays files out."""
    snapshots = next((p for p in link.absolute().parents if p.name == "snapshots"), None)
    if snapshots is None or not snapshots.parent.name.startswith("models--"):
        return False
    real = link.resolve()
    return real.parent == snapshots.parent.resolve() / "blobs" and real.is_file()


MAX_LINE = 1 << 24  # 16 MiB: far past any context (2^18 tokens), so not a training row
KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe (FIFO)"),
         (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def regular_lines(path: Path, digest=None, error=ValueError):
    """(line number, bytes) of a regular file, read once (digest, a hashlib object, sees the same
    bytes), each line at most MAX_LINE bytes. A FIFO, a device or a directory is refused before
    a byte is read (opened without blocking, checked with fstat): `error` naming the file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        what = next((w for test, w in KINDS if test(kind)), "not a regular file")
        raise error(f"{path}: is {what}, not a regular file (give a JSONL file)")
    with os.fdopen(fd, "rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
            if len(raw) > MAX_LINE:
                raise error(f"{path}:{number}: a line longer than {MAX_LINE >> 20} MiB "
                                 "(one JSON object per line)")
            if digest is not None:
                digest.update(raw)
            yield number, raw


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


MAX_DEPTH = 64  # no file we read nests deeper than a few levels
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
NOT_BRACKET = re.compile(r"[^\[\]{}]")
BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest, counted before json.loads recurses
    (strings removed first, so a bracket inside one does not count)."""
    brackets = NOT_BRACKET.sub("", JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(BRACKET_STEP.get, brackets)), default=0)


def parse_json(text: str, where, error=ValueError):
    """json.loads without duplicate keys and at most MAX_DEPTH levels deep; a malformed text is
    `error` naming `where`."""
    if nesting(text) > MAX_DEPTH:
        raise error(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if "\n" in text.rstrip() else f"column {e.colno}"
        raise error(f"{where}: malformed JSON ({e.msg} at {at})") from None
    except RecursionError:  # brackets the count above missed inside a malformed string
        raise error(f"{where}: JSON nested deeper than {MAX_DEPTH} levels") from None
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


# Stored dtypes that convert to the model's exactly (or by rounding only, to a narrower one).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def checked_weight(t: torch.Tensor, name: str, file) -> torch.Tensor:
    """A stored weight, refused unless float32/16, bfloat16 or float64 with only finite values:
    an int tensor would be cast silently, and a NaN the loss never reads would train to the end."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{file}: weight {name!r} is {str(t.dtype).removeprefix('torch.')}, "
                         "expected float32, float16, bfloat16 or float64 (not a model checkpoint?)")
    if not torch.isfinite(t).all():
        raise ValueError(f"{file}: weight {name!r} holds NaN or inf (a broken checkpoint: use "
                         "an earlier one)")
    return t


def available_memory(device) -> int:
    """Bytes free for a new model on device: MemAvailable on a CPU; on CUDA the free memory plus
    what torch's allocator holds unused (what sharding freed stays cached there)."""
    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(need: int, what: str, device, fix: str):
    """Refuse an allocation of `need` bytes that cannot fit, before it is attempted."""
    have = available_memory(device)
    if need > have:
        raise ValueError(f"{what}: needs {need / 2 ** 30:.3g} GiB, more than the "
                         f"{have / 2 ** 30:.3g} GiB free on {device} ({fix})")


def check_loading(need: int, what: str, device):
    """Loading builds the whole state (`need` bytes) in host memory, in every process on this
    machine at once (torchrun's LOCAL_WORLD_SIZE, started together), then moves it to device."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    each = f" in each of the {local} processes on this machine" if local > 1 else ""
    fewer = ", or start fewer processes per machine" if local > 1 else ""
    check_memory(need * local, what + each, "cpu", "load it on a larger machine" + fewer)
    if torch.device(device).type != "cpu":
        check_memory(need, what, device, "load it on a larger machine")


def check_finite(step: int, terms: dict, norm: float):
    """Stop before an update whose loss terms or gradient norm are NaN or infinite (numbers read
    from the device once per step, by train_step)."""
    if not all(math.isfinite(v) for v in [*terms.values(), norm]):
        shown = ", ".join(f"{n} {v:.4g}" for n, v in terms.items())
        raise ValueError(f"step {step + 1}: the loss ({shown}) or the gradient norm ({norm:.4g}) "
                         "is not finite; stopped before the update, the last checkpoint is kept "
                         "(lower --lr, or check the data)")


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
# train.py's flags, checkpoint and plan: what must agree, checked before anything is written


def check_flags(parser, args, pair_data: bool):
    """Flags that exclude each other or must agree: parser.error (exit 2) names them."""
    if pair_data and args.sft_epochs:
        parser.error(f"--method {args.method} trains on the pairs from its first step: "
                     "--sft-epochs must be 0 (train SFT first, then --init from its checkpoint)")
    if args.micro_batch_size > args.batch_size:
        parser.error(f"--micro-batch-size {args.micro_batch_size} is larger than --batch-size "
                     f"{args.batch_size} (at most the batch)")
    if args.min_lr is not None and args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g} (the schedule decays)")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other (continue the run, or replace "
                     "it)")
    if args.resume_with_new_settings and not args.resume:
        parser.error("--resume-with-new-settings goes with --resume")


def check_model(args, raw, max_len: int):
    """What a checkpoint and the flags must agree on (after its vocabulary: check_vocab)."""
    if max_len > raw.config.block_size:
        raise ValueError(f"--max-len {max_len}: longer than the model's context of "
                         f"{raw.config.block_size} tokens (at most {raw.config.block_size})")


def check_training_memory(args, raw, world: int):
    """Gradients and AdamW's two moments (fp32: 12 bytes per parameter) are still to come, on
    each rank: under --fsdp its shard of them, 1/world, checked after sharding (which freed the
    rest of the whole model that loading put on every rank)."""
    n = raw.num_params()  # a sharded parameter counts its whole size
    share = world if args.fsdp else 1
    what = f"--init {args.init}: training its {n:,} parameters" + (
        f" under --fsdp, this rank's 1/{world} of them" if args.fsdp else "")
    more = ", or shard it over more processes" if args.fsdp else ""
    check_memory(12 * -(-n // share), what, raw.device, "train a smaller model" + more)


def check_plan(args, n_rows: int, world: int, per_epoch: int):
    """The batch against the data and the processes; every phase must have steps."""
    if args.batch_size > n_rows:
        raise ValueError(f"--batch-size {args.batch_size}: larger than the {n_rows} rows of "
                         f"{args.data} (at most {n_rows})")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the number of "
                         f"processes {world}")
    if round(args.iter_epochs * per_epoch) < 1:
        raise ValueError(f"--iter-epochs {args.iter_epochs:g}: no step in an iteration of "
                         f"{per_epoch} steps per epoch (at least {0.5 / per_epoch:g})")
