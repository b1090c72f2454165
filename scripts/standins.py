"""Tiny stand-ins of the paper's data sets, in the shapes they are published in, and a stand-in
judge: to run docs/reproduce.md's commands end to end on a CPU before renting a GPU.

    python scripts/standins.py write downloads/      # the files, as their downloads name them
    python scripts/standins.py judge --port 8765     # an OpenAI-compatible judge on 127.0.0.1

`write` makes, from a fixed seed: gsm8k/{train,test}.jsonl ({question, answer}), the MATH
release's folders MATH/{train,test}/<subject>/<n>.json ({problem, level, type, solution}),
tldr/{train,valid,test}.jsonl (OpenAI's TL;DR SFT rows {id, subreddit, title, post, summary}),
ultrachat/{train_sft,test_sft}.jsonl ({prompt, prompt_id, messages}), alpaca_eval.json (a list
of {instruction, output, generator, dataset}) and ultrafeedback/train_prefs.jsonl ({prompt,
prompt_id, chosen, rejected, messages, score_chosen, score_rejected}). The contents are toy
arithmetic and toy posts: their shapes are the point, not their meaning.

`judge` answers chat-completions requests in judge.py's format ("Preferred: A" or "B") by a
rule, not a model: it prefers the answer with more words in common with the prompt. It is not a
measurement of anything; it only lets judge.py's command run without the internet.
"""
import argparse
import json
import random
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SUBJECTS = ("algebra", "prealgebra")
SUBREDDITS = ("cats", "cooking", "running")


def jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write(root: Path, n: int, seed: int):
    rng = random.Random(seed)
    for split, size in (("train", n), ("test", max(4, n // 4))):
        gsm, math = [], []
        for i in range(size):
            a, b = rng.randint(2, 40), rng.randint(2, 9)
            gsm.append({"question": f"Ann has {a} pens and buys {b} boxes of 2. How many pens?",
                        "answer": f"{b}*2=<<{b}*2={2 * b}>>{2 * b}\n{a}+{2 * b}={a + 2 * b}\n"
                                  f"#### {a + 2 * b}"})
            math.append({"problem": f"What is $\\frac{{{a}}}{{{b}}} + 1$?", "level": "Level 1",
                         "type": SUBJECTS[i % 2].title(),
                         "solution": f"$\\frac{{{a}}}{{{b}}}+1=\\frac{{{a + b}}}{{{b}}}$, so "
                                     f"the answer is $\\boxed{{\\frac{{{a + b}}}{{{b}}}}}$."})
        jsonl(root / "gsm8k" / f"{split}.jsonl", gsm)
        for i, p in enumerate(math):
            path = root / "MATH" / split / SUBJECTS[i % 2] / f"{i}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(p, indent=4))
    for split, size in (("train", n), ("valid", max(4, n // 4)), ("test", max(4, n // 4))):
        posts = []
        for i in range(size):
            sub, k = SUBREDDITS[i % 3], rng.randint(2, 9)
            posts.append({"id": f"t3_{split}{i}", "subreddit": sub, "title": f"{k} questions",
                          "post": f"I have {k} questions about {sub}. The first is about "
                                  f"time, the second about money.",
                          "summary": f" {k} questions about {sub}, time and money"})
        jsonl(root / "tldr" / f"{split}.jsonl", posts)
    for split, size in (("train_sft", n), ("test_sft", max(4, n // 4))):
        convs = []
        for i in range(size):
            a, b = rng.randint(2, 50), rng.randint(2, 50)
            turns = [{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                     {"role": "user", "content": "And doubled?"},
                     {"role": "assistant", "content": f"Doubled, it is {2 * (a + b)}."}]
            convs.append({"prompt": turns[0]["content"], "prompt_id": f"{split}{i:04d}",
                          "messages": turns})
        jsonl(root / "ultrachat" / f"{split}.jsonl", convs)
    (root / "alpaca_eval.json").write_text(json.dumps([
        {"instruction": f"Name {k} colours.", "output": ", ".join(["red", "blue", "green",
                                                                    "gold"][:k]) + ".",
         "generator": "gpt4_turbo", "dataset": "helpful_base"} for k in (1, 2, 3, 4)], indent=4))
    prefs = []
    for i in range(n):
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        ask = {"role": "user", "content": f"What is {a} times {b}?"}
        good, bad = f"{a} times {b} is {a * b}.", f"{a} times {b} is {a * b + 1}."
        prefs.append({"prompt": ask["content"], "prompt_id": f"p{i}", "score_chosen": 9.0,
                      "score_rejected": 2.0,
                      "chosen": [ask, {"role": "assistant", "content": good}],
                      "rejected": [ask, {"role": "assistant", "content": bad}],
                      "messages": [ask, {"role": "assistant", "content": good}]})
    jsonl(root / "ultrafeedback" / "train_prefs.jsonl", prefs)
    print(f"wrote the stand-ins under {root}")


PAIR = re.compile(r"\[(?:post|query)\]\n(.*?)\n\n\[(?:summary|response) A\]\n(.*?)\n\n"
                  r"\[(?:summary|response) B\]\n(.*?)\n\nInstructions:", re.S)


class StandInJudge(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        x, a, b = PAIR.search(body["messages"][-1]["content"]).groups()
        words = set(re.findall(r"\w+", x.lower()))
        overlap = [len(words & set(re.findall(r"\w+", t.lower()))) for t in (a, b)]
        letter = "A" if overlap[0] >= overlap[1] else "B"
        said = f"Comparison: {letter} shares more words with the prompt.\nPreferred: {letter}"
        raw = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                               "content": said}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


def main(argv=None):
    p = argparse.ArgumentParser(prog="standins.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the stand-in files")
    w.add_argument("root", type=Path)
    w.add_argument("--rows", type=int, default=32, help="training rows of each data set")
    w.add_argument("--seed", type=int, default=0)
    j = sub.add_parser("judge", help="serve the stand-in judge on 127.0.0.1 until stopped")
    j.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)
    if args.command == "write":
        write(args.root, args.rows, args.seed)
    else:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), StandInJudge)
        print(f"stand-in judge at http://127.0.0.1:{args.port}/v1 (Ctrl-C stops it)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
