"""Decoding: a token trie of the live strings (bidwords, codes) and beam search over it.

:class:`TokenTrie` holds the token ids of every live string; ``add``/``remove`` change it in place
(one inventory event = one call, effective for the next decoding step of any request). Reads never
iterate a dict another thread may be changing: ``list(children)`` is one C call under the GIL.

:func:`beam_search` decodes ``prompt → target <eos>`` with a KV cache. With a trie, a beam may only
take a child of its node or ``<eos>`` at a node that ends a live string (GENRE-style constrained
decoding, spec §1.1); the result is then filtered against the trie once more (the spec's pitfall:
beams must never leak out of the trie) so a string removed while a request was decoding is dropped
too. Without a trie it decodes freely (to measure how often the raw generator writes a real
bidword). ``should_stop`` is polled once per step: the serving side passes its deadline there (the
models package reads no clock).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

from models.rewrite.lm import FastLM


class DecodeAborted(RuntimeError):
    """``should_stop`` answered True during decoding (the caller's latency budget ran out)."""


class TokenTrie:
    """Token-id trie of live strings; a node is ``[children: dict[int, node], string | None]``."""

    def __init__(self) -> None:
        self.root: list = [{}, None]
        self.n = 0
        self.version = 0

    def add(self, ids: Sequence[int], value: str) -> bool:
        if not ids:
            return False
        node = self.root
        for t in ids:
            nxt = node[0].get(t)
            if nxt is None:
                nxt = [{}, None]
                node[0][t] = nxt
            node = nxt
        new = node[1] is None
        node[1] = value
        self.n += int(new)
        self.version += 1
        return new

    def remove(self, ids: Sequence[int]) -> bool:
        path = [self.root]
        for t in ids:
            nxt = path[-1][0].get(t)
            if nxt is None:
                return False
            path.append(nxt)
        if path[-1][1] is None:
            return False
        path[-1][1] = None
        self.n -= 1
        self.version += 1
        for i in range(len(ids) - 1, -1, -1):  # prune empty branches
            node = path[i + 1]
            if node[0] or node[1] is not None:
                break
            path[i][0].pop(ids[i], None)
        return True

    def find(self, ids: Sequence[int]) -> str | None:
        node = self.root
        for t in ids:
            node = node[0].get(t)
            if node is None:
                return None
        return node[1]

    def node(self, ids: Iterable[int]) -> list | None:
        node = self.root
        for t in ids:
            node = node[0].get(t)
            if node is None:
                return None
        return node

    def __len__(self) -> int:
        return self.n

    def strings(self) -> list[str]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node[1] is not None:
                out.append(node[1])
            stack.extend(list(node[0].values()))
        return sorted(out)


def beam_search(lm: FastLM, prompt: Sequence[int], *, eos_id: int, beams: int = 8, max_len: int = 16,
                trie: TokenTrie | None = None, banned: Sequence[int] = (),
                should_stop: Callable[[], bool] | None = None) -> list[tuple[tuple[int, ...], float]]:
    """Up to ``beams`` finished ``(target ids without <eos>, Σ log p incl. <eos>)``, best first."""
    prompt = list(prompt)[-(lm.max_pos - max_len - 1):]
    logits, cache = lm.forward(torch.tensor([prompt]), 0, None)
    logp = logits[:, -1].float().log_softmax(-1)
    pos = len(prompt)
    live: list[tuple[tuple[int, ...], float, list | None]] = [((), 0.0, trie.root if trie is not None else None)]
    finished: list[tuple[tuple[int, ...], float]] = []
    banned_t = torch.tensor(sorted(set(banned) - {eos_id}), dtype=torch.long) if banned else None
    for step in range(max_len + 1):
        if should_stop is not None and should_stop():
            raise DecodeAborted("decoding stopped by the caller's budget")
        cands: list[tuple[float, int, int]] = []  # (score, beam, token)
        for i, (ids, score, node) in enumerate(live):
            row = logp[i]
            if trie is not None:
                allowed = list(node[0])
                if node[1] is not None:
                    allowed.append(eos_id)
                if step == max_len:
                    allowed = [eos_id] if node[1] is not None else []
                if not allowed:
                    continue
                vals = row[torch.tensor(allowed)]
                k = min(beams, len(allowed))
                top = torch.topk(vals, k)
                for v, j in zip(top.values.tolist(), top.indices.tolist()):
                    cands.append((score + v, i, allowed[j]))
            else:
                if step == max_len:
                    cands.append((score + float(row[eos_id]), i, eos_id))
                    continue
                if banned_t is not None:
                    row = row.clone()
                    row[banned_t] = -math.inf
                top = torch.topk(row, beams)
                for v, j in zip(top.values.tolist(), top.indices.tolist()):
                    if v > -math.inf:
                        cands.append((score + v, i, j))
        if not cands:
            break
        cands.sort(key=lambda c: -c[0])
        nxt: list[tuple[tuple[int, ...], float, list | None]] = []
        src: list[int] = []
        toks: list[int] = []
        for score, i, t in cands:
            if len(nxt) >= beams:
                break
            ids, _, node = live[i]
            if t == eos_id:
                if ids:
                    finished.append((ids, score))
                continue
            child = node[0].get(t) if node is not None else None
            if node is not None and child is None:
                continue  # removed meanwhile
            nxt.append((ids + (t,), score, child))
            src.append(i)
            toks.append(t)
        finished.sort(key=lambda f: -f[1])
        finished = finished[:beams]
        if not nxt or (len(finished) >= beams and nxt[0][1] < finished[-1][1]):
            break
        idx = torch.tensor(src)
        cache = FastLM.select(cache, idx)
        logits, cache = lm.forward(torch.tensor(toks).unsqueeze(1), pos, cache)
        logp = logits[:, -1].float().log_softmax(-1)
        pos += 1
        live = nxt
    finished.sort(key=lambda f: -f[1])
    if trie is not None:
        finished = [f for f in finished if trie.find(f[0]) is not None]
    return finished[:beams]
