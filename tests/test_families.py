"""Every model family against transformers (the oracle): tiny random-weight models of each family
and feature (conftest.NEW_FAMILIES, every weight randomised, norm gains and biases included) give
our logits within 1e-4 of transformers', the same greedy continuations of a mixed-length batch,
and a save that transformers loads unchanged; a feature we do not have is refused in one line."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import NEW_FAMILIES
from generate import generate
from model import GPT, GPTConfig, config_from_hf, from_pretrained, save_pretrained
from plumbing.hf_families import config_to_hf

FAMILIES = list(NEW_FAMILIES)
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [100, 3, 17, 8, 2]]   # different lengths
NEW = 6


def tokens(vocab, block, seed=0):
    return torch.randint(0, vocab, (3, min(17, block)), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_diff(ours, hf):
    """max |our logits - transformers'| on random tokens; checks the reference is not flat."""
    x = tokens(ours.config.vocab_size, ours.config.block_size)
    ref = hf(x).logits
    assert ref.std() > 1e-2, "reference logits are near-constant: equality would prove nothing"
    out = ours(x)
    assert out.shape == ref.shape
    return (out - ref).abs().max().item()


@torch.no_grad()
def hf_greedy(hf, prompt, n):
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def edited_config(src, dst, edit):
    """A copy of checkpoint src at dst whose config.json went through edit(dict)."""
    dst.mkdir()
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(hf_checkpoint, name):
    ckpt = hf_checkpoint(name)
    assert max_logit_diff(from_pretrained(ckpt.path).eval(), ckpt.hf) < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_greedy_matches_transformers(hf_checkpoint, name):
    ckpt = hf_checkpoint(name)
    refs = [hf_greedy(ckpt.hf, p, NEW) for p in PROMPTS]
    assert len({tuple(r) for r in refs}) == len(refs), "degenerate reference: rows alike"
    assert generate(from_pretrained(ckpt.path).eval(), PROMPTS, NEW) == refs


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_save_loads_in_transformers_unchanged(hf_checkpoint, tmp_path, name):
    from transformers import AutoModelForCausalLM
    ckpt = hf_checkpoint(name)
    ours = from_pretrained(ckpt.path).eval()
    save_pretrained(ours, tmp_path)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf) is type(ckpt.hf)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    saved, original = load_file(tmp_path / "model.safetensors"), load_file(ckpt.path / "model.safetensors")
    assert set(saved) == set(original)  # the family's own names, fused tensors split back
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    assert max_logit_diff(ours, hf.eval()) < 1e-4
    assert max_logit_diff(from_pretrained(tmp_path).eval(), ckpt.hf) < 1e-4


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2", "qwen3", "smollm3", "phi3", "gemma", "olmo2"])
def test_save_of_a_new_model_round_trips(tmp_path, arch):
    """A model we built (not loaded) writes a config that transformers and we read alike."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    ours = GPT(GPTConfig(arch=arch, vocab_size=200, block_size=64, n_layer=2, n_head=4, n_embd=32,
                         n_inner=64, rotary_pct=0.5 if arch in ("gpt_neox", "phi3") else 1.0,
                         no_rope_layers=(1,) if arch == "smollm3" else ())).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_pretrained(ours, tmp_path)
    assert from_pretrained(tmp_path).config == ours.config
    assert max_logit_diff(ours, AutoModelForCausalLM.from_pretrained(tmp_path).eval()) < 1e-4


# ----------------------------------------------------------------------------------------------
# each feature changes the logits of its tiny model: the tests above would see it ignored


@pytest.mark.parametrize("name,edit", [
    ("llama3_rope", lambda c: c.pop("rope_parameters")),
    ("llama_linear", lambda c: c.pop("rope_parameters")),
    ("smollm3", lambda c: c.update(model_type="llama")),  # the silent relabelling of issue 20
    ("gpt_neox", lambda c: c.update(use_parallel_residual=False)),
    ("phi3", lambda c: c["rope_parameters"].update(partial_rotary_factor=1.0)),
], ids=["llama3", "linear", "smollm3-as-llama", "neox-sequential", "phi3-full-rotary"])
def test_each_feature_matters(hf_checkpoint, tmp_path, name, edit):
    ckpt = hf_checkpoint(name)
    wrong = from_pretrained(edited_config(ckpt.path, tmp_path / "wrong", edit)).eval()
    assert max_logit_diff(wrong, ckpt.hf) > 1e-2


def _older_spelling(keys):
    """config.json as transformers 4.x wrote it: the rope keys at the top level, none nested."""
    def edit(cfg):
        rope = cfg.pop("rope_parameters")
        cfg.update({theirs: rope[ours] for ours, theirs in keys.items() if ours in rope})
        scaling = {k: v for k, v in rope.items() if k not in keys}
        if scaling.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = scaling
    return edit


@pytest.mark.parametrize("name,keys", [
    ("gpt_neox", {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}),
    ("llama3_rope", {"rope_theta": "rope_theta"}),
    ("phi3", {"rope_theta": "rope_theta", "partial_rotary_factor": "partial_rotary_factor"}),
], ids=["neox-rotary_pct", "llama3-rope_scaling", "phi3-top-level"])
def test_older_config_spellings_load_alike(hf_checkpoint, tmp_path, name, keys):
    ckpt = hf_checkpoint(name)
    old = edited_config(ckpt.path, tmp_path / "old", _older_spelling(keys))
    assert "rope_parameters" not in json.loads((old / "config.json").read_text())
    assert max_logit_diff(from_pretrained(old).eval(), ckpt.hf) < 1e-4


def test_sliding_window_caps_block_size_only_where_it_applies(hf_checkpoint):
    assert from_pretrained(hf_checkpoint("qwen2_window").path).config.block_size == 16
    assert from_pretrained(hf_checkpoint("mistral").path).config.block_size == 32
    cfg = json.loads((hf_checkpoint("qwen2_window").path / "config.json").read_text())
    assert cfg["sliding_window"] == 16
    cfg["use_sliding_window"] = False  # then transformers' layers are all full
    assert config_from_hf(cfg).block_size == 64


# ----------------------------------------------------------------------------------------------
# refused in one line naming the key


@pytest.mark.parametrize("name,edit,key", [
    ("llama3_rope", lambda c: c["rope_parameters"].update(rope_type="yarn"), "rope_type"),
    ("phi3", lambda c: c["rope_parameters"].update(rope_type="longrope"), "rope_type"),
    ("llama3_rope", lambda c: c.update(attention_bias=True), "attention_bias"),
    ("llama3_rope", lambda c: c.update(mlp_bias=True), "mlp_bias"),
    ("llama3_rope", lambda c: c["rope_parameters"].update(partial_rotary_factor=0.5),
     "partial_rotary_factor"),
    ("llama3_rope", lambda c: c["rope_parameters"].pop("low_freq_factor"), "low_freq_factor"),
    ("qwen2", lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    ("gpt_neox", lambda c: c.update(attention_bias=False), "attention_bias"),
    ("gpt_neox", lambda c: c.update(hidden_act="gelu_new"), "hidden_act"),
    ("gemma", lambda c: c.update(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("smollm3", lambda c: c.update(no_rope_layers=[1, 0, 1]), "no_rope_layers"),
    ("gemma", lambda c: c.update(model_type="gemma2"), "model_type"),
], ids=["yarn", "longrope", "llama-attention_bias", "mlp_bias", "llama-partial", "llama3-key",
        "qwen2-act", "neox-no-bias", "neox-act", "gemma-bidirectional", "smollm3-layers", "gemma2"])
def test_unsupported_feature_is_refused_in_one_line(hf_checkpoint, name, edit, key):
    cfg = json.loads((hf_checkpoint(name).path / "config.json").read_text())
    edit(cfg)
    with pytest.raises(ValueError) as err:
        config_from_hf(cfg, "x/config.json")
    message = str(err.value)
    assert key in message and "x/config.json" in message and "\n" not in message


# ----------------------------------------------------------------------------------------------
# weights stored in half precision load, converted, with the same checks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_weights_load_converted(hf_checkpoint, tmp_path, dtype):
    from transformers import AutoModelForCausalLM
    src = hf_checkpoint("gpt_neox").path
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(src / "config.json", half / "config.json")
    save_file({k: v.to(dtype) for k, v in load_file(src / "model.safetensors").items()},
              str(half / "model.safetensors"), metadata={"format": "pt"})
    ours = from_pretrained(half).eval()
    assert ours.dtype == torch.float32
    hf = AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32).eval()
    assert max_logit_diff(ours, hf) < 1e-4
    assert from_pretrained(half, dtype=dtype).dtype == dtype


def test_old_gpt_neox_buffers_are_skipped(hf_checkpoint, tmp_path):
    """Old Pythia exports also store the causal mask and the rotary frequencies of each layer."""
    ckpt = hf_checkpoint("gpt_neox")
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(ckpt.path / "config.json", old / "config.json")
    sd = load_file(ckpt.path / "model.safetensors")
    for i in range(2):
        p = f"gpt_neox.layers.{i}.attention."
        sd.update({p + "bias": torch.ones(1, 1, 64, 64, dtype=torch.bool).tril(),
                   p + "masked_bias": torch.tensor(-1e9), p + "rotary_emb.inv_freq": torch.ones(2)})
    save_file(sd, str(old / "model.safetensors"), metadata={"format": "pt"})
    assert max_logit_diff(from_pretrained(old).eval(), ckpt.hf) < 1e-4


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_half_precision_weights_keep_the_checks(hf_checkpoint, tmp_path, change):
    src = hf_checkpoint("qwen2").path
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(src / "config.json", bad / "config.json")
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    name = "model.layers.1.self_attn.k_proj.bias"
    sd[name] = (torch.zeros(sd[name].shape[0] + 1, dtype=torch.bfloat16) if change == "shape"
                else sd[name].to(torch.int8))
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        from_pretrained(bad)
    assert name in str(err.value) and "model.safetensors" in str(err.value)
    assert ("shape" if change == "shape" else "int8") in str(err.value)


# ----------------------------------------------------------------------------------------------
# the paper's two models: their published config.json files read as the right network

PYTHIA_1B = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
             "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
             "intermediate_size": 8192, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
             "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 16,
             "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
             "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True,
             "vocab_size": 50304}
MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
              "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
              "intermediate_size": 14336, "max_position_embeddings": 32768,
              "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
              "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "use_cache": True, "vocab_size": 32000}


@pytest.mark.parametrize("hf,params,block,rotary", [(PYTHIA_1B, 1_011_781_632, 2048, 64),
                                                    (MISTRAL_7B, 7_241_732_096, 4096, 128)],
                         ids=["pythia-1b", "mistral-7b"])
def test_the_papers_models_read_as_published(hf, params, block, rotary):
    cfg = config_from_hf(hf)
    assert (cfg.block_size, cfg.rotary_dim, cfg.tie_embeddings) == (block, rotary, False)
    with torch.device("meta"):
        assert GPT(cfg).num_params() == params  # the parameter counts their model cards give
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg  # and back
