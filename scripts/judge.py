"""Pairwise win rate of a run's generations against the references, by an LLM judge.

    export OPENAI_API_KEY=...
    python scripts/judge.py out/rac/tldr-test.gen.jsonl --template tldr \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4-turbo

The generations file is what scripts/eval_checkpoint.py --generations writes: one JSON line per
row and sample, {"id", "sample", "prompt", "generation", "reference"}. For each line the judge
is asked once which of two answers is better, the generation and the reference in an order
drawn from --seed and the line's (id, sample), so that position bias falls on both alike:

  tldr  the paper's TL;DR prompt (appendix A.1): the post, summaries A and B, "FIRST provide a
        one-sentence comparison ... SECOND ... state only A or B", answered "Preferred: A or B"
  qa    the same format for a query and two responses ("which response is more helpful"),
        for general QA; the paper's own QA score is AlpacaEval 2.0's length-controlled win
        rate against GPT-4 Turbo (docs/reproduce.md), which this plain win rate is not

Any OpenAI-compatible chat-completions endpoint answers (--judge-url, /chat/completions added
unless given; the key from the environment variable --key-env names, never from a flag; no key:
no Authorization header, for a local server). Python's standard library only.

Every answer is appended to --cache (default: next to the generations, <name>.judged.jsonl)
as it arrives, keyed by a hash of the whole request (model, prompt, order): a rerun, after a
crash or a Ctrl-C, never asks about a judged pair again. A request that fails (no connection,
a timeout, HTTP 408, 429 or 5xx, a reply that is not chat-completions JSON) is retried
--retries times with exponential back-off (Retry-After honoured); a pair still unanswered is
counted as failed and not cached, and the command exits 1 after its summary (rerun to ask
again). Another HTTP error (a refused key, an unknown model) stops at once, in one line.
An answer without exactly one clear "Preferred: A" or "Preferred: B" is counted as malformed
(and cached), never guessed.

The summary (JSON): wins and losses of the generation, malformed and failed counts, the win
rate over the well-formed verdicts with its 95 % Wilson score interval (malformed answers are
left out of both and reported apart), the win rate of each sample, and how often the judge
chose the first position.
"""
import argparse
import concurrent.futures
import hashlib
import http.client
import json
import math
import os
import random
import re
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plumbing.checks import (non_negative_float, non_negative_int, parse_json,  # noqa: E402
                             positive_float, positive_int, regular_lines, script_main)

TLDR = """Which of the following summaries does a better job of summarizing the most \
important points in the given forum post, without including unimportant or irrelevant \
details? Judge based on accuracy, coverage, and coherence.

[post]
{x}

[summary A]
{a}

[summary B]
{b}

Instructions:
FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer \
and why. SECOND, on a new line, state only A or B to indicate your choice. Your response \
should use the format:
Comparison: one-sentence comparison and explanation
Preferred: A or B"""

QA = """For the following query to a chatbot, which response is more helpful? Judge based \
on helpfulness, accuracy, and relevance to the query.

[query]
{x}

[response A]
{a}

[response B]
{b}

Instructions:
FIRST provide a one-sentence comparison of the two responses, explaining which you prefer \
and why. SECOND, on a new line, state only A or B to indicate your choice. Your response \
should use the format:
Comparison: one-sentence comparison and explanation
Preferred: A or B"""

TEMPLATES = {"tldr": TLDR, "qa": QA}
VERDICT = re.compile(r"^\W*preferred\W*:\W*(?:(?:summary|response)\s+)?([AB])\W*$",
                     re.IGNORECASE | re.MULTILINE)
RETRIED = (408, 429, 500, 502, 503, 504)
Z95 = 1.959963984540054


class Fatal(ValueError):
    """An answer that asking again cannot change (a refused key, an unknown model)."""


class Unanswered(ValueError):
    """No usable reply after every try; the message says the last failure."""


def verdict(answer) -> str | None:
    """'A' or 'B' from the judge's 'Preferred: X' line(s); None unless exactly one is named."""
    found = {m.upper() for m in VERDICT.findall(answer)} if isinstance(answer, str) else set()
    return found.pop() if len(found) == 1 else None


def wilson(wins: int, n: int, z: float = Z95) -> list[float] | None:
    """The Wilson score interval for a proportion wins / n (None for n = 0)."""
    if n == 0:
        return None
    p = wins / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


# ----------------------------------------------------------------------------------------------
# The pairs: one request per generation, its order drawn from the seed


def as_text(prompt) -> str:
    """A chat prompt (the turns before the reply) as 'role: content' lines; text as it is."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{t['role']}: {t['content']}" for t in prompt)


def read_generations(path: Path) -> list[dict]:
    rows = []
    for line, raw in regular_lines(path):
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        try:
            row = parse_json(raw.decode("utf-8"), where)
        except UnicodeDecodeError:
            raise ValueError(f"{where}: not UTF-8") from None
        ok = isinstance(row, dict) and all(isinstance(row.get(k), str)
                                           for k in ("generation", "reference"))
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not ok or not (isinstance(prompt, str) or isinstance(prompt, list) and all(
                isinstance(t, dict) and {"role", "content"} <= set(t) for t in prompt)):
            raise ValueError(f"{where}: expected {{id, sample, prompt, generation, reference}} "
                             "as scripts/eval_checkpoint.py --generations writes")
        rows.append({**row, "where": where})
    if not rows:
        raise ValueError(f"{path}: no generations (file is empty)")
    return rows


def request(row: dict, args) -> dict:
    """The chat-completions body for one pair, and which position holds the generation."""
    if args.template == "tldr" and not isinstance(row["prompt"], str):
        raise ValueError(f"{row['where']}: --template tldr needs a text prompt (the post)")
    first = random.Random(f"{args.seed}/{row.get('id')}/{row.get('sample')}").random() < 0.5
    pair = (row["generation"], row["reference"])
    a, b = (pair if first else pair[::-1])
    text = TEMPLATES[args.template].format(x=as_text(row["prompt"]).strip(), a=a.strip(),
                                           b=b.strip())
    body = {"model": args.judge_model, "messages": [{"role": "user", "content": text}],
            "temperature": 0, "max_tokens": args.max_tokens}
    key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"key": key, "body": body, "generation_is": "A" if first else "B"}


# ----------------------------------------------------------------------------------------------
# Asking the judge


def ask(body: dict, args, api_key: str | None, stop: threading.Event) -> str | None:
    """The judge's reply text (None if it sent none); retried on what may pass, Fatal on what
    will not, Unanswered after --retries (or at once when `stop` is set: the run is ending)."""
    url = args.judge_url.rstrip("/")
    url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(args.retries + 1):
        if stop.is_set():
            raise Unanswered("stopped")
        wait = args.backoff * 2 ** attempt
        try:
            req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
            with urllib.request.urlopen(req, timeout=args.timeout) as r:
                reply = json.loads(r.read().decode("utf-8"))
            return reply["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            said = e.read().decode("utf-8", "replace")[:200]
            if e.code not in RETRIED:
                whose = f" (the key in ${args.key_env})" if e.code in (401, 403) else ""
                raise Fatal(f"--judge-url {url}: HTTP {e.code}{whose}: {' '.join(said.split())}")
            last = f"HTTP {e.code}"
            after = e.headers.get("Retry-After", "")
            wait = min(float(after), 60.0) if re.fullmatch(r"\d+(\.\d+)?", after) else wait
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        except (ValueError, KeyError, IndexError, TypeError):  # not chat-completions JSON
            last = "a reply that is not chat-completions JSON"
        if attempt < args.retries:
            stop.wait(wait)
    raise Unanswered(f"{last} after {args.retries + 1} tries")


def read_cache(path: Path) -> dict:
    """key -> cached judgment. A last line cut short (a kill mid-write) is dropped, so that its
    pair is asked again; any other bad line stops, naming it."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        print(f"{path}: its last line was cut short; dropped (its pair is asked again)",
              file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(cut)
    cache = {}
    for line, text in regular_lines(path):
        if text.strip():
            entry = parse_json(text.decode("utf-8"), f"{path}:{line}")
            if not isinstance(entry, dict) or "key" not in entry:
                raise ValueError(f"{path}:{line}: not a judgment (another file as --cache?)")
            cache[entry["key"]] = entry
    return cache


def judge(args) -> tuple[dict, int]:
    path = Path(args.generations)
    rows = read_generations(path)[:args.limit or None]
    cache_path = Path(args.cache or path.with_name(path.stem + ".judged.jsonl"))
    cache = read_cache(cache_path)
    pairs = [(row, request(row, args)) for row in rows]
    todo = [(row, req) for row, req in pairs if req["key"] not in cache]
    api_key = os.environ.get(args.key_env) or None
    if todo and not api_key:
        print(f"no key in ${args.key_env}: asking without one (a local server)", file=sys.stderr)
    print(f"{len(pairs)} pairs, {len(pairs) - len(todo)} judged before ({cache_path}), "
          f"asking about {len(todo)}", file=sys.stderr)
    failed, stop = [], threading.Event()
    with open(cache_path, "a", encoding="utf-8") as out, \
            concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        asked = {pool.submit(ask, req["body"], args, api_key, stop): (row, req)
                 for row, req in todo}
        try:
            for done in concurrent.futures.as_completed(asked):
                row, req = asked[done]
                try:
                    answer = done.result()
                except Unanswered as e:
                    failed.append(f"{row['where']}: {e}")
                    continue
                entry = {"key": req["key"], "id": row.get("id"), "sample": row.get("sample"),
                         "generation_is": req["generation_is"], "verdict": verdict(answer),
                         "answer": answer, "model": args.judge_model}
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                out.flush()  # each judgment is kept as it comes: a kill loses none before it
                cache[req["key"]] = entry
        except BaseException:  # Fatal, Ctrl-C: the requests in flight end, the rest never start
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    for line in failed:
        print(line, file=sys.stderr)
    return summary([(row, cache.get(req["key"])) for row, req in pairs], cache_path), len(failed)


def summary(judged: list[tuple[dict, dict | None]], cache_path: Path) -> dict:
    won = {}  # sample -> [wins, well-formed]
    wins = n = malformed = first = 0
    for row, entry in judged:
        if entry is None:
            continue
        if entry["verdict"] is None:
            malformed += 1
            continue
        win = entry["verdict"] == entry["generation_is"]
        wins, n, first = wins + win, n + 1, first + (entry["verdict"] == "A")
        w = won.setdefault(str(row.get("sample")), [0, 0])
        w[0], w[1] = w[0] + win, w[1] + 1
    return {"pairs": len(judged), "wins": wins, "losses": n - wins, "malformed": malformed,
            "failed": sum(e is None for _, e in judged),
            "win_rate": wins / n if n else None, "win_rate_ci95": wilson(wins, n),
            "interval": "Wilson score, over the well-formed verdicts (malformed left out)",
            "win_rate_by_sample": {s: w / m for s, (w, m) in won.items()},
            "first_position_chosen": first / n if n else None, "cache": str(cache_path)}


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="judge.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("generations", help="JSONL from scripts/eval_checkpoint.py --generations")
    p.add_argument("--template", required=True, choices=tuple(TEMPLATES),
                   help="tldr: the paper's TL;DR judge prompt; qa: the same for general QA")
    p.add_argument("--judge-url", required=True,
                   help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    p.add_argument("--judge-model", required=True, help="e.g. gpt-4-turbo (the paper's judge)")
    p.add_argument("--key-env", default="OPENAI_API_KEY",
                   help="the environment variable that holds the API key")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the order of A and B")
    p.add_argument("--cache", default=None,
                   help="judgments JSONL (default: <generations name>.judged.jsonl beside it)")
    p.add_argument("--limit", type=positive_int, default=None, help="the first N lines only")
    p.add_argument("--workers", type=positive_int, default=4, help="requests at a time")
    p.add_argument("--retries", type=non_negative_int, default=5)
    p.add_argument("--backoff", type=non_negative_float, default=2.0,
                   help="seconds before the first retry, doubled at each")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per request")
    p.add_argument("--max-tokens", type=positive_int, default=256,
                   help="the judge's answer (a sentence and the verdict)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)

    def body():
        try:
            res, failed = judge(args)
        except KeyboardInterrupt:
            raise ValueError("interrupted; every judgment that arrived is kept in the cache "
                             "(rerun to continue)") from None
        print(json.dumps(res, indent=1))
        if failed:
            raise ValueError(f"{failed} pairs got no answer (listed above; rerun to ask "
                             "them again: judged pairs are not asked twice)")
    script_main("judge.py", body)


if __name__ == "__main__":
    main()
