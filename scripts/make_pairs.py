"""DPO pairs from a checkpoint's own mistakes, for the built-in arithmetic task (or any data whose
responses end in '#### answer'): chosen = the reference y, rejected = one of the model's samples
whose final answer is wrong (data.extract_answer(sample) != the reference's).

    python scripts/make_pairs.py --init out/study/chain/warmup/checkpoint \\
        --data out/study/chain/data/train.jsonl --out out/study/chain/data/pairs.jsonl
    python train.py --init out/study/chain/warmup/checkpoint \\
        --data out/study/chain/data/pairs.jsonl --task arith --method dpo --out out/dpo

Each prompt is sampled up to --samples times; its first wrong, non-empty sample is the rejected
reply. Prompts that the model always answers right, or whose reference has no final answer, get
no pair (both counted). The pairs are text: `--method dpo` encodes them again.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from data import encode_rows, extract_answer, read_jsonl  # noqa: E402
from model import from_pretrained  # noqa: E402
from plumbing.checks import (EXPECTED, device_name, error_line, non_negative_float,  # noqa: E402
                             non_negative_int, out_file, positive_int)
from plumbing.tokenizer import load_tokenizer  # noqa: E402


def make_pairs(init, data, out, samples=4, temperature=1.0, seed=0, task="arith", batch_size=256,
               device="cpu") -> dict:
    """Write out (JSONL of {prompt or messages, chosen, rejected}); return what was counted."""
    tok = load_tokenizer(init)
    model = from_pretrained(init, device=device).eval()
    examples = read_jsonl(data)
    rows = encode_rows(examples, tok, task, model.config.block_size, need_ref=False)
    pending = [i for i, r in enumerate(rows) if r.answer is not None]
    rejected = {}
    for s in range(samples):  # each round samples again the prompts still without a pair
        if not pending:
            break
        texts = train.generate_answers(model, [rows[i] for i in pending], tok, batch_size,
                                       temperature=temperature,
                                       seed=train.seed_for(seed, "pairs", s))
        for i, text in zip(pending, texts):
            if text.strip() and extract_answer(text, boxed=rows[i].boxed) != rows[i].answer:
                rejected[i] = text
        pending = [i for i in pending if i not in rejected]
    lines = []
    for i in sorted(rejected):
        x = examples[i].prompt
        lines.append({"messages": x} if isinstance(x, list) else {"prompt": x})
        lines[-1].update(chosen=examples[i].response, rejected=rejected[i])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, out)
    return {"pairs": len(lines), "always_right": len(pending),
            "no_final_answer": sum(r.answer is None for r in rows)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="make_pairs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="checkpoint that samples the rejected replies")
    p.add_argument("--data", required=True, help="JSONL of the prompts and references")
    p.add_argument("--out", type=out_file, required=True, help="pairs JSONL to write")
    p.add_argument("--samples", type=positive_int, default=4, help="samples per prompt, at most")
    p.add_argument("--temperature", type=non_negative_float, default=1.0)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--task", default="arith", help="prompt template (data.TASKS)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="prompts per decode batch")
    p.add_argument("--device", type=device_name, default="cpu")
    a = p.parse_args(argv)
    try:
        print(json.dumps(make_pairs(a.init, a.data, a.out, a.samples, a.temperature, a.seed,
                                    a.task, a.batch_size, a.device)))
    except EXPECTED as e:  # DataError is a ValueError
        sys.exit(error_line(e).replace("error: ", "error: make_pairs.py: ", 1))


if __name__ == "__main__":
    main()
