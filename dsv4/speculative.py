"""Speculative decoding for one sequence: the preview's MTP layer, or the 0731-style DSpark draft.

`speculative_events` picks what the checkpoint has. Both keep the output exactly the target's: greedy
keeps a draft iff it is the target's argmax, sampling keeps d ~ q with probability min(1, p(d)/q(d)) and
otherwise draws from the residual max(0, p - q) (speculative rejection sampling).

DSpark: the draft proposes B tokens after the anchor (the target's last sampled token); the target runs
once on [anchor, d_0 .. d_{B-1}], the longest accepted prefix is kept plus one token of the target's
own (a correction, or a bonus when all B pass), and `SeqState.rollback` forgets the rest (the target's
window, compressor and indexer rows, and the draft's context rings, which that step also wrote).

MTP:

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
from functools import partial

import torch

from .generate import Event, Sequence


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution to draw from after rejecting a draft from q: max(0, p - q), normalised."""
    r = (p - q).clamp(min=0)
    total = float(r.sum())
    return r / total if total > 0 else p


def accept_probability(p: torch.Tensor, q: torch.Tensor, d: int) -> float:
    """The chance to keep a draft d drawn from q when the target's distribution is p: min(1, p(d)/q(d))."""
    return min(1.0, float(p[d] / q[d]))


def declined(engine) -> str | None:
    """Why speculative decoding would slow this engine down, or None when it pays.

    Measured on the V4-Flash-dimension slice (bench/bench_speculative.py, bench/results/speculative.md):
    a verify block of B + 1 tokens reads the union of its tokens' experts and the draft's stages read
    theirs too, so one round costs several decode steps. With every expert resident that is recovered at
    the accepted lengths the releases report (2.7-4); with experts behind the expert store under a RAM
    budget the extra expert reads are disk reads and no block length recovers them."""
    if getattr(engine.model, "store", None) is not None:
        return ("experts are served under a RAM budget (--max-ram): a verify block reads the union of its "
                "tokens' experts, measured slower than plain decoding; speculative='always' overrides")  # fmt: skip
    return None


@torch.inference_mode()
def speculative_events(engine, seq: Sequence) -> Iterator[Event]:
    """The checkpoint's own draft: DSpark when it has one, else the MTP layer."""
    try:
        if engine.model.dspark is not None:
            yield from dspark_events(engine, seq)
        else:
            yield from mtp_events(engine, seq)
    finally:
        engine.note_speculation(seq.stats)


def dspark_events(engine, seq: Sequence) -> Iterator[Event]:
    model, state, sampler = engine.model, seq.state, seq.sampler
    check_rollback_room(model, state)
    last = engine.step([seq.pending], [state])[0][-1]  # the prompt; its captures fill the draft's rings
    ev = seq.append(sampler.sample(last), last)
    yield ev
    while ev.finish_reason is None:
        tok = seq.pending[0]
        drafts, qs = propose(model, seq)
        logits = engine.step([[tok, *drafts]], [state], all_logits=True)[0]  # [B + 1, V]: row i checks d_i
        events = settle(seq, drafts, qs, logits)
        yield from events
        ev = events[-1]


def check_rollback_room(model, state) -> None:
    b = model.dspark.block_size
    if state.max_rollback < b + 1:
        raise ValueError(f"DSpark blocks of {b} need states that can roll back {b + 1} tokens (max_rollback {state.max_rollback})")  # fmt: skip


def propose(model, seq: Sequence) -> tuple[list[int], list[torch.Tensor]]:
    """The DSpark block after a decoding sequence (anchor: its last sampled token, not yet fed) and the
    distribution each draft was drawn from."""
    qs: list[torch.Tensor] = []
    drafts = model.dspark_draft(seq.state, seq.pending[0], partial(_pick, seq.sampler, qs)).tokens
    return drafts, qs


def settle(seq: Sequence, drafts: list[int], qs: list[torch.Tensor], logits: torch.Tensor) -> list[Event]:
    """After the target ran on [anchor, *drafts] (logits [B + 1, V], row i checks d_i): keep the longest
    accepted prefix and one token of the target's own (a correction, or a bonus when all pass), roll the
    state back past the rest, and return the events. The sequence's stats count the round."""
    sampler, state, b = seq.sampler, seq.state, len(drafts)
    seq.stats.draft_tokens += b
    seq.stats.draft_rounds += 1
    events, kept, new = [], 0, None
    for i, d in enumerate(drafts):
        p = sampler.probs(logits[i])
        if sampler.params.greedy:
            ok = int(p.argmax()) == d
        else:
            ok = sampler.uniform() < accept_probability(p, qs[i], d)
        if not ok:
            new = int(p.argmax()) if sampler.params.greedy else sampler.draw(residual(p, qs[i]))
            break
        seq.stats.accepted_tokens += 1
        kept += 1
        events.append(seq.append(d, logits[i]))
        if events[-1].finish_reason is not None:
            state.rollback(b - kept + 1)  # the state keeps what plain decoding would: not the last token
            return events
    if new is None:  # every draft passed: the target's bonus token
        new = sampler.sample(logits[b])
    state.rollback(b - kept)  # keep the anchor and the accepted drafts
    events.append(seq.append(new, logits[kept]))
    return events


def _pick(sampler, qs: list[torch.Tensor], row: torch.Tensor) -> int:
    """Choose a draft from its logits row as the sampler would (argmax when greedy); remember q."""
    q = sampler.probs(row)
    qs.append(q)
    return int(q.argmax()) if sampler.params.greedy else sampler.draw(q)


def mtp_events(engine, seq: Sequence) -> Iterator[Event]:
    model, state, sampler = engine.model, seq.state, seq.sampler
    if not model.mtp:
        raise ValueError("speculative decoding needs the checkpoint's MTP layer or DSpark draft (no mtp.* tensors found)")
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
        seq.stats.draft_rounds += 1
        if sampler.params.greedy:
            keep = int(p.argmax()) == d
        else:
            keep = sampler.uniform() < accept_probability(p, q, d)
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
