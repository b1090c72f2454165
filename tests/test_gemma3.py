"""Gemma 3 (model_type gemma3_text) against transformers: tiny random models whose local layers
slide a window of 4 over sequences of 16, in a forward without a cache, in batched greedy
decoding of left-padded prompts (eager and the fixed-shape step of --compile-decode), saved back
in their own layout; each of its features changes the logits; what we lack is refused in one line;
the published config.json of gemma-3-1b reads as transformers reads it. tests/test_families.py
runs its general tests on conftest's gemma3_text too; tests/test_tokenizers.py has its tokenizer
and chat template."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import GEMMA3_ROPE
from generate import generate
from model import GPT, config_from_hf, from_pretrained, save_pretrained
from plumbing import decode_step
from plumbing.hf_families import config_to_hf
from test_families import edited_config, hf_greedy

tf = pytest.importorskip("transformers")
# local, local, global, local: a global layer between local ones, and a local one last
LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
# different lengths, most longer than the window; each is decoded 8 tokens on
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42], [100, 3, 17, 8, 2, 9, 33]]
NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, the transformers model it was saved from)."""
    torch.manual_seed(33)
    config = tf.Gemma3TextConfig(
        vocab_size=200, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        sliding_window=4, layer_types=LAYERS, query_pre_attn_scalar=24,
        rope_parameters=json.loads(json.dumps(GEMMA3_ROPE)), initializer_range=0.3,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = tf.Gemma3ForCausalLM(config)
    with torch.no_grad():  # the norms' weights start at 0 (a gain of 1): exercise them
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("gemma3")
    hf.save_pretrained(path)
    return path, hf.eval()


@torch.no_grad()
def logit_diff(ours, hf, T=16):
    x = torch.randint(0, 200, (3, T), generator=torch.Generator().manual_seed(0))
    ref = hf(x).logits
    assert ref.std() > 1e-2
    return (ours(x) - ref).abs().max().item()


def test_logits_match_transformers_past_the_window(tiny):
    path, hf = tiny
    ours = from_pretrained(path).eval()
    assert ours.config.sliding_layers == (0, 1, 3) and ours.config.sliding_window == 4
    assert logit_diff(ours, hf) < 1e-4


def test_batched_greedy_of_left_padded_prompts_matches_transformers(tiny):
    path, hf = tiny
    refs = [hf_greedy(hf, p, NEW) for p in PROMPTS]
    assert len({tuple(r) for r in refs}) == len(refs)
    assert generate(from_pretrained(path).eval(), PROMPTS, NEW) == refs


def test_fixed_shape_decode_step_keeps_the_window(tiny, monkeypatch):
    """--compile-decode's step reads every cache column, the unwritten ones masked: the window
    must still count back from the token's own column (compiled by dynamo, eager backend)."""
    path, hf = tiny
    torch._dynamo.reset()
    monkeypatch.setattr(decode_step, "COMPILED", {"cpu": torch.compile(
        decode_step.step, backend="eager", fullgraph=True)})
    model = from_pretrained(path).eval()
    model.compile_decode = True
    assert generate(model, PROMPTS, NEW) == [hf_greedy(hf, p, NEW) for p in PROMPTS]
    torch._dynamo.reset()


@torch.no_grad()
def test_saves_in_its_own_layout(tiny, tmp_path):
    path, hf = tiny
    ours = from_pretrained(path).eval()
    save_pretrained(ours, tmp_path)
    back, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(back) is tf.Gemma3ForCausalLM and not any(info.values())
    saved, original = load_file(tmp_path / "model.safetensors"), load_file(path / "model.safetensors")
    assert set(saved) == set(original) and all(torch.equal(saved[k], original[k]) for k in saved)
    assert back.config.layer_types == LAYERS and back.config.rope_parameters == hf.config.rope_parameters
    assert (back.config.sliding_window, back.config.query_pre_attn_scalar) == (4, 24)
    assert logit_diff(ours, back.eval()) < 1e-4
    assert from_pretrained(tmp_path).config == ours.config


@pytest.mark.parametrize("edit", [
    lambda c: c.update(layer_types=["full_attention"] * 4),  # no window, one rope base
    lambda c: c.update(sliding_window=64),  # the window ignored
    lambda c: c["rope_parameters"]["sliding_attention"].update(rope_theta=1000.0),  # the global base
    lambda c: c["rope_parameters"]["full_attention"].update(rope_type="default"),  # no scaling
    lambda c: c.update(query_pre_attn_scalar=16),  # the head size's scale
], ids=["all-global", "window", "local-base", "global-scaling", "scale"])
def test_each_feature_matters(tiny, tmp_path, edit):
    path, hf = tiny
    assert logit_diff(from_pretrained(edited_config(path, tmp_path / "wrong", edit)).eval(), hf) > 1e-2


def test_older_config_spelling_loads_alike(tiny, tmp_path):
    """config.json as transformers 4.5x wrote it: rope_theta, rope_scaling, rope_local_base_freq
    and a sliding_window_pattern (every 3rd layer global here) instead of layer_types."""
    path, hf = tiny

    def edit(c):
        rope = c.pop("rope_parameters")
        scaling = {k: v for k, v in rope["full_attention"].items() if k != "rope_theta"}
        c.update(rope_theta=rope["full_attention"]["rope_theta"], rope_scaling=scaling,
                 rope_local_base_freq=rope["sliding_attention"]["rope_theta"], sliding_window_pattern=3)
        del c["layer_types"]
    old = edited_config(path, tmp_path / "old", edit)
    assert from_pretrained(old).config == from_pretrained(path).config
    assert logit_diff(from_pretrained(old).eval(), hf) < 1e-4


@pytest.mark.parametrize("edit,key", [
    (lambda c: c["rope_parameters"]["full_attention"].update(rope_type="yarn"), "rope_type"),
    (lambda c: c["rope_parameters"]["sliding_attention"].update(rope_type="linear", factor=2.0),
     "sliding_attention.rope_type"),
    (lambda c: c.update(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (lambda c: c.update(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (lambda c: c.update(hidden_activation="gelu"), "hidden_activation"),
    (lambda c: c.update(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (lambda c: c.update(layer_types=["sliding_attention", "chunked_attention"] * 2), "layer_types"),
    (lambda c: c.update(sliding_window=None), "sliding_window"),
    (lambda c: c.update(model_type="gemma3"), "model_type"),
], ids=["yarn", "local-scaling", "final-softcap", "attn-softcap", "exact-gelu", "bidirectional",
        "layer-kind", "no-window", "multimodal"])
def test_unsupported_is_refused_in_one_line(tiny, edit, key):
    cfg = json.loads((tiny[0] / "config.json").read_text())
    edit(cfg)
    with pytest.raises(ValueError) as err:
        config_from_hf(cfg, "x/config.json")
    assert key in str(err.value) and "x/config.json" in str(err.value) and "\n" not in str(err.value)


# google/gemma-3-1b-it's config.json as published (transformers 4.50)
GEMMA3_1B = {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
             "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
             "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
             "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
             "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
             "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
             "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
             "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
             "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 262144}


def test_gemma3_1b_reads_as_published():
    cfg = config_from_hf(GEMMA3_1B)
    theirs = tf.AutoConfig.for_model(**GEMMA3_1B)
    assert [("sliding_attention" if i in cfg.sliding_layers else "full_attention")
            for i in range(cfg.n_layer)] == theirs.layer_types
    assert (cfg.block_size, cfg.sliding_window, cfg.rope_theta, cfg.local_rope_theta) == (32768, 512, 1e6, 1e4)
    with torch.device("meta"):
        assert GPT(cfg).num_params() == 999_885_952 == tf.Gemma3ForCausalLM(theirs).num_parameters()
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg  # and back
