"""scripts/study.py end to end on tiny models: from scratch on the built-in task, and from a
pretrained checkpoint on GSM-style files (the real-model study's path), each in a few seconds."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import study  # noqa: E402
from data import load_rows  # noqa: E402
import train  # noqa: E402
from model import from_pretrained  # noqa: E402
from plumbing.tokenizer import load_tokenizer  # noqa: E402

TINY_SIZES = ["--batch-size", "4", "--warmup-batch-size", "2", "--micro-batch-size", "2",
              "--warmup-epochs", "1", "--max-rounds", "1", "--seeds", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gsm_dir(folder: Path, kind: str = "gsm") -> Path:
    """train/dev/test.jsonl in make_gsm.py's shape: {question, answer ending in '#### N'}; or
    (kind "math") in MATH's as scripts/prepare_data.py writes it: the answer in a \\boxed{}."""
    folder.mkdir()
    last = "\n#### {}" if kind == "gsm" else ", so the answer is $\\boxed{{{}}}$."
    for name, base in (("train", 0), ("dev", 100), ("test", 200)):
        rows = [{"question": f"Tom has {a} apples and gets {a % 7} more. How many now?",
                 "answer": f"{a}+{a % 7}={a + a % 7}" + last.format(a + a % 7)}
                for a in range(base, base + 10)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def pretrained(tmp_path: Path, gsm: Path) -> Path:
    """A tiny model trained a few steps on the GSM rows: a checkpoint folder like any --init."""
    out = tmp_path / "pre"
    train.run(train.get_args([
        "--init", "scratch", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size",
        "512", "--data", str(gsm / "train.jsonl"), "--task", "math", "--batch-size", "4",
        "--micro-batch-size", "4", "--iter-epochs", "1", "--device", "cpu", "--out", str(out)]))
    return out / "checkpoint"


@pytest.mark.parametrize("kind", ["gsm", "math"])
def test_gsm_from_a_pretrained_checkpoint(tmp_path, kind):
    """--tasks gsm on GSM-style splits, or on MATH-shaped ones scored by their \\boxed{}."""
    gsm = gsm_dir(tmp_path / "gsm", kind)
    init = pretrained(tmp_path, gsm)
    out = tmp_path / "study"
    study.main(["--init", str(init), "--tasks", "gsm", "--gsm-dir", str(gsm), "--train-size",
                "8", "--dev-size", "4", "--test-size", "6", "--max-new-tokens", "8",
                "--precision", "bf16", "--out", str(out), *TINY_SIZES])

    # the first n problems of each split, and no reference rows in the warm-up's data
    for name, n in (("train", 8), ("dev", 4), ("test", 6)):
        copied = (out / "gsm" / "data" / f"{name}.jsonl").read_text().splitlines()
        assert copied == (gsm / f"{name}.jsonl").read_text().splitlines()[:n]
    assert not (out / "gsm" / "data" / "warmup.jsonl").exists()
    warm = json.loads((out / "gsm" / "warmup" / "settings.json").read_text())
    assert warm["init"] == str(init) and warm["epochs"] == 1.0
    warm_run = json.loads((out / "gsm" / "warmup" / "checkpoint" / "run.json").read_text())
    assert warm_run["settings"]["batch_size"] == 2  # --warmup-batch-size; continuations: 4

    results = json.loads((out / "test" / "gsm.json").read_text())
    assert [r["label"] for r in results] == ["pretrained", "warm-up", "sft", "bash", "rac"]
    # the first row is the checkpoint itself, scored with the math template on the test split
    tok, model = load_tokenizer(init), from_pretrained(init)
    rows, _ = load_rows(out / "gsm" / "data" / "test.jsonl", tok, "math",
                              model.config.block_size, "fail", False)
    assert all(r.boxed == (kind == "math") and r.answer for r in rows)
    direct = train.evaluate(model, rows, tok, "math", 2, 256, 8)
    assert results[0]["val_loss"] == pytest.approx(direct["val_loss"], rel=1e-5)
    assert results[0]["accuracy"] == direct["accuracy"]
    assert results[1]["val_loss"] != pytest.approx(results[0]["val_loss"], rel=1e-3)  # trained
    # every continuation ran with the study's template, batches and cap, from the warm-up
    for r, method in zip(results[2:], ("sft", "bash", "rac")):
        run = json.loads((out / "test" / "gsm" / "seed0" / method / "checkpoint" / "run.json")
                         .read_text())["settings"]
        assert (run["method"], run["task"], run["micro_batch_size"], run["rac_max_new_tokens"],
                run["precision"]) == (method, "math", 2, 8, "bf16")
        assert r["steps"] == 2  # 8 rows, batch 4, one epoch
    table = (out / "test" / "gsm.md").read_text()
    assert "| pretrained |" in table and "| rac |" in table


def test_chain_from_scratch_writes_reference_rows(tmp_path):
    out = tmp_path / "study"
    sizes = TINY_SIZES[:2] + TINY_SIZES[4:]  # no --warmup-batch-size
    argv = ["--tasks", "chain", "--train-size", "8", "--dev-size", "4", "--test-size", "4",
            "--methods", "sft", "--out", str(out), *sizes]
    study.main(argv)
    warm = json.loads((out / "chain" / "warmup" / "checkpoint" / "run.json").read_text())
    assert warm["settings"]["batch_size"] == 3  # 2 problems a step and half as many references
    data_dir = out / "chain" / "data"
    train_rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    warmup = [json.loads(line) for line in (data_dir / "warmup.jsonl").read_text().splitlines()]
    # f(x, y) -> y for the first half of the training rows (--ref-share 0.5), after the rows
    assert warmup == train_rows + [{"prompt": f"ref {r['response']}\n{r['prompt']}",
                                    "response": r["response"]} for r in train_rows[:4]]
    prompts = [set(json.loads(line)["prompt"] for line in (data_dir / f"{n}.jsonl").read_text()
                   .splitlines()) for n in ("train", "dev", "test")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    results = json.loads((out / "test" / "chain.json").read_text())
    assert [r["label"] for r in results] == ["warm-up", "sft"]  # no pretrained row from scratch
    settings = json.loads((out / "chain" / "warmup" / "settings.json").read_text())
    study.main(argv + ["--ref-share", "1"])  # every reference row: another warm-up, not reused
    warmup = [json.loads(line) for line in (data_dir / "warmup.jsonl").read_text().splitlines()]
    assert warmup == train_rows + [{"prompt": f"ref {r['response']}\n{r['prompt']}",
                                    "response": r["response"]} for r in train_rows]
    warm = json.loads((out / "chain" / "warmup" / "checkpoint" / "run.json").read_text())
    assert warm["settings"]["batch_size"] == 4  # --batch-size, as before the share existed
    assert json.loads((out / "chain" / "warmup" / "settings.json").read_text()) != settings


def test_rerun_reuses_finished_runs_and_redoes_changed_ones(tmp_path, monkeypatch):
    out = tmp_path / "study"
    argv = ["--tasks", "chain", "--train-size", "8", "--dev-size", "4", "--test-size", "4",
            "--methods", "sft", "rac", "--out", str(out), *TINY_SIZES]
    study.main(argv)
    first = json.loads((out / "test" / "chain.json").read_text())
    ran, real_run = [], train.run
    monkeypatch.setattr(train, "run", lambda a: ran.append(a.method) or real_run(a))
    study.main(argv)  # nothing changed: no continuation runs again, the same results
    assert ran == [] and json.loads((out / "test" / "chain.json").read_text()) == first
    assert "label_precision" in first[-1]  # RAC's, reused with the rest of its result
    ckpt = out / "chain" / "warmup" / "checkpoint" / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes())  # the warm-up rewritten: its continuations are stale
    study.main(argv)
    assert ran == ["sft", "rac"]
    ran.clear()
    (out / "test" / "chain" / "seed0" / "rac" / "result.json").write_text("{")  # unreadable
    study.main(argv)
    assert ran == ["rac"]
    ran.clear()
    (out / "chain" / "warmup" / "settings.json").write_text("{")  # the warm-up's, unreadable
    study.main(argv)
    assert ran[0] == "sft" and ran[-2:] == ["sft", "rac"]  # the warm-up again, then both


import map as study_map  # noqa: E402  (scripts/map.py)
from plumbing.tokenizer import byte_tokenizer  # noqa: E402


def test_right_continuation_by_hand():
    eos = study.EOS
    right = study.right_continuation
    # chain: the next step from the model's own result; after '####' the answer to x (5)
    assert right("chain", "5+4-4=", "") == "5+4=9,"
    assert right("chain", "5+4-4=", "5+4=8,") == "8-4=4 #### 5" + eos
    assert right("chain", "5+4-4=", "5+4=8,8-") == "4=4 #### 5" + eos
    assert right("chain", "5+4-4=", "5+4=8,9") is None  # left its own prefix: nothing is right
    assert right("chain", "5+4-4=", "5+4=8,8-4=4 ####") == " 5" + eos
    assert right("chain", "5+4-4=", "5+4=8,8-4=4 #### 5") == eos
    # totals: each element is the running total of x, whatever came before
    assert right("totals", "5+4-4=", "+4=8,") == "-4=5 #### 5" + eos
    assert right("totals", "5+4-4=", "+4=8,-4=6 #### 5") == eos
    assert right("totals", "5+4-4=", "+4=9,-4=5,") is None  # an element too many
    assert right("totals", "5+4-4=", "+5") is None


def test_label_precision_counts_right_corrections():
    tok = byte_tokenizer()
    enc = lambda s: list(s.encode())  # noqa: E731
    x, z = enc("5+4-4="), enc("5+4=8,8-4=4 #### 4") + [tok.eos_id]
    zbar = list(z)
    marks = {}
    for j, new, ok in ((4, "9", True), (6, "9", False), (10, "4", True), (17, "5", True),
                       (9, "5", None)):  # (position, label, right?); None: prefix '...,8-4' ok
        zbar[j], marks[j] = ord(new), ok
    mask = [int(j in marks) for j in range(len(z))]
    res = study.label_precision("chain", tok, [(x, z, zbar, mask)])
    # position 9 follows '5+4=8,8-4': the right next token is '=', not '5' -> defined, wrong
    assert res == {"label_precision": 3 / 5, "labels_defined_share": 1.0}
    # x inside a chat template whose text has numbers of its own: the same labels, the same count
    chat = enc("<|system|>\nKnowledge cutoff: 2024-12\n<|user|>\n5+4-4=\n<|assistant|>\n")
    assert study.label_precision("chain", tok, [(chat, z, zbar, mask)]) == res


def test_map_end_to_end_tiny(tmp_path):
    out = tmp_path / "map"
    study_map.main(["--tasks", "totals", "--seeds", "0", "--train-size", "16", "--dev-size", "4",
                    "--test-size", "4", "--warmup-epochs", "2", "--n-layer", "1", "--n-embd", "32",
                    "--batch-size", "8", "--micro-batch-size", "8", "--stage-fractions", "0.5",
                    "--lrs", "1e-4", "3e-4", "--grid", "sft-lr", "--betas", "0.2",
                    "--rac-temperatures", "1.0", "--out", str(out), "--to", str(tmp_path / "docs")])
    state = json.loads((out / "totals.json").read_text())
    assert state["stages"] == [1, 2] and [e for e, _ in state["curve"]] == [1, 2]
    for e in (1, 2):  # each stage is the warm-up's own checkpoint after that epoch
        assert (out / "totals" / "warmup" / f"epoch-{e}" / "model.safetensors").exists()
    res = state["results"]
    assert sorted(k for k in res if k.startswith("test")) == sorted(
        f"test|{e}|{m}|0" for e in (1, 2) for m in ("sft", "bash", "rac"))
    for c in state["cells"]:  # Δ is paired with continued SFT of the same stage and seed
        if c["method"] != "sft":
            sft = res[f"test|{c['stage']}|sft|0"]["accuracy"]
            own = res[f"test|{c['stage']}|{c['method']}|0"]["accuracy"]
            assert c["delta"][0] == pytest.approx(100 * (own - sft))
    for e in (1, 2):  # --grid sft-lr: SFT's lr picked on dev (ties: the smaller), for all three
        dev = {lr: res[f"dev|{e}|sft|0|lr{lr:g}-b0.2-t1"]["accuracy"] for lr in (1e-4, 3e-4)}
        picked = 3e-4 if dev[3e-4] > dev[1e-4] else 1e-4
        assert {res[f"test|{e}|{m}|0"]["settings"]["lr"] for m in ("sft", "bash", "rac")} == {picked}
    assert "label_precision" in res["test|2|rac|0"] and "differs_from_y_share" in res["test|2|bash|0"]
    assert (tmp_path / "docs" / "map_totals.png").exists()


def test_map_runs_sft_at_another_methods_lr(tmp_path, monkeypatch):
    """Where a method's dev pick is another lr than SFT's, Δ mixes the method with the lr: the
    map also runs continued SFT at that lr and reports Δ against it."""
    base = {"epochs": 1.0, "iterations": 1, "beta": 0.2, "rac_temperature": 1.0}
    monkeypatch.setattr(study_map, "tune", lambda *a: {"sft": {**base, "lr": 3e-4},
                                                       "bash": {**base, "lr": 1e-4}})
    out = tmp_path / "map"
    study_map.main(["--tasks", "totals", "--seeds", "0", "--methods", "sft", "bash",
                    "--train-size", "16", "--dev-size", "4", "--test-size", "4",
                    "--warmup-epochs", "1", "--n-layer", "1", "--n-embd", "32", "--batch-size",
                    "8", "--micro-batch-size", "8", "--out", str(out), "--to", str(tmp_path)])
    state = json.loads((out / "totals.json").read_text())
    res = state["results"]
    assert sorted(k for k in res if k.startswith("test")) == [
        "test|1|bash|0", "test|1|sft@0.0001|0", "test|1|sft|0"]
    control = res["test|1|sft@0.0001|0"]
    assert control["settings"]["lr"] == 1e-4 and control["steps"] == res["test|1|sft|0"]["steps"]
    bash = next(c for c in state["cells"] if c["method"] == "bash")
    own = 100 * res["test|1|bash|0"]["accuracy"]
    assert bash["delta"][0] == pytest.approx(own - 100 * res["test|1|sft|0"]["accuracy"])
    assert bash["delta_same_lr"][0] == pytest.approx(own - 100 * control["accuracy"])


def test_preference_rows_share_one_pair_file_at_their_own_settings(tmp_path):
    """Table 4's analogue: one pair file, built once from the warm-up, for DPO after continued
    SFT and after RAC; DPO and SPIN at their own lr and λ, not the continuation's."""
    import hashlib
    out = tmp_path / "study"
    study.main(["--tasks", "chain", "--train-size", "8", "--dev-size", "4", "--test-size", "4",
                "--preference", "--dpo-lr", "1e-6", "--dpo-beta", "0.5", "--spin-lr", "2e-6",
                "--spin-beta", "0.01", "--out", str(out), *TINY_SIZES])
    pairs = sorted((out / "chain" / "data").glob("pairs*"))
    assert [p.name for p in pairs] == ["pairs-warmup.jsonl"]
    digest = hashlib.sha256(pairs[0].read_bytes()).hexdigest()
    seed = out / "test" / "chain" / "seed0"
    for name, base in (("dpo-after-sft", "sft"), ("dpo-after-rac", "rac")):
        run = json.loads((seed / name / "checkpoint" / "run.json").read_text())["settings"]
        assert (run["method"], run["lr"], run["dpo_beta"], run["data_sha256"]) == (
            "dpo", 1e-6, 0.5, digest)
        # the pairs' reference log-probs are the base checkpoint's: DPO started from it
        saved = torch.load(seed / name / "checkpoint" / "train_state.pt", weights_only=True)
        prompt, chosen, _, ref_chosen, _ = saved["offline"][0]
        base_model = from_pretrained(seed / base / "checkpoint").eval()
        with torch.no_grad():
            logp, _ = train.sequence_logps(base_model, [prompt], [chosen], torch.device("cpu"))
        assert logp.item() == pytest.approx(ref_chosen, rel=1e-4)
    spin = json.loads((seed / "spin" / "checkpoint" / "run.json").read_text())["settings"]
    assert (spin["method"], spin["lr"], spin["dpo_beta"]) == ("spin", 2e-6, 0.01)
    labels = [r["label"] for r in json.loads((out / "test" / "chain.json").read_text())]
    assert labels == ["warm-up", "sft", "bash", "rac", "dpo after sft", "dpo after rac", "spin"]


def test_chat_template_reference_rows_are_the_rac_prompts(tmp_path):
    """--template chat: the warm-up's reference rows f(x, y) -> y are the paper's QA_REF in a
    user turn after its system prompt, token for token the f(x, y) that RAC's labeller reads."""
    args = study.get_args(["--template", "chat", "--train-size", "3", "--dev-size", "2",
                           "--test-size", "2", "--ref-share", "1"])
    data = study.write_splits(tmp_path / "data", "chain", args)
    assert (data["template"], data["form"]) == ("chat", "chain")
    tok = train.byte_tokenizer()
    train_rows, _ = load_rows(data["train"], tok, "chat", 512, "fail", True)
    warm, _ = load_rows(data["warmup"], tok, "chat", 512, "fail", False)
    assert len(warm) == 6
    for row, own in zip(train_rows, warm[:3]):  # the training rows: x in one user turn
        assert (own.prompt, own.response) == (row.prompt, row.response)
    lines = [json.loads(line)["messages"] for line in data["train"].read_text().splitlines()]
    for row, ref, (x, y) in zip(train_rows, warm[3:], lines):
        assert ref.prompt == row.ref_prompt and ref.response == row.response
        turn = lambda role, text: tok.encode(f"<|{role}|>\n{text}") + [tok.eos_id] + tok.encode("\n")  # noqa
        question = (f"{x['content']}\nAnswer this question based on the following reference "
                    f"response: {y['content']}")
        assert ref.prompt == (turn("system", study.QA_SYSTEM) + turn("user", question)
                              + tok.encode("<|assistant|>\n"))  # the zephyr-style tags, by hand
    assert all(r.answer is not None for r in train_rows)  # '#### n' is still scored
    # one shape in every file, so that the warm-up (warmup.jsonl) can evaluate on dev.jsonl
    dev, _ = load_rows(data["dev"], tok, "chat", 512, "fail", False)
    assert {r.shape for r in train_rows + warm + dev} == {"messages"}


@pytest.mark.parametrize("script", ["study", "map"])
def test_an_unexpected_failure_is_one_error_line(script, monkeypatch, capsys, tmp_path):
    """Any exception that escapes the study or the map (a missing module, as numpy once was)
    ends in one `error:` line naming the script and the exception; --debug or BASH_RAC_DEBUG=1
    gives the traceback instead."""
    import map as study_map
    module, body = (study, "study") if script == "study" else (study_map, "draw_map")

    def missing(args):
        raise ModuleNotFoundError("No module named 'numpy'")
    monkeypatch.setattr(module, body, missing)
    argv = ["--out", str(tmp_path / "o")]
    monkeypatch.delenv("BASH_RAC_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    line = str(e.value.code)
    assert line.startswith(f"error: {script}.py: ModuleNotFoundError: No module named 'numpy'")
    assert "\n" not in line
    with pytest.raises(ModuleNotFoundError):
        module.main(argv + ["--debug"])
    monkeypatch.setenv("BASH_RAC_DEBUG", "1")
    with pytest.raises(ModuleNotFoundError):
        module.main(argv)
