"""Preference training (DPO, SPIN): the loss against a hand computation, sequence log-probs against
a per-token forward, SPIN's offline set against generate(), exact accumulation, stop-and-resume,
torchrun against one process, bad pair rows, and the pairs helper for the built-in task.

Runs are the tiny ones of test_train.py (1 layer, width 32, 32 rows, global batch 8).
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
import train  # noqa: E402
from generate import generate  # noqa: E402
from plumbing.chat_templates import render_chat  # noqa: E402
from plumbing.tokenizer import byte_tokenizer  # noqa: E402
from test_train import (CPU, ROOT, TINY, files, finish, one_thread, start,  # noqa: E402,F401
                        tiny_args, tiny_gpt, torchrun_cmd, weights)

sys.path.insert(0, str(ROOT / "scripts"))
import make_pairs  # noqa: E402

BETA = 0.1


def by_hand(model, prompt, response):
    """log p(response | prompt): one unpadded forward, log-softmax per response token, summed."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response[:-1]]))[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response))


def toy_pairs():
    """Prompts and responses of different lengths, so a batch has right padding."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, 63, (n,), generator=g).tolist()  # noqa: E731
    return [train.PairRow(ids(p), ids(c) + [63], ids(r) + [63], rc, rr)
            for p, c, r, rc, rr in ((3, 9, 2, -40.0, -11.0), (7, 1, 12, -9.5, -52.0),
                                    (1, 5, 5, -20.0, -21.0))]


# ----------------------------------------------------------------------------------------------
# 1. The loss and its parts


def test_sequence_logps_are_summed_token_logprobs():
    model = tiny_gpt(seed=2)
    pairs = toy_pairs()
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    with torch.no_grad():
        logp, tokens = train.sequence_logps(model, prompts, responses, CPU)
    expected = [by_hand(model, x, y) for x, y in zip(prompts, responses)]
    torch.testing.assert_close(logp.double(), torch.tensor(expected, dtype=torch.double),
                               rtol=0, atol=1e-4)
    assert tokens == sum(len(x) + len(y) - 1 for x, y in zip(prompts, responses))


def test_dpo_loss_equals_hand_computation():
    model = tiny_gpt(seed=3)
    pairs = toy_pairs()
    with torch.no_grad():
        loss, logged, _ = train.pair_loss(model, pairs, len(pairs), BETA, CPU)
    rewards = [(BETA * (by_hand(model, p.prompt, p.chosen) - p.ref_chosen),
                BETA * (by_hand(model, p.prompt, p.rejected) - p.ref_rejected)) for p in pairs]
    # -log σ(h) = log(1 + e^-h), h = chosen reward - rejected reward
    want = sum(math.log1p(math.exp(-(c - r))) for c, r in rewards) / len(pairs)
    assert abs(loss.item() - want) < 1e-5
    assert logged[0].item() == loss.item()
    assert logged[1].item() == pytest.approx(sum(c > r for c, r in rewards) / len(pairs))
    assert 0 < logged[1].item() < 1, "the toy pairs should include a pair ranked wrong"
    assert logged[2].item() == pytest.approx(sum(c - r for c, r in rewards) / len(pairs), abs=1e-5)


def test_dpo_loss_is_log_2_when_theta_is_the_reference():
    policy = torch.tensor([[-3.0, -7.0], [-12.5, -1.0]])
    losses, rewards = train.dpo_loss(policy, policy.clone(), BETA)
    assert torch.equal(losses, torch.full((2,), math.log(2))) and not rewards.any()
    # through the code path: reference log-probs from pair_rows with the same weights
    model = tiny_gpt(seed=4)
    rows = [data.Row(p.prompt, p.chosen, p.prompt, None, "") for p in toy_pairs()]
    pairs = train.pair_rows(model, rows, [p.rejected for p in toy_pairs()], micro_batch=2)
    loss, logged, _ = train.pair_loss(model, pairs, len(pairs), BETA, CPU)
    assert abs(loss.item() - math.log(2)) < 1e-6 and abs(logged[2].item()) < 1e-6
    # --precision bf16: the reference log-probs are taken in the training's precision too
    pairs = train.pair_rows(model, rows, [p.rejected for p in toy_pairs()], 2, "bf16")
    loss, logged, _ = train.pair_loss(model, pairs, len(pairs), BETA, CPU, "bf16")
    assert abs(loss.item() - math.log(2)) < 1e-6 and abs(logged[2].item()) < 1e-6
    fp32 = train.pair_rows(model, rows, [p.rejected for p in toy_pairs()], 2)
    assert [p.ref_chosen for p in pairs] != [p.ref_chosen for p in fp32]


def test_pair_loss_accumulates_exactly():
    """Micro-batches each divided by the global pair count add up to one batch's mean."""
    pairs = toy_pairs()

    def grads(mb):
        model = tiny_gpt(seed=5)
        for k in range(0, len(pairs), mb):
            train.pair_loss(model, pairs[k:k + mb], len(pairs), BETA, CPU)[0].backward()
        return {n: p.grad for n, p in model.named_parameters()}
    one, split = grads(len(pairs)), grads(1)
    for k in one:
        torch.testing.assert_close(split[k], one[k], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 2. SPIN's offline set is generate()'s samples with the run's seeds; the pairs helper


@pytest.fixture(scope="module")
def spin_one_step(files, tmp_path_factory):
    """--method spin with no SFT phase, stopped after one step: the saved offline set is the
    initial model's."""
    out = tmp_path_factory.mktemp("spin1")
    argv = tiny_args(files, out, "--method", "spin", "--iterations", "1", "--iter-epochs", "1",
                     "--build-batch-size", "12", "--stop-after", "1")
    train.main(argv)
    return argv, out


def test_spin_offline_set_equals_generate(spin_one_step):
    argv, out = spin_one_step
    offline = torch.load(out / "checkpoint" / "train_state.pt", weights_only=True)["offline"]
    args = train.get_args(argv)
    tok = byte_tokenizer()
    model = train.make_model(args, tok, CPU).eval()
    rows = data.load_rows(args.data, tok, "arith", 64, "truncate", False)[0]
    cap = min(max(len(r.response) for r in rows) + 16, 64 - max(len(r.prompt) for r in rows))
    seed = train.seed_for(args.seed, "offline", 0)  # iteration 0, then decode batch k of 12 rows
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt))  # batched by length
    z = [None] * len(rows)
    for k in range(0, len(rows), 12):
        batch = order[k:k + 12]
        made = generate(model, [rows[i].prompt for i in batch], cap, temperature=1.0,
                        eos_id=tok.eos_id, seed=train.seed_for(seed, "batch", k // 12))
        for i, zi in zip(batch, made):
            z[i] = zi
    assert [list(o[2]) for o in offline] == z
    assert [list(o[1]) for o in offline] == [r.response for r in rows]
    with torch.no_grad():
        ref, _ = train.sequence_logps(model, [r.prompt for r in rows] * 2,
                                      [r.response for r in rows] + z, CPU)
    torch.testing.assert_close(torch.tensor([[o[3], o[4]] for o in offline]),
                               torch.stack([ref[:32], ref[32:]], 1), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def pairs_file(spin_one_step, files):
    """make_pairs on a checkpoint that answers nothing right: one pair per row."""
    path = spin_one_step[1] / "pairs.jsonl"
    counts = make_pairs.make_pairs(spin_one_step[1] / "checkpoint", files[0], path, samples=2)
    assert counts == {"pairs": 32, "always_right": 0, "no_final_answer": 0}
    return path


def test_make_pairs_rejects_wrong_answers_only(pairs_file, files, tmp_path, monkeypatch):
    refs = [json.loads(line) for line in files[0].read_text().splitlines()]
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert [(p["prompt"], p["chosen"]) for p in pairs] == [(r["prompt"], r["response"])
                                                           for r in refs]
    assert all(data.extract_answer(p["rejected"]) != data.extract_answer(p["chosen"])
               for p in pairs)
    # a model right on every even answer, and on every answer at the second sample
    calls = []

    def fake(model, rows, tok, batch_size, temperature, seed):
        calls.append(len(rows))
        return [r.reference if int(r.answer) % 2 == 0 or len(calls) > 1 else "1+1=3 #### 3"
                for r in rows]
    monkeypatch.setattr(train, "generate_answers", fake)
    counts = make_pairs.make_pairs(pairs_file.parent / "checkpoint", files[0], tmp_path / "p.jsonl",
                                   samples=2)
    answers = [int(data.extract_answer(r["response"])) for r in refs]
    assert counts["pairs"] == sum(a % 2 == 1 and a != 3 for a in answers)  # "3" is right for 3
    assert counts["always_right"] == 32 - counts["pairs"] and calls[1:] == [32 - counts["pairs"]]


# ----------------------------------------------------------------------------------------------
# 3. Stop and resume is bitwise equal to one uninterrupted run


@pytest.mark.parametrize("method,method_args,stop,total", [
    ("spin", ["--sft-epochs", "1", "--iterations", "2", "--iter-epochs", "1"], 10, 12),
    ("dpo", ["--iterations", "2", "--iter-epochs", "1"], 6, 8),  # stop inside iteration 2
])
def test_stop_and_resume_is_bitwise_equal(files, pairs_file, tmp_path, method, method_args, stop,
                                          total):
    src = (pairs_file, files[1]) if method == "dpo" else files
    a, b = tmp_path / "a", tmp_path / "b"
    argv = lambda out, *more: tiny_args(src, out, "--method", method, *method_args, *more)  # noqa
    train.main(argv(a))
    train.main(argv(b, "--stop-after", stop))
    at_stop = weights(b / "checkpoint")
    train.main(argv(b, "--resume"))
    wa, wb = weights(a / "checkpoint"), weights(b / "checkpoint")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after stop at {stop} and resume"
    assert any(not torch.equal(wa[k], at_stop[k]) for k in wa), "the resumed run did not train"

    def steps(out):
        recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r.get("reward_margin")) for r in recs if "loss" in r]
    assert [s[0] for s in steps(b)] == list(range(1, total + 1))
    assert steps(b) == steps(a)
    assert steps(a)[-1][2] is not None and steps(a)[-1][2] > 0, "DPO should move the margin up"
    # θ = ref (loss log 2) at the first step of an iteration: SPIN's reference is the model at
    # the start of each iteration, DPO's the model at the start of training
    starts = [abs(loss - math.log(2)) < 1e-5 for s, loss, _ in steps(a)
              if s in (total - 7, total - 3)]
    assert starts == ([True, True] if method == "spin" else [True, False])


# ----------------------------------------------------------------------------------------------
# 4. Two processes under torchrun (gloo) match one process


def test_torchrun_two_processes_match_one_for_spin(files, tmp_path):
    """Global batch 8, micro-batch 2; 4 decode batches of 8 dealt over the ranks."""
    procs = {}
    for n in (1, 2):
        args = [*TINY, "--data", str(files[0]), "--out", str(tmp_path / str(n)), "--method", "spin",
                "--sft-epochs", "1", "--iterations", "1", "--iter-epochs", "1", "--batch-size", "8",
                "--micro-batch-size", "2", "--build-batch-size", "8"]
        procs[n] = start(torchrun_cmd(args) if n == 2 else [sys.executable, "train.py", *args])
    for n, p in procs.items():
        rc, _, err = finish(p, timeout=180)
        assert rc == 0, f"{n} process(es) failed:\n{err[-5000:]}"
    w1, w2 = weights(tmp_path / "1" / "checkpoint"), weights(tmp_path / "2" / "checkpoint")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    recs = [json.loads(line) for line in (tmp_path / "2" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("phase") == "spin"] == [5, 6, 7, 8]


# ----------------------------------------------------------------------------------------------
# 5. Pair files: both shapes load; a bad row names its file and line


def test_pair_shapes_load(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1="}], "chosen": "2",
                                "rejected": "3"}) + "\n")
    tok = byte_tokenizer()
    rows, task = data.load_rows(path, tok, "auto", 64, "truncate", False, pairs=True)
    assert task == "chat"
    assert rows[0].prompt == render_chat([{"role": "user", "content": "1+1="}], tok)
    assert (rows[0].response, rows[0].rejected) == ([ord("2"), 256], [ord("3"), 256])


GOOD_PAIR = '{"prompt": "1+1=", "chosen": "1+1=2 #### 2", "rejected": "1+1=3 #### 3"}\n'
BAD_PAIR = {
    "malformed_json": '{"prompt": "1+1=", "chosen": "2"\n',
    "missing_rejected": '{"prompt": "1+1=", "chosen": "2"}\n',
    "rejected_not_text": '{"prompt": "1+1=", "chosen": "2", "rejected": 3}\n',
    "empty_rejected": '{"prompt": "1+1=", "chosen": "2", "rejected": " "}\n',
    "empty_chosen": '{"prompt": "1+1=", "chosen": "", "rejected": "3"}\n',
    "no_prompt": '{"question": "1+1=", "chosen": "2", "rejected": "3"}\n',
    "no_turns": '{"messages": [], "chosen": "2", "rejected": "3"}\n',
    "bad_turn": '{"messages": [{"role": "user"}], "chosen": "2", "rejected": "3"}\n',
    "sft_row": '{"prompt": "1+1=", "response": "2"}\n',
}


@pytest.mark.parametrize("case", BAD_PAIR)
def test_bad_pair_row_names_file_and_line(tmp_path, case):
    path, out = tmp_path / f"bad_{case}.jsonl", tmp_path / "out"
    path.write_text(GOOD_PAIR * 2 + BAD_PAIR[case])
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--data", str(path), "--out", str(out), "--method", "dpo",
                    "--batch-size", "2", "--micro-batch-size", "2"])
    message = str(e.value.code)
    assert f"{path}:3:" in message, message
    assert not out.exists()


def test_help_documents_preference_flags(capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    text = capsys.readouterr().out
    for word in ("dpo", "spin", "--dpo-beta", "--spin-temperature", "chosen,rejected"):
        assert word in text, word
