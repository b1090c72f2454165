"""The Hugging Face layouts of the eleven families: config.json keys and weight names, both ways.
A reader of the paper can skip this file: model.py's from_pretrained and save_pretrained call it.

- config.json -> the fields of model.GPTConfig (config_fields; model.checked_config holds them
  to LIMITS before anything is allocated), and back (config_to_hf); a feature the decoder lacks
  is a one-line ValueError.
- Weights: hf_layout lists each of our parameters with the family's tensors it is made of (fused
  q|k|v and gate|up, GPT-2's transposed Conv1D, GPT-NeoX's per-head interleaving); load_hf_state
  reads model.safetensors (or the shards of an index) into our names, checking every name and
  shape; hf_tensors and write_hf_files write them back, atomically.
It works on plain dicts and tensors and imports nothing from the four files that hold the paper:
a config is read by its attributes (cfg.arch, cfg.n_embd, ...), and what the decoder supports
(model.FAMILIES, model.ROPE_SCALING) is passed in.
"""
import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from plumbing.checks import (check_fields, checked_weight, inside, is_int, json_object,
                             open_safetensors, read_json)

# ----------------------------------------------------------------------------------------------
# A config's sizes and switches: what model.GPTConfig refuses


def config_problems(cfg, traits: dict, rope_types: dict) -> list[str]:
    """Each way the fields of cfg (a GPTConfig as given, before its defaults are filled) do not
    fit together or into the family's layout (traits: model.FAMILIES over model.BASE)."""
    arch, problems = cfg.arch, []
    bias = traits["bias"] if cfg.bias is None else cfg.bias
    if bias != traits["bias"]:
        problems.append(f"the {arch} layout has {'' if traits['bias'] else 'no '}"
                        "biases on its linear layers")
    attn_bias = bias if cfg.attn_bias is None else cfg.attn_bias
    if attn_bias != bias and arch != "qwen3":
        problems.append(f"attention biases alone are not stored by the {arch} layout")
    n_kv_head = cfg.n_kv_head or cfg.n_head
    if cfg.n_head % n_kv_head:
        problems.append(f"n_head {cfg.n_head} is not a multiple of n_kv_head {n_kv_head}")
    if cfg.head_dim is None and cfg.n_embd % cfg.n_head:
        problems.append(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
    head_dim = cfg.head_dim or cfg.n_embd // cfg.n_head
    if arch == "gpt_neox" and (n_kv_head != cfg.n_head or head_dim * cfg.n_head != cfg.n_embd):
        problems.append("gpt_neox needs n_kv_head = n_head and head_dim = n_embd / n_head")
    rotary_dim = int(head_dim * cfg.rotary_pct)
    if arch != "gpt2" and (rotary_dim < 2 or rotary_dim % 2):
        problems.append(f"rotary positions need an even size, got {rotary_dim}")
    if cfg.rotary_pct != 1.0 and arch not in ("gpt_neox", "phi3"):
        problems.append(f"partial rotary (rotary_pct) is not in the {arch} layout")
    if cfg.no_rope_layers and (arch != "smollm3" or not all(
            is_int(i) and 0 <= i < cfg.n_layer for i in cfg.no_rope_layers)):
        problems.append("no_rope_layers are smollm3's, layer numbers below n_layer")
    if cfg.parallel_residual and arch != "gpt_neox":
        problems.append("parallel_residual is gpt_neox's only")
    if cfg.sliding_layers and (arch != "gemma3_text" or cfg.sliding_window is None or not all(
            is_int(i) and 0 <= i < cfg.n_layer for i in cfg.sliding_layers)):
        problems.append("sliding_layers are gemma3_text's, layer numbers below n_layer, and need "
                        "a sliding_window")
    if cfg.query_pre_attn_scalar is not None and arch != "gemma3_text":
        problems.append("query_pre_attn_scalar is gemma3_text's only")
    return problems + rope_scaling_problems(cfg.rope_scaling, rope_types)


def rope_scaling_problems(scaling, rope_types: dict) -> list[str]:
    if scaling is None:
        return []
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in rope_types or set(scaling) != {"rope_type", *rope_types[kind]}:
        return [f"rope_scaling must be {{'rope_type': 'linear' or 'llama3', and its keys "
                f"{rope_types}}}, got {scaling!r}"]
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        return ["rope_scaling: high_freq_factor must exceed low_freq_factor"]
    return []


# ----------------------------------------------------------------------------------------------
# config.json

REQUIRED = object()
# Sane bounds on every size, checked before anything is allocated: (type, lowest, highest).
# model.checked_config holds every config to them, read from config.json or from flags.
LIMITS = {"vocab_size": (int, 1, 1 << 20), "block_size": (int, 1, 1 << 18),
          "n_layer": (int, 1, 1024), "n_head": (int, 1, 1024), "n_kv_head": (int, 1, 1024),
          "n_embd": (int, 1, 1 << 16), "head_dim": (int, 2, 4096), "n_inner": (int, 1, 1 << 18),
          "norm_eps": (float, 0.0, 1.0), "rope_theta": (float, 1.0, 1e12),
          "rotary_pct": (float, 0.0, 1.0), "dropout": (float, 0.0, 1.0),
          "bias": (bool, None, None), "attn_bias": (bool, None, None),
          "parallel_residual": (bool, None, None), "tie_embeddings": (bool, None, None),
          "sliding_window": (int, 1, 1 << 24), "local_rope_theta": (float, 1.0, 1e12),
          "query_pre_attn_scalar": (float, 1e-6, 1e9)}
ROPE_LIMITS = {"factor": (float, 1e-3, 1e6), "low_freq_factor": (float, 0.0, 1e6),
               "high_freq_factor": (float, 0.0, 1e6),
               "original_max_position_embeddings": (int, 1, 1 << 24)}
HIDDEN_ACT = {"gpt_neox": ("gelu",),  # exact erf
              "gemma": ("gelu_pytorch_tanh", "gelu"),  # transformers reads gemma's "gelu" as tanh
              "gemma3_text": ("gelu_pytorch_tanh",)}  # ... but gemma3's as the exact one
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
SLIDING = ("mistral", "phi3", "qwen2", "qwen3", "smollm3")  # families with a sliding_window key


def config_fields(hf: dict, where: str, families, rope_types: dict) -> tuple[dict, dict]:
    """(fields, names): the GPTConfig keyword fields of a Hugging Face config.json, and for each
    field the config.json key it came from (for error messages; model.checked_config checks them
    against LIMITS). families: the model types the decoder has (model.FAMILIES); rope_types: its
    rope_scaling kinds and their keys (model.ROPE_SCALING)."""
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
    ids = {key: hf[key] for key in TOKEN_IDS if hf.get(key) is not None}
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: activation_function {act!r} is not supported "
                             "(GPT-2 uses 'gelu_new')")
        fields = dict(
            arch="gpt2", vocab_size=need("vocab_size"),
            block_size=need("n_positions", "block_size"),
            n_layer=need("n_layer"), n_head=need("n_head"), n_embd=need("n_embd"),
            n_inner=need("n_inner", default=None),
            norm_eps=need("layer_norm_epsilon", "norm_eps", 1e-5), bias=True,
            tie_embeddings=need("tie_word_embeddings", "tie_embeddings", True), token_ids=ids)
        return fields, names
    if kind not in families:
        raise ValueError(f"{where}: model_type {kind!r} is not supported ({', '.join(families)})")
    refuse_unsupported(hf, kind, where)
    if kind == "gemma3_text":  # its rope_parameters are one object per kind of layer
        theta, pct, scaling, local = gemma3_rope(hf, where, names, rope_types)
    else:
        theta, pct, scaling = rope_from_hf(hf, kind, where, names, rope_types)
    fields = dict(arch=kind, vocab_size=need("vocab_size"),
                  block_size=window_cap(hf, kind, need("max_position_embeddings", "block_size"),
                                        names),
                  n_layer=need("num_hidden_layers", "n_layer"),
                  n_head=need("num_attention_heads", "n_head"),
                  n_embd=need("hidden_size", "n_embd"),
                  n_inner=need("intermediate_size", "n_inner"),
                  rope_theta=theta, rotary_pct=pct, rope_scaling=scaling,
                  tie_embeddings=need("tie_word_embeddings", "tie_embeddings",
                                      kind in ("gemma", "smollm3", "gemma3_text")), token_ids=ids)
    if kind == "gpt_neox":
        fields.update(norm_eps=need("layer_norm_eps", "norm_eps", 1e-5),
                      parallel_residual=need("use_parallel_residual", "parallel_residual", True))
    else:
        fields.update(n_kv_head=need("num_key_value_heads", "n_kv_head", None),
                      head_dim=need("head_dim", default=None),
                      norm_eps=need("rms_norm_eps", "norm_eps", 1e-6))
    if kind == "qwen3":
        fields["attn_bias"] = need("attention_bias", "attn_bias", False)
    if kind == "smollm3":
        fields["no_rope_layers"] = no_rope_from_hf(hf, where)
    if kind == "gemma3_text":
        fields.update(local_rope_theta=local, sliding_layers=sliding_from_hf(hf, where),
                      sliding_window=need("sliding_window", default=None),
                      query_pre_attn_scalar=need("query_pre_attn_scalar", default=256))
    return fields, names


def refuse_unsupported(hf: dict, kind: str, where: str):
    """A feature this model does not have is a one-line ValueError naming its config.json key."""
    acts = HIDDEN_ACT.get(kind, ("silu",))
    act = "hidden_activation" if kind == "gemma3_text" else "hidden_act"
    if hf.get(act, acts[0]) not in acts:
        raise ValueError(f"{where}: {act} {hf[act]!r} is not supported for {kind} "
                         f"(expected {acts[0]!r})")
    bias = kind == "gpt_neox"  # the one family whose attention has biases by default
    if kind != "qwen3" and hf.get("attention_bias", bias) != bias:
        raise ValueError(f"{where}: attention_bias {hf['attention_bias']} is not supported for "
                         f"{kind}")
    for key in ("mlp_bias", "use_bidirectional_attention", "final_logit_softcapping",
                "attn_logit_softcapping"):
        if hf.get(key):
            raise ValueError(f"{where}: {key} {hf[key]} is not supported for {kind}")


def rope_from_hf(hf: dict, kind: str, where: str, names: dict, rope_types: dict):
    """(rope_theta, rotary_pct, rope_scaling) from rope_parameters (transformers 5) or the older
    keys: rope_theta and rope_scaling, gpt_neox's rotary_emb_base and rotary_pct. rope_types:
    the rope_scaling kinds the decoder has, with their keys (model.ROPE_SCALING)."""
    params, src = {}, None
    for key in ("rope_scaling", "rope_parameters"):  # the newer spelling wins
        value = hf.get(key) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {key} must be a JSON object")
        if value:
            params, src = {**params, **value}, key

    def pick(ours, key, old_keys, default):
        if params.get(key) is not None:
            names[ours] = f"{src}.{key}"
            return params[key]
        for old in old_keys:
            if hf.get(old) is not None:
                names[ours] = old
                return hf[old]
        return default

    theta = pick("rope_theta", "rope_theta", ("rope_theta", "rotary_emb_base"), 10000.0)
    pct = pick("rotary_pct", "partial_rotary_factor", ("partial_rotary_factor", "rotary_pct"),
               0.25 if kind == "gpt_neox" else 1.0)
    if pct != 1.0 and kind not in ("gpt_neox", "phi3"):
        raise ValueError(f"{where}: {names['rotary_pct']} {pct} is not supported for {kind}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, pct, None
    if rope_type not in rope_types:
        raise ValueError(f"{where}: {src}.rope_type {rope_type!r} is not supported "
                         f"(default, {', '.join(rope_types)})")
    scaling = {"rope_type": rope_type}
    for key in rope_types[rope_type]:
        value = params.get(key)
        if value is None and key == "original_max_position_embeddings":
            value = hf.get("max_position_embeddings")  # transformers' default
        if value is None:
            raise ValueError(f"{where}: {src} has no {key!r} for rope_type {rope_type!r}")
        scaling[key] = value
    check_fields(scaling, ROPE_LIMITS, f"{where}: {src}")
    return theta, pct, scaling


def gemma3_rope(hf: dict, where: str, names: dict, rope_types: dict):
    """gemma3_text's (rope_theta, rotary_pct, rope_scaling) of its global layers and the rope base
    of its local ones: rope_parameters {"full_attention": ..., "sliding_attention": ...}
    (transformers 5), or rope_theta, rope_scaling and rope_local_base_freq (4.x)."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or not set(params) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"{where}: rope_parameters must be an object with full_attention and "
                         "sliding_attention")
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    flat = {**hf, "rope_parameters": full, "rope_theta": hf.get("rope_theta", 1e6)}
    theta, pct, scaling = rope_from_hf(flat, "gemma3_text", where, names, rope_types)
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: rope_parameters.sliding_attention.rope_type "
                         f"{local['rope_type']!r} is not supported (default)")
    if local.get("rope_theta") is not None:
        names["local_rope_theta"] = "rope_parameters.sliding_attention.rope_theta"
        return theta, pct, scaling, local["rope_theta"]
    names["local_rope_theta"] = "rope_local_base_freq"
    return theta, pct, scaling, hf.get("rope_local_base_freq", 10000.0)


def sliding_from_hf(hf: dict, where: str) -> tuple:
    """gemma3_text's local layers: layer_types, or every layer but each sliding_window_pattern-th
    (transformers' default, 6)."""
    n, kinds = hf.get("num_hidden_layers"), hf.get("layer_types")
    if kinds is None and is_int(n):
        every = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        kinds = [("sliding_attention" if (i + 1) % every else "full_attention") for i in range(n)] \
            if is_int(every) and every > 0 else None
    if not isinstance(kinds, list) or len(kinds) != n or \
            any(k not in ("sliding_attention", "full_attention") for k in kinds):
        raise ValueError(f"{where}: layer_types must list sliding_attention or full_attention "
                         "for each of the num_hidden_layers")
    return tuple(i for i, k in enumerate(kinds) if k == "sliding_attention")


def window_cap(hf: dict, kind: str, block, names: dict):
    """block_size, or the sliding window where one applies and is shorter: full attention is
    sliding-window attention on sequences up to the window. qwen2, qwen3 and smollm3 slide only
    with use_sliding_window (then on some layers; capping is right whichever they are)."""
    window = hf.get("sliding_window") if kind in SLIDING else None
    if kind in ("qwen2", "qwen3", "smollm3") and not hf.get("use_sliding_window", False):
        window = None
    if is_int(block) and is_int(window) and window < block:
        names["block_size"] = "sliding_window"
        return window
    return block


def no_rope_from_hf(hf: dict, where: str) -> tuple:
    """smollm3's layers without rotary: no_rope_layers[i] is 1 where layer i HAS rotary (the
    transformers convention), by default every no_rope_layer_interval-th layer has none."""
    n = hf.get("num_hidden_layers")
    flags = hf.get("no_rope_layers")
    if flags is None and is_int(n):
        every = hf.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % every != 0) for i in range(n)] if is_int(every) and every else None
    if not isinstance(flags, list) or len(flags) != n or any(f not in (0, 1) for f in flags):
        raise ValueError(f"{where}: no_rope_layers must list a 0 or 1 for each of the "
                         "num_hidden_layers")
    return tuple(i for i, uses_rope in enumerate(flags) if not uses_rope)


HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM",
                    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "smollm3": "SmolLM3ForCausalLM", "phi3": "Phi3ForCausalLM",
                    "gemma": "GemmaForCausalLM", "olmo2": "Olmo2ForCausalLM",
                    "gemma3_text": "Gemma3ForCausalLM"}


def config_to_hf(cfg) -> dict:
    """The config.json of cfg's family (a model.GPTConfig), its own keys only."""
    if cfg.arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                "n_inner": cfg.n_inner, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                **cfg.token_ids}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    if cfg.rotary_pct != 1.0:
        rope["partial_rotary_factor"] = cfg.rotary_pct
    out = {"model_type": cfg.arch, "architectures": [HF_ARCHITECTURES[cfg.arch]],
           "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "hidden_size": cfg.n_embd, "intermediate_size": cfg.n_inner,
           "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.dropout,
           # transformers 5 reads rope_parameters; 4.x rope_theta and rope_scaling
           "rope_parameters": rope, "rope_theta": cfg.rope_theta,
           **({"rope_scaling": rope} if cfg.rope_scaling else {}),
           # none rather than the family's defaults, which may lie outside a small vocabulary
           **dict.fromkeys(TOKEN_IDS), **cfg.token_ids}
    if cfg.arch == "gpt_neox":
        return {**out, "hidden_act": "gelu", "layer_norm_eps": cfg.norm_eps,
                "use_parallel_residual": cfg.parallel_residual, "rotary_pct": cfg.rotary_pct,
                "rotary_emb_base": cfg.rope_theta, "attention_bias": True,
                "hidden_dropout": cfg.dropout}
    gelu = cfg.arch in ("gemma", "gemma3_text")
    out.update(num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
               rms_norm_eps=cfg.norm_eps, hidden_act="gelu_pytorch_tanh" if gelu else "silu")
    if cfg.arch == "gemma3_text":
        out.update(_gemma3_to_hf(cfg, rope))
    if cfg.arch in ("llama", "qwen3", "smollm3", "gemma", "olmo2", "gemma3_text"):
        out["attention_bias"] = cfg.attn_bias
    if cfg.arch in ("llama", "smollm3"):
        out["mlp_bias"] = False
    if cfg.arch in SLIDING:  # block_size stops at any window: none is needed
        out["sliding_window"] = None
    if cfg.arch in ("qwen2", "qwen3", "smollm3"):
        out["use_sliding_window"] = False
    if cfg.arch == "smollm3":
        out["no_rope_layers"] = [int(i not in cfg.no_rope_layers) for i in range(cfg.n_layer)]
    if cfg.arch == "phi3":  # only longrope reads it, which we do not write
        out["original_max_position_embeddings"] = cfg.block_size
        out["partial_rotary_factor"] = cfg.rotary_pct  # where transformers 4.x reads it
    return out


def _gemma3_to_hf(cfg, rope: dict) -> dict:
    """gemma3_text's own keys: rope_parameters per kind of layer (transformers 5) and the older
    rope_local_base_freq, the layer kinds, the window and the softmax scale."""
    local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta}
    return {"rope_parameters": {"full_attention": rope, "sliding_attention": local},
            "rope_local_base_freq": cfg.local_rope_theta, "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": ["sliding_attention" if i in cfg.sliding_layers else "full_attention"
                            for i in range(cfg.n_layer)],
            "sliding_window": cfg.sliding_window,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
            "final_logit_softcapping": None, "attn_logit_softcapping": None}


# ----------------------------------------------------------------------------------------------
# Weights: each of our parameters and the family's tensors it is made of

HEAD_NAME = {"gpt_neox": "embed_out.weight"}  # the head's name where not lm_head.weight


def _linear(ours: str, parts: list[tuple[str, int]], n_in: int, bias: bool, kind: str = ""):
    """Layout entries of our Linear `ours` made of the HF linears `parts` [(name, rows)]."""
    out = [(f"{ours}.weight", [(f"{name}.weight", (rows, n_in)) for name, rows in parts], kind)]
    if bias:
        out.append((f"{ours}.bias", [(f"{name}.bias", (rows,)) for name, rows in parts], kind))
    return out


def hf_layout(cfg) -> list[tuple[str, list[tuple[str, tuple]], str]]:
    """Each of our parameters: (our name, its Hugging Face parts [(name, shape)], kind).

    A fused parameter lists its parts in the order they are concatenated along dim 0. kind
    "conv1d" marks GPT-2's Conv1D weights, stored (in, out) where nn.Linear holds (out, in);
    "heads" gpt_neox's query_key_value, interleaved per head ([q_h, k_h, v_h] for each head h)
    where our c_attn is q | k | v.
    """
    d, inner = cfg.n_embd, cfg.n_inner
    if cfg.arch == "gpt2":
        out = _gpt2_layout(cfg)
    elif cfg.arch == "gpt_neox":
        out = [("wte.weight", [("gpt_neox.embed_in.weight", (cfg.vocab_size, d))], "")]
        for i in range(cfg.n_layer):
            p, h = f"gpt_neox.layers.{i}.", f"h.{i}."
            for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
                out += [(f"{h}{ours}.{w}", [(f"{p}{theirs}.{w}", (d,))], "")
                        for w in ("weight", "bias")]
            out += _linear(h + "attn.c_attn", [(p + "attention.query_key_value", 3 * d)], d, True,
                           "heads")
            out += _linear(h + "attn.c_proj", [(p + "attention.dense", d)], d, True)
            out += _linear(h + "mlp.c_fc", [(p + "mlp.dense_h_to_4h", inner)], d, True)
            out += _linear(h + "mlp.c_proj", [(p + "mlp.dense_4h_to_h", d)], inner, True)
        out += [(f"ln_f.{w}", [(f"gpt_neox.final_layer_norm.{w}", (d,))], "")
                for w in ("weight", "bias")]
    else:
        out = _llama_layout(cfg)
    if not cfg.tie_embeddings:
        out += [("lm_head.weight", [(HEAD_NAME.get(cfg.arch, "lm_head.weight"),
                                     (cfg.vocab_size, d))], "")]
    return out


def _gpt2_layout(cfg):
    d, inner = cfg.n_embd, cfg.n_inner
    out = [("wte.weight", [("transformer.wte.weight", (cfg.vocab_size, d))], ""),
           ("wpe.weight", [("transformer.wpe.weight", (cfg.block_size, d))], "")]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out += [(f"h.{i}.{ln}.{w}", [(f"{p}{ln}.{w}", (d,))], "") for w in ("weight", "bias")]
        for name, (n_in, n_out) in [("attn.c_attn", (d, 3 * d)), ("attn.c_proj", (d, d)),
                                    ("mlp.c_fc", (d, inner)), ("mlp.c_proj", (inner, d))]:
            out += [(f"h.{i}.{name}.weight", [(f"{p}{name}.weight", (n_in, n_out))], "conv1d"),
                    (f"h.{i}.{name}.bias", [(f"{p}{name}.bias", (n_out,))], "")]
    return out + [(f"ln_f.{w}", [(f"transformer.ln_f.{w}", (d,))], "") for w in ("weight", "bias")]


def _llama_layout(cfg):
    """llama, mistral, qwen2, qwen3, smollm3, phi3, gemma, olmo2 and gemma3_text: the same names
    but for phi3's fused projections, the q/k norms (qwen3, olmo2, gemma3_text) and the norms
    after the sublayers (olmo2's instead of before, gemma3_text's as well)."""
    d, hd, inner = cfg.n_embd, cfg.head_dim, cfg.n_inner
    q, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    fused = cfg.arch == "phi3"
    norms = {None: ("input_layernorm", "post_attention_layernorm"),  # ln_1, ln_2 (and post_1, 2)
             "output": ("post_attention_layernorm", "post_feedforward_layernorm"),
             "both": ("input_layernorm", "pre_feedforward_layernorm", "post_attention_layernorm",
                      "post_feedforward_layernorm")}[cfg.post_norm]
    out = [("wte.weight", [("model.embed_tokens.weight", (cfg.vocab_size, d))], "")]
    for i in range(cfg.n_layer):
        p, h = f"model.layers.{i}.", f"h.{i}."
        a, m = p + "self_attn.", p + "mlp."
        qkv = ([(a + "qkv_proj", q + 2 * kv)] if fused else
               [(a + "q_proj", q), (a + "k_proj", kv), (a + "v_proj", kv)])
        gate_up = ([(m + "gate_up_proj", 2 * inner)] if fused else
                   [(m + "gate_proj", inner), (m + "up_proj", inner)])
        out += [(h + "ln_1.weight", [(p + norms[0] + ".weight", (d,))], "")]
        out += _linear(h + "attn.c_attn", qkv, d, cfg.qkv_bias)
        out += _linear(h + "attn.c_proj", [(a + "o_proj", d)], q, cfg.attn_bias)
        if cfg.qk_norm:
            head = cfg.qk_norm == "head"
            out += [(h + "attn.q_norm.weight", [(a + "q_norm.weight", (hd if head else q,))], ""),
                    (h + "attn.k_norm.weight", [(a + "k_norm.weight", (hd if head else kv,))], "")]
        out += [(h + "ln_2.weight", [(p + norms[1] + ".weight", (d,))], "")]
        out += [(f"{h}post_{j}.weight", [(p + name + ".weight", (d,))], "")
                for j, name in enumerate(norms[2:], 1)]
        out += _linear(h + "mlp.c_fc", gate_up, d, False)
        out += _linear(h + "mlp.c_proj", [(m + "down_proj", d)], inner, False)
    return out + [("ln_f.weight", [("model.norm.weight", (d,))], "")]


def to_ours(tensors: list[torch.Tensor], kind: str, cfg) -> torch.Tensor:
    """One of our parameters from its HF parts (hf_layout's kind says how)."""
    t = torch.cat([p.t() if kind == "conv1d" else p for p in tensors], dim=0)
    if kind == "heads":  # (head, q|k|v, head_dim, ...) -> (q|k|v, head, head_dim, ...)
        t = t.view(cfg.n_head, 3, cfg.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return t


def to_hf(t: torch.Tensor, parts: list[tuple[str, tuple]], kind: str, cfg):
    """The HF parts of one of our parameters: to_ours undone."""
    if kind == "heads":
        t = t.view(3, cfg.n_head, cfg.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    pieces = t.split([shape[1] if kind == "conv1d" else shape[0] for _, shape in parts])
    return [p.t() if kind == "conv1d" else p for p in pieces]


def param_count(cfg) -> int:
    """The model's parameters, from its config alone: what it needs is known before allocating."""
    return sum(math.prod(shape) for _, parts, _ in hf_layout(cfg) for _, shape in parts)


# ----------------------------------------------------------------------------------------------
# Files: model.safetensors, or the shards an index lists

# Stored tensors that are not weights: GPT-2's and GPT-NeoX's causal-mask buffers, rotary caches
# of old exports.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attention.bias",
                    ".attention.masked_bias", "rotary_emb.inv_freq")


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


def load_hf_state(cfg, path: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
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

    for ours, parts, kind in hf_layout(cfg):
        tensors = []
        for name, shape in parts:
            if name not in files:
                raise ValueError(f"{source}: missing weight {name!r} "
                                 f"(expected shape {tuple(shape)})")
            t = read(name)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{files[name][0]}: weight {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(shape)}")
            tensors.append(t)
            used.add(name)
        state[ours] = to_ours(tensors, kind, cfg).to(dtype).contiguous()
    # a tied head may be stored as a copy
    tied_head = {HEAD_NAME.get(cfg.arch, "lm_head.weight")} if cfg.tie_embeddings else set()
    extra = [k for k in files
             if k not in used and k not in tied_head and not k.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise ValueError(f"{source}: unexpected weights {sorted(extra)[:5]} for a {cfg.arch} "
                         "model of this config")
    return state


def hf_tensors(cfg, state: dict) -> dict[str, torch.Tensor]:
    """Our state dict (cfg a model.GPTConfig) in the family's names and shapes, on the CPU."""
    tensors = {}
    for name, parts, kind in hf_layout(cfg):
        for (hf_name, _), piece in zip(parts, to_hf(state[name].detach(), parts, kind, cfg)):
            tensors[hf_name] = piece.to("cpu").contiguous()
    return tensors


def write_hf_files(path: Path, tensors: dict[str, torch.Tensor], config: dict):
    """model.safetensors, then config.json, each written under a temporary name and renamed, so
    an interrupted save never leaves a half-written file behind."""
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / "model.safetensors")
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, path / "config.json")
