"""KV-cache decoding and sampling: against transformers' greedy generate, against a plain forward
pass, against itself (batch vs alone, seeds), and sample()'s top-k / top-p on hand-made logits."""
import pytest
import torch
import torch.nn as nn

import generate as generate_module
from generate import decode, generate, sample
from plumbing.device import PackedLinear, autocast, decode_rows, packed_linears
from model import KVCache, from_pretrained

FAMILIES = ["gpt2", "llama_gqa", "llama_tied"]
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [100, 3, 17, 8, 2]]   # different lengths
NEW = 12


@torch.no_grad()
def hf_greedy(hf, prompt, n, eos=None):
    """transformers' greedy continuation of one unpadded prompt: the independent reference."""
    x = torch.tensor([prompt])
    kwargs = {"eos_token_id": eos, "pad_token_id": eos} if eos is not None else {}
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


def load(hf_checkpoint, name):
    return from_pretrained(hf_checkpoint(name).path).eval()


def cut_after(row, eos):
    return row[:row.index(eos) + 1] if eos in row else row


# ----------------------------------------------------------------------------------------------
# 2. greedy generation equals transformers'


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_matches_transformers(hf_checkpoint, name):
    hf = hf_checkpoint(name).hf
    refs = [hf_greedy(hf, p, NEW) for p in PROMPTS]
    assert all(len(r) == NEW for r in refs)
    assert len({tuple(r) for r in refs}) == len(refs), "degenerate reference: every row the same"
    assert generate(load(hf_checkpoint, name), PROMPTS, NEW) == refs


def pick_eos(refs):
    """A token some row produces mid-generation (its first occurrence) that another row never produces."""
    for r, row in enumerate(refs):
        for k in range(2, len(row) - 2):
            tok = row[k]
            if tok not in row[:k] and any(tok not in other for other in refs):
                return tok
    raise AssertionError("no usable eos in the reference generations")


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_with_eos_matches_transformers(hf_checkpoint, name):
    hf = hf_checkpoint(name).hf
    eos = pick_eos([hf_greedy(hf, p, NEW) for p in PROMPTS])
    refs = [hf_greedy(hf, p, NEW, eos=eos) for p in PROMPTS]
    ours = generate(load(hf_checkpoint, name), PROMPTS, NEW, eos_id=eos)
    assert ours == refs
    assert any(len(row) < NEW for row in ours) and any(len(row) == NEW for row in ours)
    for row in ours:
        if eos in row:  # cut right after its first eos
            assert row[-1] == eos and eos not in row[:-1]
        else:
            assert len(row) == NEW


# ----------------------------------------------------------------------------------------------
# 3. cached decoding equals a full no-cache forward at every step


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_decode_matches_full_forward(hf_checkpoint, name):
    model = load(hf_checkpoint, name)
    step_logits = []

    def pick(t, logits):
        step_logits.append(logits.clone())
        return logits.argmax(-1), torch.zeros(len(logits), dtype=torch.bool)

    out = decode(model, PROMPTS, NEW, pick)
    assert out.shape == (len(PROMPTS), NEW) and len(step_logits) == NEW
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            for t in range(NEW):
                full = model(torch.tensor([prompt + out[i, :t].tolist()]))[0, -1]
                assert full.argmax().item() == out[i, t].item(), f"row {i} step {t}"
                torch.testing.assert_close(step_logits[t][i], full, atol=1e-4, rtol=0)


def test_decode_stops_when_every_row_is_done(hf_checkpoint):
    model = load(hf_checkpoint, "gpt2")
    calls = []

    def pick(t, logits):
        calls.append(t)
        done = torch.tensor([t >= 1, t >= 3, t >= 2, t >= 0])
        return logits.argmax(-1), done

    out = decode(model, PROMPTS, NEW, pick)
    assert out.shape == (len(PROMPTS), 4) and calls == [0, 1, 2, 3]


def test_decode_rejects_sequences_past_block_size(hf_checkpoint):
    model = load(hf_checkpoint, "gpt2")
    with pytest.raises(ValueError, match="block_size"):
        generate(model, PROMPTS, model.config.block_size)


# ----------------------------------------------------------------------------------------------
# 4. a mixed-length batch gives each prompt's tokens alone


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_equals_each_prompt_alone(hf_checkpoint, name):
    model = load(hf_checkpoint, name)
    batched = generate(model, PROMPTS, NEW)
    assert batched == [generate(model, [p], NEW)[0] for p in PROMPTS]


# ----------------------------------------------------------------------------------------------
# 5. sampling: seeds, top-k, top-p, temperature 0


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.8, top_k=20),
                                    dict(temperature=1.0, top_p=0.9)], ids=["plain", "top_k", "top_p"])
def test_seeded_sampling_repeats(hf_checkpoint, kwargs):
    model = load(hf_checkpoint, "llama_gqa")
    a = generate(model, PROMPTS, 30, seed=0, **kwargs)
    assert a == generate(model, PROMPTS, 30, seed=0, **kwargs)
    assert a != generate(model, PROMPTS, 30, seed=1, **kwargs)
    assert a != generate(model, PROMPTS, 30, **kwargs | {"temperature": 0.0}), "sampling looks greedy"


def draws(logits, n=2000, seed=0, **kwargs):
    """n samples from one row of logits, as a set of token ids."""
    g = torch.Generator().manual_seed(seed)
    return set(sample(logits.expand(n, -1).clone(), generator=g, **kwargs).tolist())


def test_temperature_zero_is_argmax():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, 0.0, top_k=5, top_p=0.5), logits.argmax(-1))


HAND = torch.tensor([0.1, 2.0, -1.0, 1.5, 0.0, 1.8, -3.0, 0.5, 1.0, -0.5, 0.2, 0.3])


@pytest.mark.parametrize("k,allowed", [(1, {1}), (3, {1, 5, 3}), (4, {1, 5, 3, 8})])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_emits_exactly_the_k_largest(k, allowed, temperature):
    assert draws(HAND, temperature=temperature, top_k=k) == allowed  # nothing outside, every one seen


def test_top_k_larger_than_vocab_is_plain_sampling():
    assert draws(HAND, n=20000, temperature=1.0, top_k=1000) == set(range(len(HAND)))


# probabilities in shuffled order: sorted they are .35 (1), .25 (3), .20 (4), .08 (2), .07 (5), .05 (0)
NUCLEUS_PROBS = torch.tensor([0.05, 0.35, 0.08, 0.25, 0.20, 0.07])


@pytest.mark.parametrize("top_p,nucleus", [(0.3, {1}), (0.55, {1, 3}), (0.7, {1, 3, 4}), (0.99, set(range(6)))])
def test_top_p_emits_exactly_the_nucleus(top_p, nucleus):
    assert draws(NUCLEUS_PROBS.log() + 3.0, temperature=1.0, top_p=top_p) == nucleus


def test_top_p_with_top_k_stays_in_both():
    # top-2 is {1, 3}; renormalised over those, .35/.60 = .58 >= 0.5 so the nucleus is {1}
    assert draws(NUCLEUS_PROBS.log(), temperature=1.0, top_k=2, top_p=0.5) == {1}
    assert draws(NUCLEUS_PROBS.log(), temperature=1.0, top_k=3, top_p=0.7) == {1, 3}


def test_top_p_prefix_exactly_reaching_top_p_is_the_nucleus():
    """Probabilities 1/2, 1/4, 1/4 are exact in fp32: with top_p=0.5 the first token alone reaches
    the mass, so the nucleus is {0} (as transformers' TopPLogitsWarper also says)."""
    from transformers import TopPLogitsWarper
    logits = torch.tensor([0.5, 0.25, 0.25]).log()
    hf_kept = TopPLogitsWarper(0.5)(None, logits[None].clone())[0].isfinite().nonzero().flatten().tolist()
    assert hf_kept == [0]
    assert draws(logits, temperature=1.0, top_p=0.5) == {0}


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (1.0, None, 0.8), (0.7, None, 0.8),
                                                     (1.0, 5, 0.6), (1.5, 10, 0.9)])
def test_sampling_stays_inside_transformers_filter(temperature, top_k, top_p):
    """Random rows: every draw lies where transformers' top-k / top-p warpers keep a finite logit."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(400, 40, generator=torch.Generator().manual_seed(0)) * 2
    kept = logits / temperature
    if top_k is not None:
        kept = TopKLogitsWarper(top_k)(None, kept)
    if top_p is not None:
        kept = TopPLogitsWarper(top_p)(None, kept)
    allowed = kept.isfinite()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        tok = sample(logits, temperature, top_k, top_p, generator=g)
        assert allowed.gather(1, tok[:, None]).all()


# ----------------------------------------------------------------------------------------------
# 11. the oneDNN-packed Linear layers are used while decoding on CPU and restored afterwards


def linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))}


def test_packed_linears_restored_after_generate(hf_checkpoint):
    model = load(hf_checkpoint, "gpt2")
    assert model.lm_head.weight is model.wte.weight
    before = linears(model)
    seen = []

    def pick(t, logits):
        seen.append(type(model.lm_head))
        return logits.argmax(-1), torch.zeros(len(logits), dtype=torch.bool)

    decode(model, PROMPTS, 3, pick)
    if torch.backends.mkldnn.is_available():
        assert seen and all(kind is PackedLinear for kind in seen)
    generate(model, PROMPTS, 3)
    after = linears(model)
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] and type(after[n]) is nn.Linear for n in before)
    assert all(type(model.h[i].attn.c_attn) is nn.Linear for i in range(len(model.h)))
    assert model.lm_head.weight is model.wte.weight


def test_packed_linears_restored_when_decoding_fails(hf_checkpoint):
    model = load(hf_checkpoint, "llama_gqa")
    before = linears(model)

    def pick(t, logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        decode(model, PROMPTS, 3, pick)
    after = linears(model)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_outer_packed_linears_wins(hf_checkpoint):
    """Inside one packed_linears (a build, an evaluation) generate packs nothing again: the layers
    it decodes with are the outer context's, and they are still in place after it returns."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN: nothing is packed")
    model = load(hf_checkpoint, "llama_gqa")
    seen = []

    def pick(t, logits):
        seen.append(model.lm_head)
        return logits.argmax(-1), torch.zeros(len(logits), dtype=torch.bool)

    with packed_linears(model, 4):
        outer = model.lm_head
        assert isinstance(outer, PackedLinear)
        decode(model, PROMPTS, 3, pick)
        assert seen and all(m is outer for m in seen) and model.lm_head is outer
        alone = generate(model, PROMPTS, NEW)
    assert type(model.lm_head) is nn.Linear
    assert alone == generate(model, PROMPTS, NEW)


# ----------------------------------------------------------------------------------------------
# 12. decoding sized by memory: the cache in the compute dtype, a batch that fits the budget


def test_kv_cache_in_the_compute_dtype(hf_checkpoint, monkeypatch):
    model = load(hf_checkpoint, "llama_gqa")
    made = []

    class Spy(KVCache):
        def __init__(self, *a):
            super().__init__(*a)
            made.append(self.k.dtype)

    monkeypatch.setattr(generate_module, "KVCache", Spy)
    generate(model, PROMPTS, NEW)
    with autocast(model.device, "bf16"):
        bf16 = generate(model, PROMPTS, NEW)
    assert made == [torch.float32, torch.bfloat16]
    assert all(len(r) == NEW for r in bf16)


def test_decode_rows_fit_the_budget(hf_checkpoint):
    cfg = load(hf_checkpoint, "llama_gqa").config
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(cfg, 1, 50, "cpu", dtype)
        per_row = cache.k.nbytes + cache.v.nbytes + 3 * 4 * cfg.vocab_size  # prompt_len 0
        assert decode_rows(cfg, 0, 50, dtype.itemsize, budget=10 * per_row) == 10
        assert decode_rows(cfg, 0, 50, dtype.itemsize, budget=10 * per_row - 1) == 9
    assert decode_rows(cfg, 10, 50, 4, budget=1) == 1  # at least one row, whatever the budget
    assert decode_rows(cfg, 10, 50, 4) < decode_rows(cfg, 0, 50, 4)
