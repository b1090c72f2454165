"""The numbers of the README's "Model families" table: for each tiny random-weight transformers
model of tests/conftest.py (every weight randomised), the max |logit difference| of our model
against transformers' in fp32 on 3 x 17 random tokens (fewer where a sliding window caps the
block), the same after our save_pretrained was loaded back by transformers, and whether the
batched greedy continuations of four mixed-length prompts equal transformers' one by one.

    python scripts/family_diffs.py
"""
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import conftest  # noqa: E402
from generate import generate  # noqa: E402
from model import from_pretrained, save_pretrained  # noqa: E402
from test_families import NEW, PROMPTS, hf_greedy, max_logit_diff  # noqa: E402


def main():
    from transformers import AutoModelForCausalLM
    names = [*conftest.FAMILIES, *conftest.NEW_FAMILIES]
    print("| fixture | load: max abs logit diff | saved, read by transformers | greedy equal |")
    print("|---|---|---|---|")
    for i, name in enumerate(names):
        torch.manual_seed(1234 + i)  # the seeds of conftest.hf_checkpoint
        hf = conftest.hf_model(name)
        with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as dst:
            hf.save_pretrained(src)
            ours = from_pretrained(src).eval()
            save_pretrained(ours, dst)
            back = AutoModelForCausalLM.from_pretrained(dst).eval()
            same = generate(ours, PROMPTS, NEW) == [hf_greedy(hf, p, NEW) for p in PROMPTS]
            print(f"| {name} | {max_logit_diff(ours, hf):.1e} | {max_logit_diff(ours, back):.1e} "
                  f"| {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
