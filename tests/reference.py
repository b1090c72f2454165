"""The plain forms that the training code's fast paths are tested against (not used by training).

masked_nll is Eq. 1/5/7's masked token-level negative log-likelihood from full logits; training
computes the same through model.chunked_nll, which never makes the full logits.
"""
import torch.nn.functional as F


def token_nll(logits, targets):
    """-log p(target) at every position, (B, T), in fp32."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return nll.view(targets.shape)


def masked_nll(logits, targets, mask, denom=None):
    """Token-level negative log-likelihood over the positions where mask is 1, from full logits.

    Reduced as sum(loss * mask) / max(sum(mask), 1), so an all-zero mask gives 0, not NaN.
    `denom` overrides the count: under gradient accumulation pass the token count of the whole
    global batch, so every token weighs the same whatever micro-batch it fell in.
    """
    nll = token_nll(logits, targets).flatten()
    mask = mask.flatten().to(nll.dtype)
    if denom is None:
        denom = mask.sum().clamp(min=1)
    return (nll * mask).sum() / denom
