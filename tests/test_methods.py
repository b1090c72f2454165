"""The paper's methods, token by token, against the equations recomputed independently.

Every expected value here is computed from scratch: no-cache forwards of the model over one row at
a time (no padding, no KV cache, no collate) and log_softmax by hand. The code under test is the
KV-cache decode loops in generate.py and the batched, padded loss in train.py / model.py.

    Eq. 4   BASH / SCS mixing      ŷ^j = z^j (z^j ~ p(·|x, ŷ^<j)) with probability β, else y^j
    Eq. 5   BASH loss               -log p(y^j | x, ŷ^<j)
    Eq. 6   RAC labels              z ~ p(·|x),  z̄^j = argmax p(·|f(x,y), z^<j)
    Eq. 7   RAC loss                -1(z̄^j != z^j) log p(z̄^j | x, z^<j)
    NEFTune                         uniform(-1, 1) · α / sqrt(T·d) on the embeddings, training only
"""
import copy
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
import torch.nn.functional as F

import data
import train
from data import Row
from generate import bash_mix, generate, rac_labels
from model import GPT, GPTConfig
from reference import masked_nll

CPU = torch.device("cpu")
VOCAB = 50
ARCHS = ["llama", "gpt2"]


# ----------------------------------------------------------------------------------------------
# A tiny seeded model whose distributions are peaked (no greedy ties), and the reference math


def tiny_model(arch="llama", seed=0, dropout=0.0, vocab=VOCAB, block=64):
    torch.manual_seed(seed)
    llama = arch == "llama"
    cfg = GPTConfig(arch=arch, vocab_size=vocab, block_size=block, n_layer=2, n_head=4,
                    n_kv_head=2 if llama else None, n_embd=32, bias=not llama,
                    tie_embeddings=not llama, dropout=dropout)
    model = GPT(cfg)
    with torch.no_grad():  # far from the 0.02 init: logits spread over several nats, argmax well separated
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def rand_ids(n, gen, vocab=VOCAB):
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def batch(seed, prompt_lens, response_lens):
    g = torch.Generator().manual_seed(seed)
    return [rand_ids(n, g) for n in prompt_lens], [rand_ids(n, g) for n in response_lens]


@torch.no_grad()
def logits1(model, ids):
    """(len(ids), vocab) logits of one unpadded row, no cache."""
    return model(torch.tensor([ids]))[0].float()


def next_argmax(model, ids):
    return int(logits1(model, ids)[-1].argmax())


def greedy_nocache(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_argmax(model, seq))
    return seq[len(prompt):]


def row_nll(model, prompt, inputs, targets, mask=None):
    """sum_j mask_j · -log p(targets^j | prompt ++ inputs^<j), and the count of scored positions."""
    logp = F.log_softmax(logits1(model, prompt + inputs[:-1]), dim=-1)
    mask = [1] * len(targets) if mask is None else mask
    total = 0.0
    for j, (t, m) in enumerate(zip(targets, mask)):
        if m:
            total += -float(logp[len(prompt) - 1 + j, t])
    return total, sum(mask)


def make_rows(prompts, responses, refs=None):
    refs = refs or prompts
    return [Row(p, y, f, None, "") for p, y, f in zip(prompts, responses, refs)]


PROMPT_LENS, RESPONSE_LENS = [3, 7, 1, 5], [6, 2, 9, 4]


# ----------------------------------------------------------------------------------------------
# 1. BASH mixing (Eq. 4), deterministic cases


def test_bash_beta0_is_reference(model):
    prompts, ys = batch(1, PROMPT_LENS, RESPONSE_LENS)
    mixed, took = bash_mix(model, prompts, ys, beta=0.0, temperature=1.0, seed=5)
    assert mixed == ys
    assert [len(t) for t in took] == RESPONSE_LENS
    assert not any(any(t) for t in took)


def test_bash_beta1_greedy_is_models_own_generation(model):
    prompts, ys = batch(2, PROMPT_LENS, RESPONSE_LENS)
    mixed, took = bash_mix(model, prompts, ys, beta=1.0, temperature=0.0, seed=5)
    assert [len(m) for m in mixed] == RESPONSE_LENS
    assert all(all(t) for t in took) and [len(t) for t in took] == RESPONSE_LENS
    for p, y, m in zip(prompts, ys, mixed):
        assert m == generate(model, [p], len(y), temperature=0.0)[0]
        assert m == greedy_nocache(model, p, len(y))  # the reference ignores y entirely at β = 1
    assert mixed != ys


def test_bash_half_greedy_conditions_on_mixed_prefix(model):
    prompts, ys = batch(3, [4, 1, 8, 2, 6], [10, 3, 7, 12, 5])
    mixed, took = bash_mix(model, prompts, ys, beta=0.5, temperature=0.0, seed=11)
    assert [len(m) for m in mixed] == [len(y) for y in ys]
    assert [len(t) for t in took] == [len(y) for y in ys]
    n_model = n_ref = n_model_differs = 0
    for x, y, yh, tk in zip(prompts, ys, mixed, took):
        for j in range(len(y)):
            if tk[j]:
                z = next_argmax(model, x + yh[:j])  # z^j ~ p(·|x, ŷ^<j), greedy, no cache
                assert yh[j] == z, (x, y, yh, j)
                n_model += 1
                n_model_differs += yh[j] != y[j]
            else:
                assert yh[j] == y[j]
                n_ref += 1
    assert n_model > 5 and n_ref > 5 and n_model_differs > 3  # both branches of Eq. 4 were exercised
    # conditioning on ŷ^<j (not on y^<j) matters here: some model token differs from the argmax after y^<j
    assert any(tk[j] and yh[j] != next_argmax(model, x + y[:j])
               for x, y, yh, tk in zip(prompts, ys, mixed, took) for j in range(len(y)))


def test_bash_every_token_is_y_or_a_model_sample(model):
    prompts, ys = batch(4, PROMPT_LENS, RESPONSE_LENS)
    mixed, took = bash_mix(model, prompts, ys, beta=0.5, temperature=1.0, seed=7)
    for x, y, yh, tk in zip(prompts, ys, mixed, took):
        assert len(yh) == len(y) == len(tk)
        for j in range(len(y)):
            if not tk[j]:
                assert yh[j] == y[j]
            else:  # a sample from p(·|x, ŷ^<j): a token with non-negligible probability there
                assert 0 <= yh[j] < VOCAB
                assert float(F.softmax(logits1(model, x + yh[:j])[-1], -1)[yh[j]]) > 1e-6


# ----------------------------------------------------------------------------------------------
# 2. BASH mixing, statistics and seeds


def test_bash_share_of_model_tokens_is_beta_and_seeded(llama):
    B, L, beta = 64, 40, 0.2
    prompts, ys = batch(5, [1 + i % 8 for i in range(B)], [L] * B)
    mixed, took = bash_mix(llama, prompts, ys, beta=beta, temperature=1.0, seed=123)
    n = B * L
    share = sum(map(sum, took)) / n
    assert abs(share - beta) <= 4 * math.sqrt(beta * (1 - beta) / n), share
    assert all(yh[j] == y[j] for y, yh, tk in zip(ys, mixed, took) for j in range(L) if not tk[j])
    again = bash_mix(llama, prompts, ys, beta=beta, temperature=1.0, seed=123)
    assert again == (mixed, took)
    other = bash_mix(llama, prompts, ys, beta=beta, temperature=1.0, seed=124)
    assert other[0] != mixed and other[1] != took


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bash_samples_follow_model_distribution(llama, temperature):
    """β = 1, one token per row, one shared prompt: the tokens are draws from softmax(logits / T)."""
    N, x = 4000, [7, 3, 11]
    mixed, _ = bash_mix(llama, [x] * N, [[0]] * N, beta=1.0, temperature=temperature, seed=9)
    counts = torch.bincount(torch.tensor([m[0] for m in mixed]), minlength=VOCAB).double() / N
    p = F.softmax(logits1(llama, x)[-1].double() / temperature, -1)
    sigma = (p * (1 - p) / N).sqrt()
    assert ((counts - p).abs() <= 5 * sigma + 1e-3).all(), (counts - p).abs().max()
    assert p.max() < 0.9  # the check is not trivial: several tokens carry mass


# ----------------------------------------------------------------------------------------------
# 3. RAC labels (Eq. 6)


@pytest.mark.parametrize("budget", [None, 1])
def test_rac_labels_are_argmax_under_reference_prompt(model, budget, monkeypatch):
    """budget 1: plumbing.device.BUILD_BYTES so small that the labelling pass runs one row at a time."""
    if budget:
        monkeypatch.setattr("plumbing.device.BUILD_BYTES", budget)
    prompts, refs = batch(6, [3, 6, 2], [9, 4, 12])
    z, zbar, mask = rac_labels(model, prompts, refs, max_new_tokens=10, temperature=1.0, seed=3, eos_id=None)
    assert [len(zi) for zi in z] == [10, 10, 10]  # no eos: every z runs to the cap
    differs_from_plain_prompt = False
    for x, f, zi, zb, m in zip(prompts, refs, z, zbar, mask):
        assert len(zb) == len(zi) == len(m)
        lg = logits1(model, f + zi)
        expect = [int(lg[len(f) - 1 + j].argmax()) for j in range(len(zi))]
        assert zb == expect
        assert m == [int(a != b) for a, b in zip(expect, zi)]
        lx = logits1(model, x + zi)
        differs_from_plain_prompt |= expect != [int(lx[len(x) - 1 + j].argmax()) for j in range(len(zi))]
    assert differs_from_plain_prompt  # f(x, y) really is what the labels read
    assert any(map(any, mask))


def test_rac_greedy_z_is_greedy_generation(model):
    prompts, refs = batch(7, [3, 6], [9, 4])
    z, _, _ = rac_labels(model, prompts, refs, max_new_tokens=8, temperature=0.0, seed=None)
    assert z == [greedy_nocache(model, x, 8) for x in prompts]


def test_rac_z_stops_at_eos(model):
    prompts, refs = batch(8, [3, 6, 2, 5], [9, 4, 12, 7])
    cap, seed = 14, 21
    full, _, _ = rac_labels(model, prompts, refs, max_new_tokens=cap, temperature=1.0, seed=seed)
    # eos: a token the seeded model emits in row 0 at a position > 0 and not before
    k, eos = next((j, t) for j, t in enumerate(full[0]) if j > 0 and t not in full[0][:j])
    z, zbar, mask = rac_labels(model, prompts, refs, max_new_tokens=cap, temperature=1.0, seed=seed, eos_id=eos)
    assert z[0] == full[0][:k + 1] and z[0][-1] == eos
    for zi, fi, f, zb, m in zip(z, full, refs, zbar, mask):
        assert eos not in zi[:-1]
        if eos in fi:
            assert zi == fi[:fi.index(eos) + 1]
        else:
            assert zi == fi and len(zi) == cap
        lg = logits1(model, f + zi)
        assert zb == [int(lg[len(f) - 1 + j].argmax()) for j in range(len(zi))]
        assert m == [int(a != b) for a, b in zip(zb, zi)]


# ----------------------------------------------------------------------------------------------
# 4. RAC loss (Eq. 7)


def test_rac_loss_is_masked_nll_of_labels(model):
    prompts, refs = batch(9, [3, 6, 2], [9, 4, 12])
    z, zbar, mask = rac_labels(model, prompts, refs, max_new_tokens=8, temperature=1.0, seed=4)
    assert any(map(any, mask))
    # a fourth row where the labels agree with z everywhere: Eq. 7 gives it nothing
    g = torch.Generator().manual_seed(99)
    x4, z4 = rand_ids(4, g), rand_ids(5, g)
    rows = make_rows(prompts + [x4], [rand_ids(6, g) for _ in range(4)], refs + [x4])
    offline = [train.TrainRow(r.prompt, a, b, m) for r, a, b, m in zip(rows, z, zbar, mask)]
    offline.append(train.TrainRow(x4, z4, list(z4), [0] * 5))
    idx = [0, 1, 2, 3]
    sft, aux = train.loss_rows(rows, idx, offline)
    denom = train.sft_tokens(rows, idx)
    terms, _ = train.step_loss(model, sft, aux, denom, 0.0, CPU)

    num_rac, cnt_rac = 0.0, 0
    num_sft, cnt_sft = 0.0, 0
    for r, (_, zi, zb, m, _) in zip(rows, offline):
        s, c = row_nll(model, r.prompt, zi, zb, m)
        num_rac, cnt_rac = num_rac + s, cnt_rac + c
        s, c = row_nll(model, r.prompt, r.response, r.response)
        num_sft, cnt_sft = num_sft + s, cnt_sft + c
    assert denom == cnt_sft and 0 < cnt_rac < cnt_sft
    # Eq. 7 with Algorithm 2's weights: a RAC token weighs as much as an SFT token
    assert terms[1].item() == pytest.approx(num_rac / cnt_sft, rel=1e-5, abs=1e-6)
    assert terms[0].item() == pytest.approx(num_sft / cnt_sft, rel=1e-5, abs=1e-6)

    # the agreeing row adds exactly 0: same loss with it forced into the batch (same denominator)
    forced = aux + [train.TrainRow(x4, z4, list(z4), [0] * 5)]
    terms2, _ = train.step_loss(model, sft, forced, denom, 0.0, CPU)
    assert torch.allclose(terms2, terms, rtol=0, atol=1e-6)


def test_rac_loss_zero_not_nan_when_nothing_differs(model):
    logits = torch.randn(2, 5, VOCAB, requires_grad=True)
    out = masked_nll(logits, torch.randint(0, VOCAB, (2, 5)), torch.zeros(2, 5))
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert torch.isfinite(logits.grad).all()

    g = torch.Generator().manual_seed(5)
    rows = make_rows([rand_ids(3, g), rand_ids(2, g)], [rand_ids(4, g), rand_ids(3, g)])
    offline = [train.TrainRow(r.prompt, z, list(z), [0] * len(z))
               for r, z in zip(rows, (rand_ids(5, g), rand_ids(2, g)))]
    sft, aux = train.loss_rows(rows, [0, 1], offline)
    assert aux == []
    terms, _ = train.step_loss(model, sft, aux, train.sft_tokens(rows, [0, 1]), 0.0, CPU)
    assert terms[1].item() == 0.0 and torch.isfinite(terms).all()


# ----------------------------------------------------------------------------------------------
# 5. J = J_SFT + J_BASH (Eq. 1 + Eq. 5)


def test_bash_step_loss_is_sft_plus_bash(model):
    prompts, ys = batch(10, [3, 7, 1, 5, 4], [6, 2, 9, 4, 8])
    rows = make_rows(prompts, ys)
    mixed, took = bash_mix(model, prompts, ys, beta=0.5, temperature=1.0, seed=17)
    offline = [train.TrainRow(x, m, y, [1] * len(y), t) for x, m, y, t in zip(prompts, mixed, ys, took)]
    assert mixed != ys
    idx = [3, 0, 4, 1]  # a global batch that is not the whole set, out of order
    sft, aux = train.loss_rows(rows, idx, offline)
    denom = train.sft_tokens(rows, idx)
    terms, _ = train.step_loss(model, sft, aux, denom, 0.0, CPU)

    n = sum(len(ys[i]) for i in idx)
    j_sft = sum(row_nll(model, prompts[i], ys[i], ys[i])[0] for i in idx) / n
    j_bash = sum(row_nll(model, prompts[i], mixed[i], ys[i])[0] for i in idx) / n  # input x ++ ŷ[:-1], target y
    assert denom == n
    assert terms[0].item() == pytest.approx(j_sft, rel=1e-5)
    assert terms[1].item() == pytest.approx(j_bash, rel=1e-5)
    assert terms.sum().item() == pytest.approx(j_sft + j_bash, rel=1e-5)
    assert abs(j_bash - j_sft) > 1e-3  # the mixed prefix changes the loss

    # micro-batches weigh tokens over the global batch: the parts add up to the whole
    halves = [train.step_loss(model, sft[a:b], aux[a:b], denom, 0.0, CPU)[0] for a, b in ((0, 1), (1, 4))]
    assert torch.allclose(halves[0] + halves[1], terms, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["bash", "rac"])
def test_combined_loss_weighs_every_token_alike(model, method):
    """Algorithm 2 lines 15-16 / Eq. 7: J = (sum of SFT token losses + sum of the method's token
    losses) / (SFT tokens of the batch). A batch where RAC corrects one token in a hundred: the
    old per-term mean (each term over its own tokens) gives that token ~100x the weight."""
    g = torch.Generator().manual_seed(21)
    prompts = [rand_ids(n, g) for n in (3, 6, 2, 5)]
    ys = [rand_ids(n, g) for n in (30, 25, 28, 20)]
    rows = make_rows(prompts, ys)
    if method == "bash":
        mixed, took = bash_mix(model, prompts, ys, beta=0.3, temperature=1.0, seed=8)
        offline = [train.TrainRow(x, m, y, [1] * len(y), t) for x, m, y, t in zip(prompts, mixed, ys, took)]
    else:  # z = y with one position relabelled: one corrected token in the whole batch
        zbar = [list(y) for y in ys]
        zbar[1][7] = (zbar[1][7] + 1) % VOCAB
        offline = [train.TrainRow(x, y, zb, [int(a != b) for a, b in zip(y, zb)])
                   for x, y, zb in zip(prompts, ys, zbar)]
    idx = [0, 1, 2, 3]
    sft, aux = train.loss_rows(rows, idx, offline)
    terms, _ = train.step_loss(model, sft, aux, train.sft_tokens(rows, idx), 0.0, CPU)

    sum_sft = sum(row_nll(model, x, y, y)[0] for x, y in zip(prompts, ys))
    aux_parts = [row_nll(model, x, o.inputs, o.targets, o.mask) for x, o in zip(prompts, offline)]
    sum_aux, n_aux = sum(p[0] for p in aux_parts), sum(p[1] for p in aux_parts)
    n_sft = sum(map(len, ys))
    by_hand = (sum_sft + sum_aux) / n_sft
    assert terms.sum().item() == pytest.approx(by_hand, rel=1e-5)
    assert terms[1].item() == pytest.approx(sum_aux / n_sft, rel=1e-5)
    per_term_mean = sum_sft / n_sft + sum_aux / n_aux  # the old, wrong weighting
    if method == "rac":
        assert n_aux == 1
        assert abs(per_term_mean - by_hand) > 0.2 * by_hand  # far outside rel=1e-5
    else:
        assert n_aux == n_sft  # BASH scores every position: both forms agree


# ----------------------------------------------------------------------------------------------
# 6. NEFTune


def block_input(model, idx, noise_alpha):
    seen = []
    h = model.h[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            out = model(idx, noise_alpha=noise_alpha)
    finally:
        h.remove()
    return seen[0], out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("T", [48, 6])
def test_neftune_noise_is_uniform_alpha_over_sqrt_Td(arch, T):
    model = tiny_model(arch).train()  # dropout 0: the only randomness is the noise
    alpha, d = 5.0, model.config.n_embd
    B = 12288 // (T * d) * 4
    idx = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    clean, _ = block_input(model, idx, 0.0)
    noisy, _ = block_input(model, idx, alpha)
    diff = (noisy - clean).flatten().double()
    bound = alpha / math.sqrt(T * d)
    N = diff.numel()
    assert N >= 4096
    assert diff.abs().max() <= bound * (1 + 1e-4)
    assert diff.abs().max() > 0.9 * bound
    sd = bound / math.sqrt(3)
    assert abs(diff.mean()) < 4 * sd / math.sqrt(N)
    assert diff.std() == pytest.approx(sd, rel=0.05)
    inner = (diff.abs() < bound / 2).double().mean()  # uniform: half the mass within half the bound
    assert abs(inner - 0.5) < 4 * math.sqrt(0.25 / N)
    noisy2, _ = block_input(model, idx, alpha)
    assert not torch.equal(noisy2, noisy)  # fresh noise at every forward


@pytest.mark.parametrize("arch", ARCHS)
def test_neftune_off_in_eval(arch):
    model = tiny_model(arch).eval()
    idx = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(idx, noise_alpha=5.0), model(idx))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(idx, noise_alpha=5.0), model(idx))


# ----------------------------------------------------------------------------------------------
# 7. SCS (Eq. 3-4): BASH's mixing redone with the current weights at each step


def test_scs_loss_equals_bash_loss_with_same_weights_and_seed(model):
    prompts, ys = batch(12, [3, 7, 1, 5], [6, 2, 9, 4])
    rows = make_rows(prompts, ys)
    idx = [0, 1, 2, 3]
    beta, temp, base = 0.5, 1.0, 31

    # SCS, as train.run's step does it: mix the step's rows with the current weights, method "scs"
    # (in the order build_offline batches them: by prompt length)
    order = sorted(idx, key=lambda i: len(rows[i].prompt))
    online = dict(zip(order, train.bash_rows(model, [rows[i] for i in order], beta, temp,
                                             seed=train.seed_for(base, "batch", 0))))
    mixed = [online[i].inputs for i in idx]
    sft, aux = train.loss_rows(rows, idx, online)
    scs_terms, _ = train.step_loss(model, sft, aux, train.sft_tokens(rows, idx), 0.0, CPU)

    # BASH, offline: build_offline with the same weights; its first batch is seeded by (base, 0)
    build = lambda m, rs, s: train.bash_rows(m, rs, beta, temp, s)  # noqa: E731
    offline = train.build_offline(model, rows, build, len(rows), base, 0, 1)
    model.eval()  # build_offline leaves the model in training mode
    assert [o.inputs for o in offline] == mixed
    sft_b, aux_b = train.loss_rows(rows, idx, offline)
    bash_terms, _ = train.step_loss(model, sft_b, aux_b, train.sft_tokens(rows, idx), 0.0, CPU)
    assert torch.allclose(scs_terms, bash_terms, rtol=0, atol=0)

    n = sum(map(len, ys))
    assert scs_terms[1].item() == pytest.approx(
        sum(row_nll(model, x, m, y)[0] for x, m, y in zip(prompts, mixed, ys)) / n, rel=1e-5)
    assert mixed != ys
    assert abs(scs_terms[1].item() - scs_terms[0].item()) > 1e-3  # β > 0: not the SFT loss


def scs_run(tmp_path, monkeypatch, extra):
    """Run train.run with --method scs for two steps on the built-in task; record every bash_mix call."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n"
                            for e in data.builtin_task(8, seed=1)))
    argv = ["--data", str(path), "--task", "arith", "--overflow", "fail",
            "--init", "scratch", "--method", "scs", "--arch", "llama", "--n-layer", "1", "--n-head", "2",
            "--n-embd", "16", "--block-size", "96", "--batch-size", "4", "--micro-batch-size", "2",
            "--iterations", "1", "--iter-epochs", "1", "--stop-after", "2", "--lr", "1e-2",
            "--out", str(tmp_path / "scs"), "--device", "cpu", "--seed", "3"] + extra
    args = train.get_args(argv)
    calls, real = [], train.bash_mix

    def spy(model, prompts, responses, beta, temperature, seed=None):
        out = real(model, prompts, responses, beta, temperature, seed=seed)
        calls.append({"state": copy.deepcopy(model.state_dict()), "cfg": model.config, "training": model.training,
                      "prompts": prompts, "responses": responses, "beta": beta, "temperature": temperature,
                      "seed": seed, "mixed": out[0]})
        return out

    monkeypatch.setattr(train, "bash_mix", spy)
    train.run(args)
    logs = [json.loads(line) for line in (tmp_path / "scs" / "log.jsonl").read_text().splitlines()]
    return args, calls, [r for r in logs if r.get("phase") == "scs"]


def model_from(call):
    m = GPT(call["cfg"])
    m.load_state_dict(call["state"])
    return m.eval()


def test_scs_in_training_loop_mixes_with_current_weights(tmp_path, monkeypatch):
    args, calls, logs = scs_run(tmp_path, monkeypatch, ["--beta", "0.5"])
    assert len(calls) == 2 and len(logs) == 2
    assert calls[0]["beta"] == 0.5 and calls[0]["temperature"] == args.mix_temperature
    assert calls[0]["seed"] != calls[1]["seed"]
    # the second mix sees the weights after the first optimizer step
    assert any(not torch.equal(calls[0]["state"][k], calls[1]["state"][k]) for k in calls[0]["state"])
    for call, rec in zip(calls, logs):
        m = model_from(call)
        again, _ = bash_mix(m, call["prompts"], call["responses"], call["beta"], call["temperature"], seed=call["seed"])
        assert again == call["mixed"]
        n = sum(map(len, call["responses"]))
        j_sft = sum(row_nll(m, x, y, y)[0] for x, y in zip(call["prompts"], call["responses"])) / n
        j_scs = sum(row_nll(m, x, yh, y)[0] for x, yh, y in zip(call["prompts"], call["mixed"], call["responses"])) / n
        assert rec["j_sft"] == pytest.approx(j_sft, rel=1e-4)
        assert rec["j_scs"] == pytest.approx(j_scs, rel=1e-4)
        assert rec["loss"] == pytest.approx(j_sft + j_scs, rel=1e-4)
        assert call["mixed"] != call["responses"]


def test_scs_mixing_runs_without_dropout(tmp_path, monkeypatch):
    """SCS is BASH's mixing redone online: like build_offline, it must sample from the model in eval
    mode. With dropout on, the mix must still be what the eval-mode model gives for the same seed."""
    _, calls, _ = scs_run(tmp_path, monkeypatch, ["--beta", "1.0", "--dropout", "0.5"])
    for call in calls:
        m = model_from(call)
        ref, _ = bash_mix(m, call["prompts"], call["responses"], call["beta"], call["temperature"], seed=call["seed"])
        assert call["mixed"] == ref, f"SCS mixed with the model in training mode (training={call['training']})"


# ----------------------------------------------------------------------------------------------
# 8. offline_stats


def test_offline_stats_bash_counts():
    rows = make_rows([[1], [2, 3]], [[5, 6, 7, 8], [9, 10, 11]])
    offline = [([5, 1, 7, 2], [True, True, False, True]),   # took 3; differs at j=1, j=3 -> 2
               ([9, 10, 4], [True, False, False])]        # took 1 (same as y); ŷ^2 = 4 != y but not taken -> 0
    offline = [train.TrainRow(r.prompt, m, r.response, [1] * len(m), t) for r, (m, t) in zip(rows, offline)]
    s = train.offline_stats(offline)
    assert s["model_token_share"] == pytest.approx(4 / 7)
    assert s["differs_from_y_share"] == pytest.approx(2 / 7)


def test_offline_stats_rac_counts():
    rows = make_rows([[1], [2], [3]], [[4], [5], [6]])
    offline = [([1, 2, 3], [1, 9, 9], [0, 1, 1]),
               ([4, 5], [4, 5], [0, 0]),
               ([6, 7, 8, 9, 10], [6, 0, 8, 0, 0], [0, 1, 0, 1, 1])]
    offline = [train.TrainRow(r.prompt, *o) for r, o in zip(rows, offline)]
    s = train.offline_stats(offline)
    assert s["corrected_share"] == pytest.approx(5 / 10)
    assert s["rows_without_correction"] == 1
    assert s["mean_z_len"] == pytest.approx(10 / 3)
