"""scripts/judge.py against a real HTTP server on 127.0.0.1 that answers as a chat-completions
judge would, and as a flaky one does: the win rate and its Wilson interval, the order of A and B
drawn from the seed, nothing asked twice across runs, retries with back-off, malformed answers
counted and never guessed, failures reported, a refused key in one line. Nothing here reaches
beyond the loopback (the proxy variables are cleared)."""
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import judge  # noqa: E402

PAIR = re.compile(r"\[(?:summary|response) A\]\n(.*?)\n\n\[(?:summary|response) B\]\n(.*?)\n\n"
                  r"Instructions:", re.S)


class Judge(BaseHTTPRequestHandler):
    """Prefers the generation ('GEN ...') unless it says BAD; GARBLE: an answer naming no one
    letter; FLAKY: 503 twice first; RATE: 429 (Retry-After: 0) once first; NOJSON: a page that is
    not JSON once first; DOWN: 500 while the server is down; a wrong key: 401."""

    def do_POST(self):
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        a, b = PAIR.search(text).groups()
        gen_is = "A" if a.startswith("GEN") else "B"
        gen = a if gen_is == "A" else b
        with s.lock:
            s.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                               "body": body, "gen_is": gen_is, "gen": gen})
            seen = sum(r["gen"] == gen for r in s.requests)
        if s.key and self.headers.get("Authorization") != f"Bearer {s.key}":
            return self.reply(401, {"error": {"message": "Incorrect API key provided"}})
        if ("FLAKY" in gen and seen <= 2) or ("DOWN" in gen and s.down):
            return self.reply(503 if "FLAKY" in gen else 500, {"error": {"message": "busy"}})
        if "RATE" in gen and seen == 1:
            return self.reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        if "NOJSON" in gen and seen == 1:
            return self.reply(200, "<html>gateway</html>")
        letter = ("B" if gen_is == "A" else "A") if "BAD" in gen else gen_is
        said = ("Comparison: both are fine.\nPreferred: A or B" if "GARBLE" in gen else
                f"Comparison: {letter} covers the post better.\nPreferred: {letter}")
        self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant",
                                                               "content": said}}]})

    def reply(self, code, payload, headers=()):
        raw = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(code)
        for k, v in dict(headers).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    s.requests, s.lock, s.key, s.down = [], threading.Lock(), None, True
    s.url = f"http://127.0.0.1:{s.server_address[1]}/v1"
    threading.Thread(target=s.serve_forever, daemon=True).start()
    yield s
    s.shutdown()
    s.server_close()


def generations(path: Path, words: list[str], samples: int = 1) -> Path:
    rows = [{"id": i, "line": i + 1, "sample": s, "prompt": f"Post number {i}: my cat {w}.",
             "generation": f"GEN {w} {i}", "reference": f"REF {i}"}
            for s in range(samples) for i, w in enumerate(words)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(path, server, capsys, *extra):
    """judge.main: (summary, stderr), or (the SystemExit message, stderr)."""
    argv = [str(path), "--template", "tldr", "--judge-url", server.url, "--judge-model",
            "judge-1", "--backoff", "0", "--workers", "3", *map(str, extra)]
    try:
        judge.main(argv)
    except SystemExit as e:
        out, err = capsys.readouterr()
        return str(e.code), err, out
    out, err = capsys.readouterr()
    return json.loads(out), err, out


def test_verdicts_are_read_never_guessed():
    assert judge.verdict("Comparison: A is tighter.\nPreferred: A") == "A"
    assert judge.verdict("Comparison: x\n**Preferred:** B") == "B"
    assert judge.verdict('Comparison: x\nPreferred: "b".') == "B"
    assert judge.verdict("Comparison: x\nPreferred: Summary A") == "A"
    assert judge.verdict("Comparison: x\nPreferred: A\nPreferred: A") == "A"
    for bad in ("Comparison: x\nPreferred: A or B", "Preferred: A\nPreferred: B",
                "I prefer A.", "Preferred: neither", "Preferred: AB", "", None,
                "Comparison: x. Preferred: A"):  # the verdict must be on its own line
        assert judge.verdict(bad) is None, bad


@pytest.mark.parametrize("wins, n", [(0, 5), (3, 10), (18, 24), (50, 50), (327, 1000)])
def test_wilson_interval_solves_its_quadratic(wins, n):
    """Wilson's bounds are the p where (p̂ - p)² = z² p (1 - p) / n: solved here by numpy."""
    z, ph = judge.Z95, wins / n
    roots = sorted(np.roots([1 + z * z / n, -(2 * ph + z * z / n), ph * ph]).real)
    assert judge.wilson(wins, n) == pytest.approx(roots, abs=1e-12)
    assert judge.wilson(0, 0) is None


def test_win_rate_order_and_nothing_asked_twice(tmp_path, server, capsys):
    words = ["GOOD" if i % 4 else "BAD" for i in range(12)]  # 9 of 12 prefer the generation
    gens = generations(tmp_path / "rac.gen.jsonl", words, samples=2)
    res, err, _ = run(gens, server, capsys)
    assert "asking about 24" in err
    assert (res["pairs"], res["wins"], res["losses"], res["malformed"], res["failed"]) == (
        24, 18, 6, 0, 0)
    assert res["win_rate"] == 0.75 and res["win_rate_ci95"] == judge.wilson(18, 24)
    assert res["win_rate_by_sample"] == {"0": 0.75, "1": 0.75}
    first = [r for r in server.requests]
    assert len(first) == 24
    assert 0 < sum(r["gen_is"] == "A" for r in first) < 24  # both orders, drawn from the seed
    body = first[0]["body"]
    assert first[0]["path"] == "/v1/chat/completions" and first[0]["auth"] is None
    assert (body["model"], body["temperature"]) == ("judge-1", 0)
    prompt = body["messages"][0]["content"]
    assert prompt.startswith("Which of the following summaries does a better job of summarizing "
                             "the most important points in the given forum post")
    assert re.search(r"\[post\]\nPost number \d+: my cat \w+\.\n\n\[summary A\]\n", prompt)
    assert prompt.endswith("Comparison: one-sentence comparison and explanation\n"
                           "Preferred: A or B")
    cache = gens.with_name("rac.gen.judged.jsonl")
    assert len(cache.read_text().splitlines()) == 24

    again, err, _ = run(gens, server, capsys)  # a rerun: nothing asked, the same result
    assert len(server.requests) == 24 and "asking about 0" in err
    assert again == res

    # another seed: other orders, so other requests, judged into their own cache
    other, _, _ = run(gens, server, capsys, "--seed", "1", "--cache", tmp_path / "seed1.jsonl")
    orders = {(r["body"]["messages"][0]["content"]) for r in server.requests[24:]}
    assert len(server.requests) == 48 and orders != {r["body"]["messages"][0]["content"]
                                                     for r in first}
    assert (other["wins"], other["losses"]) == (18, 6)
    assert other["first_position_chosen"] != res["first_position_chosen"]


def test_retries_malformed_and_failures(tmp_path, server, capsys):
    words = ["GOOD", "FLAKY", "RATE", "NOJSON", "GARBLE", "DOWN"]
    gens = generations(tmp_path / "g.jsonl", words)
    msg, err, out = run(gens, server, capsys, "--retries", "3")
    assert msg == ("error: judge.py: 1 pairs got no answer (listed above; rerun to ask them "
                   "again: judged pairs are not asked twice)")
    assert f"{gens}:6: HTTP 500 after 4 tries" in err
    res = json.loads(out)
    assert (res["wins"], res["losses"], res["malformed"], res["failed"]) == (4, 0, 1, 1)
    assert res["win_rate"] == 1.0 and res["win_rate_ci95"] == judge.wilson(4, 4)
    asked = {w: sum(r["gen"].split()[1] == w for r in server.requests) for w in words}
    assert asked == {"GOOD": 1, "FLAKY": 3, "RATE": 2, "NOJSON": 2, "GARBLE": 1, "DOWN": 4}
    garbled = [json.loads(line) for line in gens.with_name("g.judged.jsonl").read_text()
               .splitlines() if "GARBLE" in line or "both are fine" in line]
    assert len(garbled) == 1 and garbled[0]["verdict"] is None  # kept, counted, not guessed

    server.down = False  # the rerun asks only the pair that got no answer
    res, err, _ = run(gens, server, capsys, "--retries", "3")
    assert "asking about 1" in err and len(server.requests) == 14
    assert (res["wins"], res["malformed"], res["failed"]) == (5, 1, 0)


def test_the_key_comes_from_the_environment(tmp_path, server, capsys, monkeypatch):
    gens = generations(tmp_path / "g.jsonl", ["GOOD", "GOOD"])
    server.key = "sekrit-123"
    monkeypatch.setenv("JUDGE_KEY", "sekrit-123")
    res, _, _ = run(gens, server, capsys, "--key-env", "JUDGE_KEY")
    assert res["wins"] == 2 and {r["auth"] for r in server.requests} == {"Bearer sekrit-123"}
    monkeypatch.setenv("JUDGE_KEY", "wrong")
    msg, _, _ = run(gens, server, capsys, "--key-env", "JUDGE_KEY", "--cache",
                    tmp_path / "other.jsonl", "--workers", "1")
    assert msg.startswith(f"error: judge.py: --judge-url {server.url}/chat/completions: HTTP 401 "
                          "(the key in $JUDGE_KEY): ")
    assert "wrong" not in msg  # the key itself is never printed
    refused = [r["gen"] for r in server.requests[2:]]
    assert 1 <= len(refused) == len(set(refused))  # each pair refused once, never retried


def test_a_cut_cache_line_is_asked_again_and_bad_input_is_one_line(tmp_path, server, capsys):
    gens = generations(tmp_path / "g.jsonl", ["GOOD", "BAD", "GOOD"])
    first, _, _ = run(gens, server, capsys)
    cache = gens.with_name("g.judged.jsonl")
    raw = cache.read_bytes()
    cache.write_bytes(raw[:len(raw) - 20])  # killed while writing its last line
    again, err, _ = run(gens, server, capsys)
    assert "last line was cut short" in err and "asking about 1" in err
    assert again == first and len(server.requests) == 4
    assert all(json.loads(line) for line in cache.read_text().splitlines())

    bad = tmp_path / "bad.jsonl"
    bad.write_text(gens.read_text() + '{"id": 9, "generation": "x"}\n')
    msg, _, _ = run(bad, server, capsys)
    assert msg.startswith(f"error: judge.py: {bad}:4: expected {{id, sample, prompt, generation, ")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"id": 0, "sample": 0, "prompt": [{"role": "user", "content": "hi"}],
                                "generation": "GEN GOOD", "reference": "REF"}) + "\n")
    msg, _, _ = run(chat, server, capsys)
    assert msg == f"error: judge.py: {chat}:1: --template tldr needs a text prompt (the post)"
    res, _, _ = run(chat, server, capsys, "--template", "qa")  # the last --template wins
    assert res["wins"] == 1
    assert server.requests[-1]["body"]["messages"][0]["content"].startswith(
        "For the following query to a chatbot, which response is more helpful?")
    assert "[query]\nuser: hi\n\n[response A]" in server.requests[-1]["body"]["messages"][0][
        "content"]


def test_alpaca_outputs_one_sample(tmp_path, capsys):
    """scripts/alpaca_outputs.py: one sample of AlpacaEval generations as alpaca_eval reads them."""
    import alpaca_outputs
    ask = [{"role": "user", "content": "Name a colour."}]
    rows = [{"id": 0, "sample": s, "prompt": ask, "generation": f"Blue {s}.", "reference": "Red."}
            for s in range(3)]
    gens = tmp_path / "alpaca.gen.jsonl"
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "outputs.json"
    alpaca_outputs.main([str(gens), "--sample", "2", "--generator", "rac", "--out", str(out)])
    assert json.loads(out.read_text()) == [
        {"instruction": "Name a colour.", "output": "Blue 2.", "generator": "rac"}]
    two = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, *ask]
    gens.write_text(json.dumps({**rows[0], "prompt": two}) + "\n")
    with pytest.raises(SystemExit, match=r"gen\.jsonl:1: AlpacaEval rows are one user turn"):
        alpaca_outputs.main([str(gens), "--generator", "rac", "--out", str(out)])
