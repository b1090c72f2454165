"""The whole network in one file: a decoder for eleven Hugging Face families, its KV cache, the
masked loss, and loading and saving weights in each family's safetensors layout.

The base decoder is Llama's: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention,
pre-norm blocks, no biases. `GPTConfig.arch` names the family (its Hugging Face model_type); what
a family changes is a line in FAMILIES plus a few GPTConfig knobs read from its config.json:
  gpt2:     learned positions, LayerNorm, GELU (tanh) MLP, biases, head tied to the embedding.
  gpt_neox: (Pythia) LayerNorm, exact GELU, biases; rotary on the first rotary_pct of each
            head; parallel_residual; q/k/v fused and interleaved per head in the file.
  llama, mistral: the base (SmolLM2, Llama-2/3, Mistral); rope_scaling "llama3" or "linear".
  qwen2:    biases on q, k and v.       qwen3: RMSNorm on each head of q and k.
  smollm3:  no rotary on no_rope_layers. phi3: q/k/v and gate/up fused in the file.
  gemma:    embeddings x sqrt(d), RMSNorm by (1 + w), GELU-tanh gated MLP.
  olmo2:    RMSNorm on the whole q and k, and on each sublayer's output instead of its input.
  gemma3_text: gemma's, norms on q/k heads and after each sublayer too, sliding local layers.
Other families' sliding windows are not implemented: there block_size stops at the window, over
which full attention is the same computation.

from_pretrained and save_pretrained, at the end, are short: each family's config.json keys and
weight names, both ways, are in plumbing/hf_families.py, which a reader of the paper can skip.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plumbing.checks import check_fields, check_loading, inside, read_json
from plumbing.device import autocast_dtype
from plumbing.hf_families import (LIMITS, config_fields, config_problems, config_to_hf,
                                  hf_tensors, load_hf_state, param_count, write_hf_files)

# What each family fixes in the base decoder: norm "layer" (LayerNorm) or "rms_1p" (x (1 + w));
# mlp "gelu_tanh", "gelu" (exact erf) or "geglu" (GELU-tanh gate) instead of "swiglu"; qk_norm
# "head" (over each head) or "all" (over the whole projection); post_norm: normalise sublayer
# outputs, not inputs ("output") or both; embed_scale: embeddings x sqrt(n_embd); bias: all.
BASE = dict(norm="rms", mlp="swiglu", qk_norm=None, post_norm=None, embed_scale=False,
            bias=False)
FAMILIES = {"gpt2": dict(norm="layer", mlp="gelu_tanh", bias=True),
            "gpt_neox": dict(norm="layer", mlp="gelu", bias=True),
            "llama": {}, "mistral": {}, "qwen2": {}, "smollm3": {}, "phi3": {},
            "qwen3": dict(qk_norm="head"),
            "gemma": dict(norm="rms_1p", mlp="geglu", embed_scale=True),
            "olmo2": dict(qk_norm="all", post_norm="output"),
            "gemma3_text": dict(norm="rms_1p", mlp="geglu", embed_scale=True, qk_norm="head",
                                post_norm="both")}
ROPE_SCALING = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}


@dataclass
class GPTConfig:
    arch: str = "gpt2"              # the family, a key of FAMILIES
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
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" or "linear", its ROPE_SCALING keys}
    rotary_pct: float = 1.0         # gpt_neox, phi3: rotary on the first part of each head only
    no_rope_layers: tuple = ()      # smollm3: layers without rotary positions
    sliding_layers: tuple = ()      # gemma3_text: local layers, which read the last
    sliding_window: int | None = None  # sliding_window tokens, rotated by local_rope_theta
    local_rope_theta: float = 10000.0  # (no rope_scaling)
    query_pre_attn_scalar: float | None = None  # gemma3_text: softmax scale 1/sqrt(this)
    parallel_residual: bool | None = None  # gpt_neox: x + attn(ln_1(x)) + mlp(ln_2(x))
    bias: bool | None = None        # biases on every linear layer: the family's (FAMILIES)
    attn_bias: bool | None = None   # biases on q, k, v and the attention output (qwen3 may)
    tie_embeddings: bool = True     # lm_head shares the token embedding
    dropout: float = 0.0
    # config.json's bos/eos/pad_token_id, written back as they were (not the family's defaults)
    token_ids: dict = field(default_factory=dict)
    # fixed by the family (FAMILIES), never set by hand
    norm: str = field(init=False)
    mlp: str = field(init=False)
    qk_norm: str | None = field(init=False)
    post_norm: str | None = field(init=False)
    embed_scale: bool = field(init=False)
    qkv_bias: bool = field(init=False)  # qwen2: biases on q, k and v only

    def __post_init__(self):
        """Fill the family's traits and the defaults. Sizes that do not fit together are one
        ValueError listing each (plumbing/hf_families.config_problems)."""
        if self.arch not in FAMILIES:
            raise ValueError(f"arch must be one of {', '.join(FAMILIES)}, got {self.arch!r}")
        traits = {**BASE, **FAMILIES[self.arch]}
        problems = config_problems(self, traits, ROPE_SCALING)
        if problems:
            raise ValueError("; ".join(problems))
        self.bias = traits["bias"] if self.bias is None else self.bias
        self.attn_bias = self.bias if self.attn_bias is None else self.attn_bias
        for name in ("norm", "mlp", "qk_norm", "post_norm", "embed_scale"):
            setattr(self, name, traits[name])
        self.qkv_bias = self.attn_bias or self.arch == "qwen2"
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.no_rope_layers, self.sliding_layers = map(tuple, (self.no_rope_layers,
                                                               self.sliding_layers))
        if self.arch == "gemma3_text":  # transformers' default: the head size
            self.query_pre_attn_scalar = self.query_pre_attn_scalar or self.head_dim
        if self.parallel_residual is None:
            self.parallel_residual = self.arch == "gpt_neox"
        self.n_inner = self.n_inner or 4 * self.n_embd

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dims rotate (transformers' int(head_dim * rotary_pct))."""
        return int(self.head_dim * self.rotary_pct)


# ----------------------------------------------------------------------------------------------
# The network


class KVCache:
    """Keys and values of every layer, pre-allocated for `length` columns (gpt-fast style) and
    filled left to right: a forward writes its T tokens at columns filled .. filled + T - 1. A
    step attends to the columns written so far only: the unwritten ones would be masked out
    anyway, so reading them is wasted work."""

    def __init__(self, cfg: GPTConfig, batch: int, length: int, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, length, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.filled = 0  # columns written by the forwards before this one (a Python int: no sync)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this forward's keys and values after the filled columns; return every column
        written so far."""
        end = self.filled + k.shape[2]
        self.k[layer][:, :, self.filled:end] = k
        self.v[layer][:, :, self.filled:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def apply_rotary(x, cos, sin):
    """Rotate the first cos.shape[-1] dims of each head (all of them but in gpt_neox and phi3):
    x * cos + rotate_half(x) * sin, rotate_half mapping the halves (x1, x2) to (-x2, x1)."""
    r = cos.shape[-1]
    x, rest = x[..., :r], x[..., r:]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotated if rest.shape[-1] == 0 else torch.cat((rotated, rest), dim=-1)


def rope_tables(cfg: GPTConfig, local: bool = False):
    """cos and sin of every position's rotary angles, (block_size, rotary_dim), in fp32; local:
    those of gemma3_text's local layers."""
    dim, theta = cfg.rotary_dim, cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    scaling = (None if local else cfg.rope_scaling) or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":  # positions divided by factor
        inv_freq = inv_freq / scaling["factor"]
    elif scaling["rope_type"] == "llama3":  # Llama-3.1: slow the long wavelengths by factor,
        # keep the short ones, and interpolate between the two bounds
        factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        smooth = ((old * inv_freq / (2 * math.pi) - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    freqs = torch.outer(torch.arange(cfg.block_size, device="cpu").float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def band(mask, q, window: int):
    """Of the key columns each query of q may read (mask; None: causal), the last `window`: they
    are consecutive up to its own, so column j is in it when column j + window is not readable."""
    if mask is None:
        mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    ahead = torch.zeros_like(mask)
    ahead[..., :-window] = mask[..., window:]
    return mask & ~ahead


class GemmaRMSNorm(nn.RMSNorm):
    """Gemma's RMSNorm scales by (1 + w): its weights are stored as offsets from 1."""

    def reset_parameters(self):
        nn.init.zeros_(self.weight)

    def forward(self, x):
        y = F.rms_norm(x.float(), self.normalized_shape, eps=self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def make_norm(cfg: GPTConfig, size: int | None = None):
    size = size or cfg.n_embd
    if cfg.norm == "layer":
        return nn.LayerNorm(size, eps=cfg.norm_eps)
    return (GemmaRMSNorm if cfg.norm == "rms_1p" else nn.RMSNorm)(size, eps=cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        # one fused projection for q, k and v (GPT-2's c_attn; the others' are concatenated on
        # load)
        self.c_attn = nn.Linear(cfg.n_embd, q + 2 * kv, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(q, cfg.n_embd, bias=cfg.attn_bias)
        if cfg.qk_norm:  # qwen3: over each head of q and k; olmo2: over the whole of q and k
            head = cfg.qk_norm == "head"
            self.q_norm = make_norm(cfg, cfg.head_dim if head else q)
            self.k_norm = make_norm(cfg, cfg.head_dim if head else kv)
        self.rotary = layer not in cfg.no_rope_layers  # smollm3: some layers have no positions
        self.window = cfg.sliding_window if layer in cfg.sliding_layers else None  # gemma3_text
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None

    def forward(self, x, rope, mask, cache):
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim,
                                        cfg.n_kv_head * cfg.head_dim], dim=-1)
        if cfg.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None and self.rotary:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:  # the mask covers the columns written so far
            k, v = cache.update(self.layer, k, v)
        if self.window:  # a local layer reads the last `window` of the columns it may read
            mask = band(mask, q, self.window)
        kw = dict(dropout_p=cfg.dropout if self.training else 0.0, scale=self.scale,
                  enable_gqa=cfg.n_kv_head != cfg.n_head)
        # training and scoring: plain causal attention (right padding never leaks backwards)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        else:
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v.to(k.dtype), attn_mask=mask,
                                               **kw)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        # a gated MLP fuses its gate and up projections into one matmul (split on load/save)
        width = 2 * cfg.n_inner if self.kind in ("swiglu", "geglu") else cfg.n_inner
        self.c_fc = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "geglu":  # gemma
            gate, up = h.chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * up
        else:  # GPT-2's "gelu_new" is the tanh form, GPT-NeoX's "gelu" the exact one
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.ln_1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.ln_2, self.mlp = make_norm(cfg), MLP(cfg)
        if cfg.post_norm == "both":
            self.post_1, self.post_2 = make_norm(cfg), make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache):
        if self.cfg.post_norm == "both":  # gemma3_text: each sublayer's input and output
            x = x + self.drop(self.post_1(self.attn(self.ln_1(x), rope, mask, cache)))
            return x + self.drop(self.post_2(self.mlp(self.ln_2(x))))
        if self.cfg.post_norm:  # olmo2: each sublayer's output is normalised, not its input
            x = x + self.drop(self.ln_1(self.attn(x, rope, mask, cache)))
            return x + self.drop(self.ln_2(self.mlp(x)))
        a = self.drop(self.attn(self.ln_1(x), rope, mask, cache))
        if self.cfg.parallel_residual:  # gpt_neox: both sublayers read the same x
            return x + a + self.drop(self.mlp(self.ln_2(x)))
        x = x + a
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "gpt2":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            self.build_rope()
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # --activation-checkpointing: keep each block's input only, recompute the block in backward
        self.checkpointing = False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def build_rope(self):
        """The rope tables (cos | sin), not saved: rope, and local (gemma3_text's local layers)."""
        for name in ("rope", "local") if self.config.sliding_layers else ("rope",):
            tables = torch.stack(rope_tables(self.config, local=name == "local"))
            self.register_buffer(name, tables, persistent=False)

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

    def forward(self, idx, targets=None, noise_alpha=0.0, at=None):
        """Training and scoring. idx (B, T) token ids -> logits (B, T, vocab); or, given targets
        (B, T), -log p(target) in fp32 at each position whose target is not IGNORE, flattened row
        by row (N,), from chunked_nll (no full logits are made); `at`: those positions' flat
        indices, if known. noise_alpha: NEFTune's embedding noise."""
        h = self.hidden(idx, noise_alpha=noise_alpha)
        return self.lm_head(h) if targets is None else chunked_nll(self.lm_head, h, targets, at=at)

    def hidden(self, idx, pos=None, mask=None, cache=None, noise_alpha=0.0):
        """The final normalised hidden states (B, T, d); logits are lm_head of them, so that a
        caller that needs the logits of a few positions or rows makes only those.

        pos (B, T): each token's position (default 0..T-1; left-padded rows start later).
        mask (B, 1, T, columns): which columns each query may read, for left-padded rows (default
        causal). cache: decoding through a KVCache, which this forward fills T columns more of.
        noise_alpha: NEFTune, uniform noise of size alpha / sqrt(T * d) on the embeddings, in
        training only.
        """
        B, T = idx.shape
        x = self.wte(idx)
        if self.config.embed_scale:  # gemma, with sqrt(d) rounded to the compute dtype as it does
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        if noise_alpha > 0 and self.training:
            x = x + torch.empty_like(x).uniform_(-1, 1) * (noise_alpha / math.sqrt(T * x.shape[-1]))
        rope, dtype = None, autocast_dtype(x.device.type, x.dtype)  # fp32 tables would promote q, k
        if self.config.arch == "gpt2":
            x = x + (self.wpe(pos) if pos is not None else self.wpe.weight[:T])
        else:  # each token's pos, or 0..T-1 for every row: one table broadcast over the batch
            rope, local = ((t[:, :T] if pos is None else t[:, pos].unsqueeze(2)).to(dtype).unbind()
                           for t in (self.rope, getattr(self, "local", self.rope)))
        x = self.drop(x)
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.h):
            r = local if i in self.config.sliding_layers else rope
            if recompute:  # the RNG state is saved with the input, so dropout masks repeat exactly
                x = checkpoint(block, x, r, mask, cache, use_reentrant=False)
            else:
                x = block(x, r, mask, cache)
        if cache is not None:
            cache.filled += T
        return self.ln_f(x)


# ----------------------------------------------------------------------------------------------
# The loss of Eq. 1, 5 and 7: -log p(target) at the scored positions (train.step_loss sums them)

IGNORE = -1  # a target that is not scored: prompt positions, padding, RAC's agreeing tokens
# fp32 logits alive at once in chunked_nll (256 MiB): 1,365 positions of SmolLM2's 49,152-way head
LOGIT_BYTES = 1 << 28


def chunked_nll(head, hidden, targets, chunk=None, at=None):
    """-log p(target) in fp32 at each position of hidden (B, T, d) whose target (B, T) is not
    IGNORE, flattened row by row. Only those positions reach the head: exact, since a position's
    logits depend on its own hidden state alone. at: their flat indices (train.step_loss knows
    them from the rows); found here otherwise, which makes the host wait for a GPU.

    The technique of Liger Kernel's fused linear cross-entropy, in plain PyTorch: the logits of
    `chunk` positions at a time (default: LOGIT_BYTES of fp32 logits) are made, reduced to their
    losses and dropped; backward recomputes them chunk by chunk (checkpoint), so the logits of the
    whole micro-batch never exist, forward or backward. The cost: the head's matmul runs once more.
    """
    if at is None:
        at = (targets != IGNORE).flatten().nonzero().squeeze(1)
    hidden, targets = hidden.flatten(0, 1)[at], targets.flatten()[at]
    chunk = chunk or max(1, LOGIT_BYTES // (4 * head.weight.shape[0]))
    train = torch.is_grad_enabled()
    parts = [checkpoint(chunk_nll, head, h, t, use_reentrant=False) if train
             else chunk_nll(head, h, t)
             for h, t in zip(hidden.split(chunk), targets.split(chunk))]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def chunk_nll(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints: config.json + model.safetensors, converted by plumbing/hf_families.py


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
    fields, names = config_fields(hf, where, FAMILIES, ROPE_SCALING)
    return checked_config(fields, where, names)


def from_pretrained(path, dtype=torch.float32, device="cpu") -> GPT:
    """Load a checkpoint directory in the Hugging Face layout (config.json + safetensors)."""
    path = Path(path)
    cfg_file = inside(path, "config.json")
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json")
    cfg = config_from_hf(read_json(cfg_file), str(cfg_file))
    n = param_count(cfg)
    check_loading(n * dtype.itemsize, f"{cfg_file}: a model of {n:,} parameters", device)
    with torch.device("meta"):
        model = GPT(cfg)
    state = load_hf_state(cfg, path, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    if cfg.arch != "gpt2":  # non-persistent buffers were created on meta: build them for real
        model.build_rope()
    return model.to(device)


def save_pretrained(model: GPT, path, extra_config: dict | None = None, state: dict | None = None):
    """Write config.json + model.safetensors that transformers loads unchanged.

    Each file goes to a temporary name first and is renamed, so an interrupted save never leaves
    a half-written checkpoint behind. extra_config: our own fields (e.g. the tokenizer name).
    state: the weights to write, when not model.state_dict() (a sharded model's, gathered whole).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(model.config, model.state_dict() if state is None else state)
    config = {**config_to_hf(model.config), "torch_dtype": str(model.dtype).removeprefix("torch."),
              **(extra_config or {})}
    write_hf_files(path, tensors, config)
