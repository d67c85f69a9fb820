"""Scoring models that share modules as one: each shared computation once per request batch.

A family's sizes, its undistilled sizes, drop-bi and the teacher are built from two sets of weights. Sizes of one
family start with the same embedding and the same first layers until their patched blocks begin; every baseline
runs a prefix of the teacher's own layers. A `SharedScorer` answers lm-eval's log-likelihood requests for a group of
such models together: batch by batch, each model starts from the hidden states after the deepest prefix of layers it
shares with a model already run on that batch and computes only the rest, and the output head runs only at the
positions a request scores. `SharedLM` is lm-eval's own Hugging Face model with its log-likelihood core answered by
a scorer, so tokenization, the task's metrics and the kept items stay lm-eval's.

Each model gets the numbers it gets scored alone by the same code, bit for bit: the same modules run on the same
inputs (tests/test_shared_scoring.py checks it in float32, and checks both against lm-eval's own scoring).
A model's layer list is swapped for the length of its forward pass: score models that no other thread of the
process runs meanwhile (an evaluation has its own worker process).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from boomerang.arch import CausalLM, adapter_for
from boomerang.sharing import Replay, model_path, run_with_layers

Request = tuple[tuple[str, str], list[int], list[int]]
"""What lm-eval's HFLM hands its log-likelihood core: ((context, continuation) strings, context ids, continuation ids)."""

# ----------------------------------------------------------------------------- what a model runs, as a path


def _shared_depth(a: Sequence, b: Sequence) -> int:
    """Layers two paths share from the start (0 when their embeddings or settings differ)."""
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return max(0, k - 1)


@dataclass(frozen=True)
class Plan:
    """How a group of models is run on each batch, in order: where each starts and which states it leaves."""

    order: tuple[str, ...]
    resume: dict[str, int]
    """Layers a model takes from a state left by a model before it (0: it runs from its embeddings)."""
    last_use: dict[tuple, int]
    """For each state kept (a path prefix): the position in `order` of the last model that starts from it."""
    lengths: dict[str, int]
    """Layers of each model."""

    @property
    def layers_run(self) -> int:
        """Layer calls per batch for the whole group (see `layers_alone` for one model at a time)."""
        return sum(self.lengths[k] - self.resume[k] for k in self.order)

    @property
    def layers_alone(self) -> int:
        return sum(self.lengths[k] for k in self.order)


def plan_group(paths: dict[str, list]) -> Plan:
    """Where each model of `paths` (in order) starts: after the deepest prefix it shares with a model before it."""
    order = tuple(paths)
    resume: dict[str, int] = {}
    last_use: dict[tuple, int] = {}
    for j, key in enumerate(order):
        depth = max((_shared_depth(paths[k], paths[key]) for k in order[:j]), default=0)
        resume[key] = depth
        if depth:
            last_use[tuple(paths[key][:depth + 1])] = j
    return Plan(order, resume, last_use, {k: len(p) - 1 for k, p in paths.items()})


# ----------------------------------------------------------------------------- running one model from a kept state


class _Tap(nn.Module):
    """A layer that also keeps its output for the models that start from it."""

    def __init__(self, layer: nn.Module, sink: dict, node: tuple):
        super().__init__()
        self.layer, self.sink, self.node = layer, sink, node

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        self.sink[self.node] = out
        return out


def _run(model: CausalLM, ids: torch.Tensor, keep: torch.Tensor, start, depth: int, taps: dict[int, tuple],
         sink: dict) -> torch.Tensor:
    """`model`'s logits (B, P, V) at positions `keep` (P,) of `ids` (B, T), its first `depth` layers replaced by
    `start` (their output), the outputs of the layers at `taps` (depth after the layer -> node) kept in `sink`."""
    layers = adapter_for(model).layer_list(model)
    run = [Replay(start) if i < depth else _Tap(layer, sink, taps[i + 1]) if i + 1 in taps else layer
           for i, layer in enumerate(layers)]
    return run_with_layers(model, run, input_ids=ids, use_cache=False, logits_to_keep=keep).logits


# ----------------------------------------------------------------------------- the scorer


class Stopped(Exception):
    """Raised by a scorer between batches when its `should_stop` says so."""


class SharedScorer:
    """Log-likelihoods of lm-eval requests for a group of models, computed together (see the module's docstring).

    The first model to ask about a list of requests has the whole group scored on it; the others' answers wait,
    each handed out once (`loglikelihoods`). `should_stop()` is asked between batches: a group's scoring can take
    minutes, and a cancel should not wait for it (`Stopped` is raised)."""

    def __init__(self, models: dict[str, CausalLM], *, batch_size: int = 8, should_stop=None):
        self.models = dict(models)
        self.batch_size = batch_size
        self.should_stop = should_stop
        paths = {k: model_path(m) for k, m in self.models.items()}
        self.plan = plan_group(paths)
        self._runs = {key: _model_run(paths[key], j, self.plan) for j, key in enumerate(self.plan.order)}
        self._answers: dict[tuple, dict[str, list[tuple[float, bool]]]] = {}

    def loglikelihoods(self, key: str, requests: Sequence[Request], max_length: int) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether it is the greedy continuation) per request, for
        model `key`, in the order of `requests`."""
        tokens = tuple((tuple(ctx), tuple(cont)) for _, ctx, cont in requests)
        waiting = self._answers.get(tokens)
        if waiting is None or key not in waiting:
            waiting = self._answers[tokens] = self._score(tokens, max_length)
        answers = waiting.pop(key)
        if not waiting:
            del self._answers[tokens]
        return answers

    @torch.no_grad()
    def _score(self, tokens: tuple, max_length: int) -> dict[str, list[tuple[float, bool]]]:
        rows, asks = _rows(tokens, max_length)
        out: dict[str, list] = {k: [None] * len(tokens) for k in self.plan.order}
        device = next(iter(self.models.values())).device
        by_length = sorted(range(len(rows)), key=lambda r: (-len(rows[r]), rows[r]))
        for b in range(0, len(by_length), self.batch_size):
            if self.should_stop and self.should_stop():
                raise Stopped
            chunk = by_length[b:b + self.batch_size]
            ids = torch.zeros(len(chunk), len(rows[chunk[0]]), dtype=torch.long)  # (B, T), right-padded with 0
            for i, r in enumerate(chunk):
                ids[i, :len(rows[r])] = torch.tensor(rows[r])
            wanted = sorted({p for r in chunk for req in asks[r] for p in range(req[1], req[2])})
            keep = torch.tensor(wanted, dtype=torch.long)
            column = {p: c for c, p in enumerate(wanted)}
            for key, logits in self._batch(ids.to(device), keep.to(device)):
                for i, r in enumerate(chunk):
                    logp = F.log_softmax(logits[i], dim=-1, dtype=torch.float32)  # (P, V)
                    for index, lo, hi, cont in asks[r]:
                        lp = logp[[column[p] for p in range(lo, hi)]]  # (C, V)
                        target = torch.tensor(cont, device=lp.device)
                        greedy = bool((lp.argmax(-1) == target).all())
                        out[key][index] = (float(lp.gather(-1, target[:, None]).sum()), greedy)
        return out

    def _batch(self, ids: torch.Tensor, keep: torch.Tensor):
        """(key, logits (B, P, V)) for every model of the group on one batch, in the plan's order."""
        kept: dict[tuple, object] = {}
        for j, key in enumerate(self.plan.order):
            start, depth, taps = self._runs[key]
            logits = _run(self.models[key], ids, keep, kept[start] if depth else None, depth, taps, kept)
            for node in [n for n in kept if self.plan.last_use.get(n, -1) <= j]:
                del kept[node]
            yield key, logits


def _model_run(path: list, j: int, plan: Plan) -> tuple[tuple, int, dict[int, tuple]]:
    """How the `j`-th model of `plan` runs on every batch: the state it starts from (a path prefix), the layers that
    state stands for, and the states it leaves for later models ({layers done: prefix})."""
    depth = plan.resume[plan.order[j]]
    nodes = [tuple(path[:d + 1]) for d in range(len(path))]
    taps = {d: nodes[d] for d in range(depth + 1, len(path)) if plan.last_use.get(nodes[d], -1) > j}
    return nodes[depth], depth, taps


def _rows(tokens: tuple, max_length: int) -> tuple[list[tuple[int, ...]], list[list[tuple[int, int, int, tuple]]]]:
    """The distinct model inputs the requests need (context + continuation, less its last token, cut from the left
    to `max_length` as lm-eval does) and, per input, its requests: (request index, first and end position whose
    logits score the continuation, the continuation)."""
    rows: list[tuple[int, ...]] = []
    asks: list[list] = []
    where: dict[tuple, int] = {}
    for index, (ctx, cont) in enumerate(tokens):
        if not ctx or not cont or len(cont) > max_length:
            raise ValueError(f"request {index}: a context and a continuation of 1 to {max_length} tokens are needed")
        row = (ctx + cont)[-(max_length + 1):][:-1]
        r = where.setdefault(row, len(rows))
        if r == len(rows):
            rows.append(row)
            asks.append([])
        asks[r].append((index, len(row) - len(cont), len(row), cont))
    return rows, asks


# ----------------------------------------------------------------------------- lm-eval's model, answered by a scorer


def shared_lm(scorer: SharedScorer, key: str, tokenizer, *, batch_size: int):
    """lm-eval's HFLM for model `key` of `scorer`'s group: its log-likelihood requests (and rolling ones, which lm-eval
    turns into the same) are answered by the scorer; generation stays lm-eval's own."""
    return _shared_lm_class()(scorer, key, tokenizer, batch_size)


@functools.cache
def _shared_lm_class():
    from lm_eval.models.huggingface import HFLM  # lm-eval takes seconds to import

    class SharedLM(HFLM):
        def __init__(self, scorer: SharedScorer, key: str, tokenizer, batch_size: int):
            # log-likelihoods in float32 whatever the model runs in, as the scorer computes them
            super().__init__(pretrained=scorer.models[key], tokenizer=tokenizer, batch_size=batch_size,
                             softmax_dtype=torch.float32)
            self.scorer, self.key = scorer, key

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            return self.scorer.loglikelihoods(self.key, requests, self.max_length)

    return SharedLM
