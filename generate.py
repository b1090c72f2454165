"""Hand-written KV-cache sampling and the offline builders that are decode loops.

generate():  batched prompts of different lengths, greedy / temperature / top-k / top-p,
             stop at eos.
bash_mix():  Batch-Scheduled Sampling's mixed responses (Eq. 4), a decode loop with a coin per step.
rac_labels(): Reference-Answer-based Correction's labels (Eq. 6): sample z, then one teacher-forced
             pass over f(x, y) ++ z.

    python generate.py --init DIR --prompt "Once upon a time" --max-new-tokens 50
"""
import argparse
import codecs
import sys

import torch

from model import GPT, KVCache
from plumbing.checks import (EXPECTED, check_memory, device_name, error_line,
                             non_negative_float, non_negative_int, positive_int, ranged)
from plumbing.decode_step import fixed_step
from plumbing.device import autocast, compute_dtype, decode_bytes, label_rows, packed_linears


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token per row from logits (B, vocab). temperature 0 is greedy. The logits are shifted
    so their largest is 0 before dividing: no temperature, however small (1e-45), overflows, and
    one that small samples the argmax, its limit."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits, ids = (logits - logits.amax(dim=-1, keepdim=True)) / temperature, None
    # work on the k best only: sorted, and far cheaper than the whole vocabulary
    if top_k is not None:
        logits, ids = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
    elif top_p is not None:
        logits, ids = torch.sort(logits, dim=-1, descending=True)
    if top_p is not None:  # keep the smallest prefix of the sorted tokens whose mass reaches top_p
        probs = logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p
        outside[..., 0] = False  # the most likely token always stays
        logits = logits.masked_fill(outside, float("-inf"))
    probs = logits.softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) is a draw from p (no CPU sync, unlike multinomial)
    choice = (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(dim=-1)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def seeded(seed: int | None, device) -> torch.Generator | None:
    """A generator of its own for one call (nanochat's habit): the same seed, the same samples."""
    return torch.Generator(device).manual_seed(seed) if seed is not None else None


def left_pad(prompts, S, device):
    """Left-pad token lists into one batch whose rows end together, in a window of S columns.

    Returns idx (B, P); pos (B, S), each column's position, 0 at a row's first real token;
    real (B, S), which columns hold real tokens; mask (B, 1, P, P), what each of the P prompt
    columns may read: causal over real tokens, and a padding column itself, so no softmax row
    is empty.
    """
    P = max(len(p) for p in prompts)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
    cols = torch.arange(S, device=device)
    real = cols[None, :] >= pad[:, None]
    pos = (cols[None, :] - pad[:, None]).clamp(min=0)
    causal = cols[:P, None] >= cols[None, :P]
    mask = ((causal[None] & real[:, None, :P])
            | torch.eye(P, dtype=torch.bool, device=device)[None])
    return idx, pos, real, mask[:, None]


@torch.no_grad()
def decode(model: GPT, prompts: list[list[int]], steps: int, pick, need_logits=None):
    """The decode loop shared by generate, bash_mix and SCS.

    Prompts are left-padded into one batch; each row's positions start at 0 at its first real
    token, and a mask hides the padding columns. One prefill, then one step per token for the
    whole batch: pick(t, logits) returns (tokens to feed (B,), done (B,) bool). logits are
    (B, vocab), or only those of the rows need_logits(t) lists (indices): the head is not run for
    the others. Stops after `steps` steps or when every row is done (the step's one wait on the
    device), in the caller's precision (autocast). Returns the fed tokens, (B, steps run).
    """
    assert prompts and all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
    device = model.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S = P + steps
    if S > model.config.block_size:
        raise ValueError(f"prompt ({P}) + new tokens ({steps}) exceed the model's block_size "
                         f"{model.config.block_size}")
    idx, pos, real, mask = left_pad(prompts, S, device)
    out = torch.zeros(B, steps, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    with packed_linears(model, B):  # the packing: CPU speed only
        cache = KVCache(model.config, B, S, device, compute_dtype(model))
        h = model.hidden(idx, pos=pos[:, :P], mask=mask, cache=cache)[:, -1]  # the prefill
        step = fixed_step(model, cache, pos, real)  # --compile-decode's step, else None
        for t in range(steps):
            last = h if need_logits is None else h[need_logits(t)]
            tok, finished = pick(t, model.lm_head(last))
            out[:, t] = tok
            done |= finished
            if t == steps - 1 or bool(done.all()):
                return out[:, :t + 1]
            c = P + t  # the column this token is written at: it reads the real ones up to it
            h = model.hidden(tok[:, None], pos=pos[:, c:c + 1], mask=real[:, None, None, :c + 1],
                             cache=cache)[:, -1] if step is None else step(tok)
    return out


def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None,
             seed=None) -> list[list[int]]:
    """Each prompt's new tokens, up to and including eos_id when a row produces it."""
    device = model.device
    gen = seeded(seed, device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)

    def pick(t, logits):
        tok = sample(logits, temperature, top_k, top_p, gen)
        stop = tok == eos_id if eos_id is not None else torch.zeros_like(finished)
        return tok, stop

    out = decode(model, prompts, max_new_tokens, pick).tolist()
    rows = []
    for toks in out:
        if eos_id is not None and eos_id in toks:
            toks = toks[:toks.index(eos_id) + 1]
        rows.append(toks)
    return rows


# ----------------------------------------------------------------------------------------------
# Offline builders (Algorithms 1 and 2, step 7): decode loops over the same KV cache


def bash_mix(model, prompts, responses, beta=0.2, temperature=1.0, seed=None):
    """Batch-Scheduled Sampling's mixed responses ŷ, one per (x, y), each the length of y.

    Step j feeds the mixed prefix x ++ ŷ^<j, samples z^j ~ p(·|x, ŷ^<j) and keeps
    ŷ^j = z^j with probability beta, else ŷ^j = y^j (Eq. 4). It is sequential: every sample is
    conditioned on the tokens mixed before it, so it is a decode loop, one step per reference token.
    The coins are drawn first, so the head and the sampler run only for the rows whose coin takes
    the model's token. Returns (ŷ, took): took[i][j] is True where ŷ^j is the model's token.
    """
    device = model.device
    gen = seeded(seed, device)
    lengths = torch.tensor([len(y) for y in responses], device=device)
    L = int(lengths.max())
    ys = torch.tensor([y + [0] * (L - len(y)) for y in responses], device=device)
    took = torch.rand(len(prompts), L, generator=gen, device=device) < beta  # Eq. 4's coins
    # step t's rows with took[:, t], as indices: column t of rows, its first counts[t] entries
    counts, rows = took.sum(0).tolist(), (~took).byte().sort(dim=0, stable=True)[1]

    def pick(t, logits):  # logits of the rows with took[:, t] only: the others need no z^j
        y_hat = ys[:, t].clone()
        y_hat[rows[:counts[t], t]] = sample(logits, temperature, generator=gen)  # Eq. 4: z^j or y^j
        return y_hat, t >= lengths - 1

    mixed = decode(model, prompts, L, pick, need_logits=lambda t: rows[:counts[t], t]).tolist()
    took = took.tolist()
    return ([m[:len(y)] for m, y in zip(mixed, responses)],
            [k[:len(y)] for k, y in zip(took, responses)])


@torch.no_grad()
def rac_labels(model, prompts, ref_prompts, max_new_tokens, temperature=1.0, seed=None,
               eos_id=None):
    """Reference-Answer-based Correction's data (Eq. 6): z ~ p(·|x), then
    z̄^j = argmax p(·|f(x,y), z^<j).

    z is sampled until eos_id or max_new_tokens. The labels need one teacher-forced pass over the
    token ids f(x,y) ++ z[:-1]: the position that has read f(x,y) ++ z^<j predicts z̄^j. The ids
    are concatenated, never decoded to text and re-encoded. Returns (z, z̄, differs) with
    differs^j = 1(z̄^j != z^j), the positions Eq. 7 trains on.
    """
    block = model.config.block_size
    if any(len(f) >= block for f in ref_prompts):  # checked before sampling, which would be wasted
        raise ValueError(f"a reference prompt leaves no room for a label in the model's "
                         f"block_size {block}")
    z = generate(model, prompts, max_new_tokens, temperature=temperature, eos_id=eos_id, seed=seed)
    # a label needs f(x,y) ++ z^<j in the window
    z = [zi[:block - len(f) + 1] for zi, f in zip(z, ref_prompts)]
    device, cfg = model.device, model.config
    seqs = [f + zi[:-1] for f, zi in zip(ref_prompts, z)]
    n, T = max(len(zi) for zi in z), max(len(s) for s in seqs)
    # left padding lines every row's z up at the right end: only the last n positions need the head
    idx, pos, _, attn_mask = left_pad(seqs, T, device)
    step = label_rows(cfg, n, T)  # rows at a time, so that their logits fit in memory
    best = []
    with packed_linears(model, min(step, len(seqs)) * T):
        for k in range(0, len(seqs), step):
            rows = slice(k, k + step)
            h = model.hidden(idx[rows], pos=pos[rows], mask=attn_mask[rows])[:, -n:]
            best += model.lm_head(h).argmax(dim=-1).tolist()
    zbar = [b[n - len(zi):] for b, zi in zip(best, z)]
    # Eq. 7 trains only where the label differs from the sample: 1(z̄^j != z^j)
    differs = [[int(a != b) for a, b in zip(zb, zi)] for zb, zi in zip(zbar, z)]
    return z, zbar, differs


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from a checkpoint (Hugging Face layout: "
                                            "config.json + model.safetensors, as train.py writes "
                                            "or transformers saves).")
    p.add_argument("--init", required=True, help="checkpoint directory")
    p.add_argument("--prompt", default="",
                   help="prompt text (empty: start from the end-of-text token)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--num-samples", type=positive_int, default=1,
                   help="samples drawn as one batch; one sample is streamed")
    p.add_argument("--max-new-tokens", type=positive_int, default=100)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=ranged(float, above=0, hi=1), default=None,
                   help="sample among the smallest set of mass >= p, in (0, 1]")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="seed for reproducible samples")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto = bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--compile-decode", action="store_true", help="torch.compile the decode step")
    args = p.parse_args(argv)
    try:
        with autocast(torch.device(args.device), args.precision):  # what decoding computes in
            sample_command(args)
    except EXPECTED as e:
        sys.exit(error_line(e))


def sample_command(args):
    from model import from_pretrained
    from plumbing.chat_templates import render_chat
    from plumbing.device import allow_tf32
    from plumbing.tokenizer import check_vocab, load_tokenizer, with_bos

    allow_tf32(args.device)
    tok = load_tokenizer(args.init)
    model = from_pretrained(args.init, device=args.device).eval()
    model.compile_decode = args.compile_decode  # plumbing/decode_step.py
    check_vocab(tok, model.config.vocab_size, args.init)
    if args.chat:
        ids = with_bos(render_chat([{"role": "user", "content": args.prompt}], tok), tok)
    else:  # the beginning-of-text token the model was pretrained with, where it has one
        ids = with_bos(tok.encode(args.prompt), tok) or [tok.eos_id]
    room = model.config.block_size - len(ids)
    if room < 1:
        raise ValueError(f"--prompt: {len(ids)} tokens fill the model's context of "
                         f"{model.config.block_size} (shorten it)")
    if args.max_new_tokens > room:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: the prompt's {len(ids)} tokens "
                         f"leave room for {room} in the model's context of "
                         f"{model.config.block_size} (ask for at most {room})")
    check_memory(decode_bytes(model, args.num_samples, len(ids) + args.max_new_tokens),
                 f"--num-samples {args.num_samples}: decoding them as one batch", args.device,
                 "ask for fewer samples")
    prompts = [ids] * args.num_samples
    if args.num_samples > 1:
        rows = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k,
                        args.top_p, tok.eos_id, args.seed)
        for i, row in enumerate(rows):
            print(f"--- sample {i + 1}\n{args.prompt}"
                  f"{tok.decode([t for t in row if t != tok.eos_id])}")
        return
    # one sample, streamed: bytes go through an incremental UTF-8 decoder, since a character can
    # span several tokens
    gen = seeded(args.seed, args.device)
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def pick(t, logits):
        nxt = sample(logits, args.temperature, args.top_k, args.top_p, gen)
        if (i := nxt.item()) != tok.eos_id:  # the token is printed: one wait per step anyway
            sys.stdout.write(text.decode(tok.enc.decode_single_token_bytes(i)))
            sys.stdout.flush()
        return nxt, nxt == tok.eos_id

    print(args.prompt, end="", flush=True)
    decode(model, prompts, args.max_new_tokens, pick)
    print(text.decode(b"", final=True))


if __name__ == "__main__":
    main()
