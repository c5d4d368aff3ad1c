"""MTP speculative decoding for one sequence.

The checkpoint's MTP block drafts the token after next from the main model's last streams; the main
model then checks the draft and its own next token in one two-token step. Greedy: a draft is kept
iff it is the main model's argmax, so the output is exactly plain greedy decoding. Sampling: the
draft d ~ q is kept with probability min(1, p(d)/q(d)), else a token is drawn from the residual
max(0, p - q), which leaves the output distribution the main model's (speculative rejection
sampling). A rejected draft is forgotten with `SeqState.rollback(1)`: the step's first position (the
token before the draft) stays in the state, and its streams feed the next draft.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .generate import Event, Sequence


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution to draw from after rejecting a draft from q: max(0, p - q), normalised."""
    r = (p - q).clamp(min=0)
    total = float(r.sum())
    return r / total if total > 0 else p


@torch.inference_mode()
def speculative_events(engine, seq: Sequence) -> Iterator[Event]:
    model, state, sampler = engine.model, seq.state, seq.sampler
    if not model.mtp:
        raise ValueError("speculative decoding needs the checkpoint's MTP layer (no mtp.* tensors found)")
    ids = seq.pending
    batch = model.make_batch([ids], [state])
    h = model(batch, [state])
    last = model.logits_from(h[-1:])[0]
    tok = sampler.sample(last)
    ev = seq.append(tok, last)
    yield ev
    # the MTP block sees (streams at t, token t+1) for every prompt position, then drafts
    draft_logits = model.mtp_logits(h, torch.tensor(ids[1:] + [tok]), batch, [state])[-1]
    while ev.finish_reason is None:
        q = sampler.probs(draft_logits)
        d = int(q.argmax()) if sampler.params.greedy else sampler.draw(q)
        batch = model.make_batch([[tok, d]], [state])
        h = model(batch, [state])
        logits = model.logits_from(h)
        p = sampler.probs(logits[0])
        seq.stats.draft_tokens += 1
        if sampler.params.greedy:
            keep = int(p.argmax()) == d
        else:
            keep = sampler.uniform() < min(1.0, float(p[d] / q[d]))
        if keep:
            seq.stats.accepted_tokens += 1
            ev = seq.append(d, logits[0])
            yield ev
            if ev.finish_reason is not None:
                return
            tok = sampler.sample(logits[1])
            ev = seq.append(tok, logits[1])
            yield ev
            draft_logits = model.mtp_logits(h, torch.tensor([d, tok]), batch, [state])[-1]
            continue
        state.rollback(1)  # forget the draft; the token before it stays, with its streams h[0]
        new = int(p.argmax()) if sampler.params.greedy else sampler.draw(residual(p, q))
        ev = seq.append(new, logits[0])
        yield ev
        if ev.finish_reason is not None:
            return
        tok = new
        draft_logits = model.mtp_logits(h[:1], torch.tensor([tok]), batch.first_token(), [state])[-1]
