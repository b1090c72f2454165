"""Shared fixtures: tiny random transformers checkpoints written with save_pretrained (safetensors).

transformers is only the test oracle here; the code under test never imports it.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB = 200
ROPE_THETA = 1000.0     # llama_tied: far enough from 10000 that a wrong theta changes the logits
FAMILIES = ["gpt2", "llama_gqa", "llama_tied"]
# tests/test_families.py: one tiny model per family and feature, each built from its transformers
# config class with every size small
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)  # short: the scaling changes positions < 64
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
NEW_FAMILIES = {
    "gpt_neox": ("GPTNeoX", dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, rotary_pct=0.25,
                                 rotary_emb_base=1000, use_parallel_residual=True, tie_word_embeddings=False)),
    "gpt_neox_seq": ("GPTNeoX", dict(hidden_size=48, num_attention_heads=4, intermediate_size=80, rotary_pct=0.5,
                                     use_parallel_residual=False, tie_word_embeddings=True)),
    "mistral": ("Mistral", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                sliding_window=32, tie_word_embeddings=False)),
    "qwen2": ("Qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                            rope_theta=1000.0, tie_word_embeddings=True, sliding_window=16)),
    "qwen2_window": ("Qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                   use_sliding_window=True, sliding_window=16, max_window_layers=1,
                                   tie_word_embeddings=False)),
    "qwen3": ("Qwen3", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            intermediate_size=80, tie_word_embeddings=False)),
    "qwen3_bias": ("Qwen3", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                 intermediate_size=96, attention_bias=True, tie_word_embeddings=True)),
    "llama3_rope": ("Llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                  rope_scaling=LLAMA3, tie_word_embeddings=False)),
    "llama_linear": ("Llama", dict(hidden_size=64, num_attention_heads=4, intermediate_size=96,
                                   rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=True)),
    "smollm3": ("SmolLM3", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                no_rope_layers=[1, 0], rope_theta=1000.0, tie_word_embeddings=True)),
    "phi3": ("Phi3", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                           "partial_rotary_factor": 0.75}, tie_word_embeddings=False)),
    "gemma": ("Gemma", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                            intermediate_size=80, tie_word_embeddings=True)),
    "olmo2": ("Olmo2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                            tie_word_embeddings=False)),
    # a window of 4 on the local layer, shorter than the 17 tokens of the logits test and the prompts + new
    # tokens of generation; each rope base, the linear scaling and the softmax scale away from the defaults
    "gemma3_text": ("Gemma3Text", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       intermediate_size=80, sliding_window=4, query_pre_attn_scalar=24,
                                       layer_types=["sliding_attention", "full_attention"],
                                       rope_parameters=GEMMA3_ROPE, tie_word_embeddings=True)),
}


def hf_model(name: str):
    """A random transformers model: big enough init that logits are far from uniform (no greedy ties)."""
    import transformers as tf
    common = dict(vocab_size=VOCAB, initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common))
    elif name == "llama_gqa":  # grouped-query attention, untied head, default rope_theta
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=False, **common))
    elif name == "llama_tied":  # tied head, rope_theta != 10000, head_dim * heads != hidden_size
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
            max_position_embeddings=64, tie_word_embeddings=True, rope_theta=ROPE_THETA, **common))
    elif name in NEW_FAMILIES:
        kind, kwargs = NEW_FAMILIES[name]
        config = getattr(tf, kind + "Config")(num_hidden_layers=2, max_position_embeddings=64, **kwargs, **common)
        model = getattr(tf, kind.removesuffix("Text") + "ForCausalLM")(config)
    else:
        raise KeyError(name)
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so they are exercised too
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@dataclass
class Checkpoint:
    path: Path
    hf: torch.nn.Module     # the transformers model the checkpoint was written from (eval mode)

    @property
    def vocab(self) -> int:
        return self.hf.config.vocab_size


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(name, max_shard_size=None) -> Checkpoint, built once per session.

    The same transformers model backs every save of one name, so a sharded save holds the same
    weights as the single-file one.
    """
    models, dirs = {}, {}

    def get(name: str, max_shard_size: str | None = None) -> Checkpoint:
        if name not in models:
            torch.manual_seed(1234 + [*FAMILIES, *NEW_FAMILIES].index(name))
            models[name] = hf_model(name)
        key = (name, max_shard_size)
        if key not in dirs:
            d = tmp_path_factory.mktemp(f"{name}-{max_shard_size or 'single'}")
            kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
            models[name].save_pretrained(d, **kwargs)  # safetensors is the default format
            dirs[key] = d
        return Checkpoint(dirs[key], models[name])

    return get

