"""The network against transformers (the oracle), checkpoint loading/saving, and the masked loss."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import IGNORE, GPT, GPTConfig, config_from_hf, from_pretrained, save_pretrained
from reference import masked_nll

FAMILIES = ["gpt2", "llama_gqa", "llama_tied"]


def tokens(vocab, shape=(3, 17), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def assert_logits_equal(ours, ref):
    assert ref.std() > 1e-2, "reference logits are near-constant: equality would prove nothing"
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def check_against_hf(ckpt_dir, hf, vocab):
    ours = from_pretrained(ckpt_dir).eval()
    x = tokens(vocab)
    assert_logits_equal(ours(x), hf(x).logits)
    return ours


def rewrite_weights(src, dst, edit):
    """Copy checkpoint src to dst with model.safetensors passed through edit(dict) -> dict."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(edit(load_file(src / "model.safetensors")), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def rewrite_config(src, dst, edit):
    dst.mkdir()
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit(cfg)))
    return dst


# ----------------------------------------------------------------------------------------------
# 1. logits equal transformers'


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(hf_checkpoint, name):
    ckpt = hf_checkpoint(name)
    check_against_hf(ckpt.path, ckpt.hf, ckpt.vocab)


def test_llama_gqa_checkpoint_is_grouped_and_untied(hf_checkpoint):
    ours = from_pretrained(hf_checkpoint("llama_gqa").path)
    assert ours.config.n_kv_head == 2 and ours.config.n_head == 4
    assert not ours.config.tie_embeddings
    assert ours.lm_head.weight is not ours.wte.weight
    assert not torch.equal(ours.lm_head.weight, ours.wte.weight)


def test_llama_tied_checkpoint_is_tied_with_its_rope_theta(hf_checkpoint):
    ours = from_pretrained(hf_checkpoint("llama_tied").path)
    assert ours.config.rope_theta == 1000.0
    assert ours.config.head_dim == 16
    assert ours.lm_head.weight is ours.wte.weight


def test_sharded_checkpoint_loads(hf_checkpoint):
    ckpt = hf_checkpoint("llama_gqa", max_shard_size="20KB")
    assert (ckpt.path / "model.safetensors.index.json").exists()
    assert not (ckpt.path / "model.safetensors").exists()
    assert len(list(ckpt.path.glob("model-*.safetensors"))) > 1
    check_against_hf(ckpt.path, ckpt.hf, ckpt.vocab)


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_last_n_is_the_last_positions(hf_checkpoint, name):
    """The head on the last n hidden states (how decoding and RAC's labels make only the logits
    they need) gives the full forward's last n positions."""
    ours = from_pretrained(hf_checkpoint(name).path).eval()
    x = tokens(ours.config.vocab_size)
    torch.testing.assert_close(ours.lm_head(ours.hidden(x)[:, -1:]), ours(x)[:, -1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.lm_head(ours.hidden(x)[:, -3:]), ours(x)[:, -3:], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# 6. our save_pretrained loads in transformers


SAVE_CONFIGS = {
    "gpt2": dict(arch="gpt2", vocab_size=200, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "llama_untied_gqa": dict(arch="llama", vocab_size=200, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             n_embd=64, n_inner=96, bias=False, tie_embeddings=False, rope_theta=1000.0),
    "llama_tied": dict(arch="llama", vocab_size=200, block_size=64, n_layer=2, n_head=4, n_embd=48, head_dim=16,
                       n_inner=80, bias=False, tie_embeddings=True),
}


def random_gpt(**cfg):
    torch.manual_seed(7)
    model = GPT(GPTConfig(**cfg))
    with torch.no_grad():  # our own init (std 0.02) gives near-uniform logits: widen it
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
            else:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name", list(SAVE_CONFIGS))
@torch.no_grad()
def test_save_pretrained_loads_in_transformers(tmp_path, name):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM
    ours = random_gpt(**SAVE_CONFIGS[name])
    save_pretrained(ours, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert list(tmp_path.glob("*.tmp")) == []

    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert isinstance(hf, GPT2LMHeadModel if ours.config.arch == "gpt2" else LlamaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = tokens(ours.config.vocab_size)
    assert_logits_equal(ours(x), hf(x).logits)
    assert_logits_equal(from_pretrained(tmp_path).eval()(x), hf(x).logits)  # and back again


def test_save_pretrained_writes_extra_config(tmp_path):
    save_pretrained(random_gpt(**SAVE_CONFIGS["gpt2"]), tmp_path, extra_config={"tokenizer": "gpt2"})
    assert json.loads((tmp_path / "config.json").read_text())["tokenizer"] == "gpt2"


# ----------------------------------------------------------------------------------------------
# 7. a missing, extra or misshapen weight fails loudly, naming the weight and the file


WEIGHTS = [("gpt2", "transformer.h.1.mlp.c_fc.weight", "transformer.h.2.mlp.c_fc.weight"),
           ("llama_gqa", "model.layers.1.self_attn.k_proj.weight", "model.layers.2.self_attn.k_proj.weight")]


@pytest.mark.parametrize("name,weight,extra", WEIGHTS, ids=["gpt2", "llama"])
def test_missing_weight_is_named(hf_checkpoint, tmp_path, name, weight, extra):
    def drop(sd):
        assert weight in sd
        del sd[weight]
        return sd
    bad = rewrite_weights(hf_checkpoint(name).path, tmp_path / "bad", drop)
    with pytest.raises(ValueError) as err:
        from_pretrained(bad)
    assert weight in str(err.value) and "model.safetensors" in str(err.value)


@pytest.mark.parametrize("name,weight,extra", WEIGHTS, ids=["gpt2", "llama"])
def test_unexpected_weight_is_named(hf_checkpoint, tmp_path, name, weight, extra):
    def add(sd):
        sd[extra] = torch.zeros(4, 4)
        return sd
    bad = rewrite_weights(hf_checkpoint(name).path, tmp_path / "bad", add)
    with pytest.raises(ValueError) as err:
        from_pretrained(bad)
    assert extra in str(err.value) and "model.safetensors" in str(err.value)


@pytest.mark.parametrize("name,weight,extra", WEIGHTS, ids=["gpt2", "llama"])
def test_misshapen_weight_is_named(hf_checkpoint, tmp_path, name, weight, extra):
    def reshape(sd):
        sd[weight] = torch.zeros(sd[weight].shape[0], sd[weight].shape[1] + 1)
        return sd
    bad = rewrite_weights(hf_checkpoint(name).path, tmp_path / "bad", reshape)
    with pytest.raises(ValueError) as err:
        from_pretrained(bad)
    assert weight in str(err.value) and "model.safetensors" in str(err.value)


# ----------------------------------------------------------------------------------------------
# 8. unusable config.json


def _set(key, value):
    def edit(cfg):
        cfg[key] = value
        return cfg
    return edit


def _drop(key):
    def edit(cfg):
        assert key in cfg
        del cfg[key]
        return cfg
    return edit


@pytest.mark.parametrize("name,edit,words", [
    ("gpt2", _set("model_type", "bert"), ["model_type", "bert"]),
    ("llama_gqa", _set("model_type", "qwen3_moe"), ["model_type", "qwen3_moe"]),
    ("gpt2", _drop("n_embd"), ["n_embd"]),
    ("gpt2", _drop("n_layer"), ["n_layer"]),
    ("llama_gqa", _drop("num_hidden_layers"), ["num_hidden_layers"]),
    ("llama_gqa", _drop("intermediate_size"), ["intermediate_size"]),
], ids=["gpt2-model_type", "llama-model_type", "gpt2-n_embd", "gpt2-n_layer", "llama-num_hidden_layers",
        "llama-intermediate_size"])
def test_bad_config_is_named(hf_checkpoint, tmp_path, name, edit, words):
    bad = rewrite_config(hf_checkpoint(name).path, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as err:
        from_pretrained(bad)
    for word in words + ["config.json"]:
        assert word in str(err.value)


def test_config_from_hf_missing_model_type():
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({"vocab_size": 10}, "somewhere/config.json")


# ----------------------------------------------------------------------------------------------
# 9. masked_nll


def _loss_inputs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g) * 2
    targets = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 0]])
    return logits, targets, mask


def test_masked_nll_equals_hand_computation():
    logits, targets, mask = _loss_inputs()
    picked = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    expected = -(picked * mask).sum() / mask.sum()
    torch.testing.assert_close(masked_nll(logits, targets, mask), expected, atol=1e-6, rtol=0)


def test_masked_nll_all_zero_mask_is_zero_not_nan():
    logits, targets, mask = _loss_inputs()
    logits.requires_grad_(True)
    loss = masked_nll(logits, targets, torch.zeros_like(mask))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_masked_nll_denom_divides_by_given_count():
    logits, targets, mask = _loss_inputs()
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none") @ mask.flatten().float()
    torch.testing.assert_close(masked_nll(logits, targets, mask, denom=10), total / 10, atol=1e-6, rtol=0)
    assert not torch.isclose(masked_nll(logits, targets, mask, denom=10), masked_nll(logits, targets, mask))


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("arch,tied", [("gpt2", True), ("llama", False)])
def test_chunked_loss_equals_masked_nll_on_full_logits(arch, tied, monkeypatch):
    """The loss through chunked_nll (the scored positions only, logits in chunks of 4 positions,
    recomputed in backward) equals masked_nll on the full logits: value and every gradient."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch=arch, vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16,
                          tie_embeddings=tied))
    x, y = tokens(97, (3, 11), seed=1), tokens(97, (3, 11), seed=2)
    mask = (torch.rand(3, 11, generator=torch.Generator().manual_seed(3)) < 0.6).float()
    mask[0, 4] = 0.5  # a weight other than 0/1 is carried too
    full = masked_nll(model(x), y, mask, denom=7.0)
    ref = grads_of(model, full)

    rows = []
    model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    nll = model(x, targets=y.masked_fill(mask == 0, IGNORE))
    n = int((mask != 0).sum())
    assert nll.shape == (n,) and nll.dtype == torch.float32
    loss = (nll * mask[mask != 0]).sum() / 7.0
    torch.testing.assert_close(loss, full, rtol=0, atol=1e-6)
    chunk = 4
    rows.clear()
    monkeypatch.setattr("model.LOGIT_BYTES", 4 * 97 * chunk)
    nll = model(x, targets=y.masked_fill(mask == 0, IGNORE))
    loss = (nll * mask[mask != 0]).sum() / 7.0
    ours = grads_of(model, loss)
    torch.testing.assert_close(loss, full, rtol=0, atol=1e-6)
    # the head never saw more than a chunk of positions, in forward or in backward's recompute
    assert max(rows) == chunk and len(rows) == 2 * -(-n // chunk)
    for k in ref:
        assert ref[k].abs().max() > 0, k
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_activation_checkpointing_gives_the_same_gradients():
    """model.checkpointing (--activation-checkpointing) recomputes every block in backward; with
    dropout on, the saved RNG state replays the same masks, so the gradients are the same."""
    model = GPT(GPTConfig(arch="llama", vocab_size=31, block_size=16, n_layer=3, n_head=2,
                          n_embd=16, dropout=0.2)).train()
    x, y = tokens(31, (2, 9), seed=4), tokens(31, (2, 9), seed=5)
    calls = []
    for block in model.h:
        block.register_forward_pre_hook(lambda m, i: calls.append(1))
    grads = {}
    for on in (False, True):
        model.checkpointing = on
        calls.clear()
        torch.manual_seed(7)
        grads[on] = grads_of(model, model(x, targets=y).sum())
        assert len(calls) == (2 if on else 1) * 3  # each block ran again in backward
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=0, atol=1e-6)
    torch.manual_seed(8)  # the check is sharp: other dropout masks give other gradients
    other = grads_of(model, model(x, targets=y).sum())
    assert not torch.allclose(other["h.0.attn.c_attn.weight"], grads[False]["h.0.attn.c_attn.weight"])


def test_chunked_loss_with_nothing_scored_is_empty():
    model = GPT(GPTConfig(arch="llama", vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8))
    x = tokens(13, (2, 5))
    nll = model(x, targets=torch.full_like(x, IGNORE))
    assert nll.shape == (0,) and nll.sum().item() == 0.0


# ----------------------------------------------------------------------------------------------
# 10. GPT-2 exports without the "transformer." prefix


def test_gpt2_without_transformer_prefix_loads(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("gpt2")

    def strip(sd):
        assert all(k.startswith("transformer.") for k in sd)
        return {k.removeprefix("transformer."): v for k, v in sd.items()}
    bare = rewrite_weights(ckpt.path, tmp_path / "bare", strip)
    check_against_hf(bare, ckpt.hf, ckpt.vocab)
