"""The whole network in one file: a GPT-2 / Llama-family decoder, its KV cache, the masked
loss, and loading and saving weights in the Hugging Face safetensors layout.

Two families, chosen by `GPTConfig.arch`:
  gpt2:  learned positions, LayerNorm, GELU (tanh) MLP, biases, head tied to the embedding.
  llama: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, head tied or not
         (SmolLM2, Llama-3, Mistral-style checkpoints).
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file

from plumbing import (check_fields, check_memory, checked_weight, inside, is_int, json_object,
                      open_safetensors, read_json)


@dataclass
class GPTConfig:
    arch: str = "gpt2"              # "gpt2" or "llama"
    vocab_size: int = 50257
    block_size: int = 1024          # longest sequence the positions cover
    n_layer: int = 12
    n_head: int = 12
    # fewer key/value heads than query heads = grouped-query attention
    n_kv_head: int | None = None
    n_embd: int = 768
    head_dim: int | None = None     # default n_embd // n_head
    n_inner: int | None = None      # MLP width, default 4 * n_embd
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0     # llama only
    # biases on every linear layer; default: yes for gpt2, none for llama
    bias: bool | None = None
    tie_embeddings: bool = True     # lm_head shares the token embedding
    dropout: float = 0.0

    def __post_init__(self):
        """Fill the defaults; sizes that do not fit together are a ValueError listing each."""
        problems = []
        if self.arch not in ("gpt2", "llama"):
            problems.append(f"arch must be 'gpt2' or 'llama', got {self.arch!r}")
        if self.bias is None:
            self.bias = self.arch == "gpt2"
        if self.arch == "llama" and self.bias:
            problems.append("the llama family has no biases (the HF layout stores none)")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head {self.n_head} is not a multiple of n_kv_head "
                            f"{self.n_kv_head}")
        if self.head_dim is None and self.n_embd % self.n_head:
            problems.append(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.arch == "llama" and self.head_dim % 2:
            problems.append("rotary positions need an even head size")
        self.n_inner = self.n_inner or 4 * self.n_embd
        if problems:
            raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------------------------
# The network


class KVCache:
    """Keys and values of every layer, pre-allocated for `length` columns and written at explicit
    columns (gpt-fast style), so each decode step has the same shapes."""

    def __init__(self, cfg: GPTConfig, batch: int, length: int, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, length, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, cols: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].index_copy_(2, cols, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, cols, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(cfg: GPTConfig):
    """cos and sin of every position's rotary angles, (block_size, head_dim), in fp32."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device="cpu").float()
                                        / cfg.head_dim)
    freqs = torch.outer(torch.arange(cfg.block_size, device="cpu").float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        # one fused projection for q, k and v (GPT-2's c_attn; Llama's q/k/v_proj are
        # concatenated on load)
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim,
                                bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, rope, mask, cache, cols):
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim,
                                        cfg.n_kv_head * cfg.head_dim], dim=-1)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, cols, k, v)
        gqa = cfg.n_kv_head != cfg.n_head
        dropout = cfg.dropout if self.training else 0.0
        # training and scoring: plain causal attention (right padding never leaks backwards)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                               enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                               dropout_p=dropout, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        # SwiGLU fuses gate and up projections into one matmul (split on load/save)
        width = 2 * cfg.n_inner if self.swiglu else cfg.n_inner
        self.c_fc = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.c_proj(h)


def make_norm(cfg: GPTConfig):
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.ln_2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache, cols):
        x = x + self.drop(self.attn(self.ln_1(x), rope, mask, cache, cols))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "gpt2":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        """Where the weights are (all on one device)."""
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (all share one)."""
        return self.wte.weight.dtype

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, pos=None, cache=None, cols=None, mask=None, last_n=None, noise_alpha=0.0,
                head=True):
        """idx (B, T) token ids -> logits (B, T, vocab), or (B, last_n, vocab) for the last
        positions only.

        pos (B, T): each token's position (default 0..T-1; left-padded rows start later).
        cache, cols (T,), mask (B, 1, T, cache length): decoding through a KVCache, writing the new
        keys/values at columns `cols`; mask says which cache columns each query may read.
        noise_alpha: NEFTune, uniform noise of size alpha / sqrt(T * d) on the embeddings,
        training only.
        head=False: the final normalised hidden states (B, T or last_n, d) instead of logits, for a
        caller that needs the logits of some rows only and applies lm_head to those.
        """
        B, T = idx.shape
        x = self.wte(idx)
        if noise_alpha > 0 and self.training:
            x = x + torch.empty_like(x).uniform_(-1, 1) * (noise_alpha / math.sqrt(T * x.shape[-1]))
        rope = None
        if self.config.arch == "gpt2":
            x = x + (self.wpe(pos) if pos is not None else self.wpe.weight[:T])
        elif pos is None:  # every row starts at 0: one table broadcast over the batch
            rope = (self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype))
        else:
            rope = (self.rope_cos[pos].unsqueeze(1).to(x.dtype),
                    self.rope_sin[pos].unsqueeze(1).to(x.dtype))
        x = self.drop(x)
        for block in self.h:
            x = block(x, rope, mask, cache, cols)
        # decoding and labelling need a few positions: skip the head elsewhere
        if last_n is not None:
            x = x[:, -last_n:]
        x = self.ln_f(x)
        return self.lm_head(x) if head else x


def token_nll(logits, targets):
    """-log p(target) at every position, (B, T), in fp32."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return nll.view(targets.shape)


def masked_nll(logits, targets, mask, denom=None):
    """Token-level negative log-likelihood over the positions where mask is 1.

    Reduced as sum(loss * mask) / max(sum(mask), 1), so an all-zero mask gives 0, not NaN.
    `denom` overrides the count: under gradient accumulation pass the token count of the whole
    global batch, so every token weighs the same whatever micro-batch it fell in.
    """
    nll = token_nll(logits, targets).flatten()
    mask = mask.flatten().to(nll.dtype)
    if denom is None:
        denom = mask.sum().clamp(min=1)
    return (nll * mask).sum() / denom


# ----------------------------------------------------------------------------------------------
# Hugging Face layout: config.json + model.safetensors (or shards listed in an index)

REQUIRED = object()
# Sane bounds on every size, checked before anything is allocated: (type, lowest, highest)
LIMITS = {"vocab_size": (int, 1, 1 << 20), "block_size": (int, 1, 1 << 18),
          "n_layer": (int, 1, 1024), "n_head": (int, 1, 1024), "n_kv_head": (int, 1, 1024),
          "n_embd": (int, 1, 1 << 16), "head_dim": (int, 2, 4096), "n_inner": (int, 1, 1 << 18),
          "norm_eps": (float, 0.0, 1.0), "rope_theta": (float, 1.0, 1e12),
          "dropout": (float, 0.0, 1.0), "bias": (bool, None, None),
          "tie_embeddings": (bool, None, None)}


def checked_config(fields: dict, where: str, names: dict | None = None) -> GPTConfig:
    """GPTConfig(**fields) once every field has its type and range and the sizes fit together;
    otherwise ValueError naming `where` and the field (`names` maps a field to what the user
    wrote, e.g. a config.json key or a flag)."""
    check_fields(fields, LIMITS, where, names)
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """Our GPTConfig from a Hugging Face config.json, every size checked before any allocation."""
    json_object(hf, where)
    names = {}  # our field -> the config.json key it came from, for error messages

    def need(key, ours=None, default=REQUIRED):
        if hf.get(key) is None:
            if default is REQUIRED:
                raise ValueError(f"{where}: missing field {key!r}")
            return default
        names[ours or key] = key
        return hf[key]

    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: activation_function {act!r} is not supported "
                             "(GPT-2 uses 'gelu_new')")
        return checked_config(dict(
            arch="gpt2", vocab_size=need("vocab_size"),
            block_size=need("n_positions", "block_size"),
            n_layer=need("n_layer"), n_head=need("n_head"), n_embd=need("n_embd"),
            n_inner=need("n_inner", default=None),
            norm_eps=need("layer_norm_epsilon", "norm_eps", 1e-5), bias=True,
            tie_embeddings=need("tie_word_embeddings", "tie_embeddings", True)), where, names)
    if kind in ("llama", "mistral"):
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported "
                             "(expected 'silu')")
        rope = need("rope_parameters", default={})
        scaling = need("rope_scaling", default={})
        if not isinstance(rope, dict) or not isinstance(scaling, dict):
            raise ValueError(f"{where}: rope_parameters and rope_scaling must be JSON objects")
        if (rope.get("rope_type", "default") != "default"
                or (scaling and scaling.get("rope_type", scaling.get("type")) != "default")):
            raise ValueError(f"{where}: rope scaling {rope or scaling} is not supported, "
                             "only plain rotary positions")
        if hf.get("attention_bias", False) or hf.get("mlp_bias", False):
            raise ValueError(f"{where}: attention_bias/mlp_bias are not supported for "
                             "llama-type models")
        block = need("max_position_embeddings", "block_size")
        window = need("sliding_window", default=None)
        # our attention is full, which equals sliding-window attention up to the window
        if is_int(block) and is_int(window) and window < block:
            block, names["block_size"] = window, "sliding_window"
        return checked_config(dict(
            arch="llama", vocab_size=need("vocab_size"), block_size=block,
            n_layer=need("num_hidden_layers", "n_layer"),
            n_head=need("num_attention_heads", "n_head"),
            n_kv_head=need("num_key_value_heads", "n_kv_head", None),
            n_embd=need("hidden_size", "n_embd"), head_dim=need("head_dim", default=None),
            n_inner=need("intermediate_size", "n_inner"),
            norm_eps=need("rms_norm_eps", "norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", need("rope_theta", default=10000.0)), bias=False,
            tie_embeddings=need("tie_word_embeddings", "tie_embeddings", False)), where, names)
    raise ValueError(f"{where}: model_type {kind!r} is not supported (gpt2, llama, mistral)")


def config_to_hf(cfg: GPTConfig) -> dict:
    if cfg.arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                "n_inner": cfg.n_inner, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.n_embd,
            "head_dim": cfg.head_dim, "intermediate_size": cfg.n_inner,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": cfg.tie_embeddings}


def hf_layout(cfg: GPTConfig) -> list[tuple[str, list[tuple[str, tuple]], bool]]:
    """Each of our parameters: (our name, its Hugging Face parts [(name, shape)], transposed?).

    A fused parameter lists its parts in the order they are concatenated along dim 0.
    "transposed" marks GPT-2's Conv1D weights, stored (in, out) where nn.Linear holds (out, in).
    """
    d, hd, inner = cfg.n_embd, cfg.head_dim, cfg.n_inner
    q, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    out = []
    if cfg.arch == "gpt2":
        out += [("wte.weight", [("transformer.wte.weight", (cfg.vocab_size, d))], False),
                ("wpe.weight", [("transformer.wpe.weight", (cfg.block_size, d))], False)]
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                out += [(f"h.{i}.{ln}.{w}", [(f"{p}{ln}.{w}", (d,))], False)
                        for w in ("weight", "bias")]
            for ours, theirs, (n_in, n_out) in [("attn.c_attn", "attn.c_attn", (d, 3 * d)),
                                                ("attn.c_proj", "attn.c_proj", (d, d)),
                                                ("mlp.c_fc", "mlp.c_fc", (d, inner)),
                                                ("mlp.c_proj", "mlp.c_proj", (inner, d))]:
                out += [(f"h.{i}.{ours}.weight", [(f"{p}{theirs}.weight", (n_in, n_out))], True),
                        (f"h.{i}.{ours}.bias", [(f"{p}{theirs}.bias", (n_out,))], False)]
        out += [(f"ln_f.{w}", [(f"transformer.ln_f.{w}", (d,))], False) for w in ("weight", "bias")]
    else:
        out += [("wte.weight", [("model.embed_tokens.weight", (cfg.vocab_size, d))], False)]
        for i in range(cfg.n_layer):
            p = f"model.layers.{i}."
            out += [(f"h.{i}.ln_1.weight", [(f"{p}input_layernorm.weight", (d,))], False),
                    (f"h.{i}.attn.c_attn.weight", [(f"{p}self_attn.q_proj.weight", (q, d)),
                                                   (f"{p}self_attn.k_proj.weight", (kv, d)),
                                                   (f"{p}self_attn.v_proj.weight", (kv, d))],
                     False),
                    (f"h.{i}.attn.c_proj.weight", [(f"{p}self_attn.o_proj.weight", (d, q))], False),
                    (f"h.{i}.ln_2.weight", [(f"{p}post_attention_layernorm.weight", (d,))], False),
                    (f"h.{i}.mlp.c_fc.weight", [(f"{p}mlp.gate_proj.weight", (inner, d)),
                                                (f"{p}mlp.up_proj.weight", (inner, d))], False),
                    (f"h.{i}.mlp.c_proj.weight", [(f"{p}mlp.down_proj.weight", (d, inner))], False)]
        out += [("ln_f.weight", [("model.norm.weight", (d,))], False)]
    if not cfg.tie_embeddings:
        out += [("lm_head.weight", [("lm_head.weight", (cfg.vocab_size, d))], False)]
    return out


def param_count(cfg: GPTConfig) -> int:
    """The model's parameters, from its config alone: what it needs is known before allocating."""
    return sum(math.prod(shape) for _, parts, _ in hf_layout(cfg) for _, shape in parts)


# Stored tensors that are not weights: GPT-2's causal-mask buffers, rotary caches of old exports.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _weight_files(path: Path) -> tuple[dict[str, Path], Path]:
    """Map every stored tensor name to the safetensors file that holds it; also name the source."""
    single, index = inside(path, "model.safetensors"), inside(path, "model.safetensors.index.json")
    if single.exists():
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}, single
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            raise ValueError(f"{index}: needs a 'weight_map' object from tensor names to "
                             "file names")
        return {k: inside(path, shard, index) for k, shard in weight_map.items()}, index
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf_state(cfg: GPTConfig, path: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Read Hugging Face weights into our names, asserting every name and shape."""
    files, source = _weight_files(path)
    # some GPT-2 exports drop the "transformer." prefix: name them as transformers does
    bare = cfg.arch == "gpt2"
    files = {("transformer." + k if bare and not k.startswith(("transformer.", "lm_head")) else k):
             (f, k) for k, f in files.items()}  # HF name -> (file, name stored in it)
    handles, state, used = {}, {}, set()

    def read(name):
        file, stored = files[name]
        if file not in handles:
            handles[file] = open_safetensors(file)
        try:
            return checked_weight(handles[file].get_tensor(stored), stored, file)
        except SafetensorError as e:
            raise ValueError(f"{file}: cannot read {stored!r} ({e})") from None

    for ours, parts, transposed in hf_layout(cfg):
        tensors = []
        for name, shape in parts:
            if name not in files:
                raise ValueError(f"{source}: missing weight {name!r} "
                                 f"(expected shape {tuple(shape)})")
            t = read(name)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{files[name][0]}: weight {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(shape)}")
            tensors.append(t.t() if transposed else t)
            used.add(name)
        state[ours] = torch.cat(tensors, dim=0).to(dtype).contiguous()
    # a tied head may be stored as a copy
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = [k for k in files
             if k not in used and k not in tied_head and not k.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise ValueError(f"{source}: unexpected weights {sorted(extra)[:5]} for a {cfg.arch} "
                         "model of this config")
    return state


def from_pretrained(path, dtype=torch.float32, device="cpu") -> "GPT":
    """Load a checkpoint directory in the Hugging Face layout (config.json + safetensors)."""
    path = Path(path)
    cfg_file = inside(path, "config.json")
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json")
    cfg = config_from_hf(read_json(cfg_file), str(cfg_file))
    n = param_count(cfg)
    check_memory(n * dtype.itemsize, f"{cfg_file}: a model of {n:,} parameters", device,
                 "load it on a larger machine")
    with torch.device("meta"):
        model = GPT(cfg)
    state = load_hf_state(cfg, path, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    if cfg.arch == "llama":  # non-persistent buffers were created on meta: build them for real
        model.rope_cos, model.rope_sin = rope_tables(cfg)
    return model.to(device)


def save_pretrained(model: GPT, path, extra_config: dict | None = None):
    """Write config.json + model.safetensors that transformers loads unchanged.

    Each file goes to a temporary name first and is renamed, so an interrupted save never leaves
    a half-written checkpoint behind. extra_config: our own fields (e.g. the tokenizer name).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    ours = dict(model.state_dict())
    tensors = {}
    for name, parts, transposed in hf_layout(cfg):
        t = ours[name].detach()
        t = t.t() if transposed else t
        for (hf_name, shape), piece in zip(parts, t.split([shape[0] for _, shape in parts])):
            tensors[hf_name] = piece.to("cpu").contiguous()
    config = {**config_to_hf(cfg), "torch_dtype": str(model.dtype).removeprefix("torch."),
              **(extra_config or {})}
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / "model.safetensors")
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, path / "config.json")
