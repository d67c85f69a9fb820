"""Decoding many sequences of a family's sizes at once: each step, every shared layer is one call for all of them.

A `Decoder` holds rows (one sequence each, any size of the family, each with its own prompt length, decoding
settings and token limit). `add` runs a row's prompt (its prefill; `add_many`: the prompts of rows of one size as one batch) and gives it its
first token; `step` makes
the next token of every row: rows join and leave between steps (continuous batching), none waits for a batch to end.

One step runs each size's model forward only to its first layer, to take what transformers computes there (the
embeddings, the attention masks per layer type, the rotary embeddings for each row's own position); then the layers
in one order that respects every size's own (`union_order`): a layer that several sizes run, a student layer below
their patched blocks or a patched teacher block, is called once on the rows of all of them; then each size's final
norm and head. A row's keys and values are its own (a row's length is its own), padded on the left for the call.

Numbers: a row gets the logits its model gives it decoding alone with a cache, up to float rounding
(tests/test_decoding.py checks every supported architecture, rows of several sizes joining at different steps).
A decoder runs its models through shells of them (the models themselves are never changed): decoders in several
threads may share models, each decoder used from one thread.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from boomerang.arch import CausalLM, adapter_for
from boomerang.sharing import Replay, model_path, module_ids, run_with_layers


@dataclass(eq=False)
class DecodeRow:
    """One sequence being decoded, and where its tokens go.

    `on_token(token_id)` receives each new token (never an end-of-sequence token) and returns False to stop the row;
    `cancelled()` is asked before every step (a client that went away)."""

    model: CausalLM
    prompt: list[int]
    max_new_tokens: int
    on_token: Callable[[int], bool]
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int = 0
    cancelled: Callable[[], bool] = lambda: False
    eos: set[int] = field(default_factory=set)
    """Tokens that end the row (its model's end-of-sequence tokens; none: it goes on to max_new_tokens)."""
    generated: int = 0
    """Tokens made, the end-of-sequence token included."""
    finished: bool = False
    reason: str = "length"
    """Why the row ended: "stop" (end of sequence, or its consumer stopped it), "length", "cancelled", "error"."""
    kv: dict = field(default_factory=dict, repr=False)
    """Keys and values per layer step of its model's path: (1, H, room, D), the first `length` positions filled (the
    room grows by doubling, up to prompt + max_new_tokens)."""
    length: int = 0
    """Tokens in its cache."""
    last: int = 0
    """The token the next step reads."""
    generator: torch.Generator | None = field(default=None, repr=False)


class _Halt(Exception):
    """Ends a forward pass once the layers' inputs are taken."""


class _Take(nn.Module):
    """Stands for a layer: keeps the arguments the model hands it; the last one halts the forward pass."""

    def __init__(self, sink: dict, position: int, last: bool):
        super().__init__()
        self.sink, self.position, self.last = sink, position, last

    def forward(self, hidden, *args, **kwargs):
        if self.position == 0:
            self.sink["hidden"] = hidden
        self.sink[self.position] = (args, kwargs)
        if self.last:
            raise _Halt
        return hidden


class _StepCache(Cache):
    """The cache a step's forward passes see: it says every row holds `length` tokens (the step's padded width) and
    hands each layer call's keys and values to the decoder, which answers with every row's own, padded."""

    def __init__(self, n_layers: int, length: int, update: Callable):
        layers: list = [DynamicLayer() for _ in range(n_layers)]
        stand_in = torch.zeros(1).expand(1, 1, length, 1)  # (1, 1, T, 1): only its length is read
        for layer in layers:
            layer.keys = layer.values = stand_in
            layer.is_initialized = True
        super().__init__(layers=layers)
        self._update = update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self._update(key_states, value_states)


def union_order(paths: list[list]) -> list | None:
    """One order of every layer step of `paths` (each a model's steps, without its root) that keeps each path's own
    order; None when there is none. A step several paths hold comes once; ties go to the shallower step."""
    after: dict = {}
    before_count: dict = {}
    depth: dict = {}
    for path in paths:
        for i, step in enumerate(path):
            depth[step] = min(depth.get(step, i), i)
            before_count.setdefault(step, 0)
            after.setdefault(step, set())
        for a, b in zip(path, path[1:], strict=False):
            if b not in after[a]:
                after[a].add(b)
                before_count[b] += 1
    ready = [s for s, n in before_count.items() if n == 0]
    out = []
    while ready:
        ready.sort(key=lambda s: depth[s])
        step = ready.pop(0)
        out.append(step)
        for nxt in after[step]:
            before_count[nxt] -= 1
            if before_count[nxt] == 0:
                ready.append(nxt)
    return out if len(out) == len(before_count) else None


class _Model:
    """What the decoder knows of one model: its layers, its path, how its forward takes a cache, and a shell of it
    (the model and its base model copied shallowly: the same modules and weights) whose layer list a step swaps,
    so that the model itself is never changed and other threads may run it meanwhile (a server scoring a prompt,
    another chat)."""

    def __init__(self, model: CausalLM):
        self.source = model  # held, so that no other model takes its id while the decoder knows it by that id
        self.arch = adapter_for(model)
        self.model = copy.copy(model)
        self.model._modules = dict(model._modules)
        base = copy.copy(self.arch.base_model(model))
        base._modules = dict(base._modules)
        self.model._modules[self.arch.base] = base
        self.layers = self.arch.layer_list(model)
        path = model_path(model)
        self.steps = path[1:]  # a step: a layer's weights and its config entries at its position
        self.position = {step: i for i, step in enumerate(self.steps)}
        impl = str(getattr(model.config, "_attn_implementation", None))
        self.mask_format = {"sdpa": "bool", "eager": "float"}.get(impl)
        """How its layers take a 4D mask; None (flash attention, flex): its layers are not shared with another's."""
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.sink: dict = {}
        n = len(self.layers)
        self.takes = [_Take(self.sink, i, i == n - 1) for i in range(n)]
        # what runs after the layers: the final norm, the head, the model-level settings (a softcap, say)
        self.ends = (type(model).__name__, module_ids(getattr(base, self.arch.norm)), module_ids(self.arch.head_module(model)),
                     path[0][-1])


class Decoder:
    """Rows of any sizes decoded together, one token each per `step` (see the module's docstring)."""

    def __init__(self):
        self.rows: list[DecodeRow] = []
        self._models: dict[int, _Model] = {}
        self._orders: dict[frozenset, list[tuple]] = {}
        self._call: tuple[list, list[DecodeRow]] | None = None
        self.layer_calls = 0
        """Layer calls so far (each a call of one layer on every row that runs it)."""

    # ------------------------------------------------------------------------- rows in and out

    def add(self, row: DecodeRow) -> None:
        """Run the row's prompt alone, give it its first token; it decodes with the others from the next step."""
        self.add_many([row])

    @torch.no_grad()
    def add_many(self, rows: list[DecodeRow]) -> None:
        """`add` for several rows: the prompts of rows of one size run as one batch (left-padded)."""
        for group in _by_model(rows).values():
            self._prefill(group)

    def _prefill(self, rows: list[DecodeRow]) -> None:
        model = rows[0].model
        known = self._known(model)
        device = next(model.parameters()).device
        width = max(len(r.prompt) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, P), prompts right-aligned
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[j, width - len(row.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # each row's own positions from 0
        cache = DynamicCache()  # every layer keeps all its keys (a sliding layer's mask does the window)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=True, logits_to_keep=1, **{known.cache_arg: cache}).logits
        for j, row in enumerate(rows):
            row.length = len(row.prompt)
            if row.temperature > 0:
                row.generator = torch.Generator().manual_seed(row.seed)
            for i, step in enumerate(known.steps):
                layer: Any = cache.layers[i]
                kv = layer.keys[j:j + 1, :, width - row.length:], layer.values[j:j + 1, :, width - row.length:]
                row.kv[step] = _room(*kv, row.length, self._room_for(row))  # (1, H, P, D) each
            self._emit(row, self._pick(row, logits[j, -1]))
            if not row.finished:
                self.rows.append(row)

    def drop_finished(self) -> None:
        for row in self.rows:
            if not row.finished and row.cancelled():
                row.finished, row.reason = True, "cancelled"
        self.rows = [r for r in self.rows if not r.finished]

    # ------------------------------------------------------------------------- one step for every row

    @torch.no_grad()
    def step(self) -> None:
        """One new token for every live row."""
        self.drop_finished()
        if not self.rows:
            return
        groups = _by_model(self.rows)
        taken = {key: self._take(self._models[key], rows) for key, rows in groups.items()}
        hidden = {key: t["hidden"] for key, t in taken.items()}
        for step, using in self._order(groups):
            self._run_step(step, using, groups, taken, hidden)
        by_ends: dict[tuple, list[int]] = {}
        for key in groups:
            by_ends.setdefault(self._models[key].ends, []).append(key)
        for keys in by_ends.values():  # models with one final norm and head: one call for their rows
            rows = [r for key in keys for r in groups[key]]
            state = torch.cat([hidden[key] for key in keys]) if len(keys) > 1 else hidden[keys[0]]
            ids = torch.tensor([[r.last] for r in rows], device=state.device)
            logits = run_with_layers(self._models[keys[0]].model, [Replay(state)], input_ids=ids, use_cache=False,
                                     logits_to_keep=1).logits
            for j, row in enumerate(rows):
                row.length += 1
                self._emit(row, self._pick(row, logits[j, -1]))
        self.drop_finished()

    def _take(self, known: _Model, rows: list[DecodeRow]) -> dict:
        """The model's forward up to its first layer for `rows`: every layer position's arguments (masks as wide as
        the longest of these rows: a model's lone row is not padded)."""
        width = max(r.length for r in rows)
        sink = known.sink
        sink.clear()
        device = next(known.model.parameters()).device
        mask = torch.zeros(len(rows), width + 1, dtype=torch.long)  # (B, T + 1): each row's tokens, right-aligned
        for j, row in enumerate(rows):
            mask[j, width - row.length:] = 1
        ids = torch.tensor([[r.last] for r in rows])  # (B, 1)
        positions = torch.tensor([[r.length] for r in rows])  # (B, 1): each row's own position
        cache = _StepCache(len(known.layers), width, self._update)
        try:
            run_with_layers(known.model, known.takes, input_ids=ids.to(device),
                          attention_mask=mask.to(device), position_ids=positions.to(device), use_cache=True,
                          **{known.cache_arg: cache})
        except _Halt:
            pass
        # every argument by name (GPT-2 hands its mask on by position), so that models' rows can be joined by name
        named: dict[Any, Any] = {"hidden": sink["hidden"]}
        for i, layer in enumerate(known.layers):
            args, kwargs = sink[i]
            named[i] = {**dict(zip(_arg_names(layer), args, strict=False)), **kwargs}
        return named

    def _run_step(self, step, using: list[int], groups: dict, taken: dict, hidden: dict) -> None:
        """Call the layer of `step` once on the rows of every model in `using`."""
        rows = [r for key in using for r in groups[key]]
        parts = [taken[key][self._models[key].position[step]] for key in using]
        sizes = [len(groups[k]) for k in using]
        widths = [max(r.length for r in groups[k]) + 1 for k in using]
        first = self._models[using[0]]
        kwargs = _joined(parts, sizes, widths, (first.mask_format, hidden[using[0]].dtype))
        layer = first.layers[first.position[step]]
        x = torch.cat([hidden[key] for key in using]) if len(using) > 1 else hidden[using[0]]
        self._call = (step, rows)
        try:
            out = layer(x, **kwargs)
        finally:
            self._call = None
        self.layer_calls += 1
        state = out[0] if isinstance(out, tuple) else out
        start = 0
        for key in using:
            hidden[key] = state[start:start + len(groups[key])]
            start += len(groups[key])

    def _update(self, keys: torch.Tensor, values: torch.Tensor):
        """A layer call's new keys and values (B, H, 1, D): written after each row's own; all of them returned,
        each row's on the right of a (B, H, T + 1, D) tensor, T the longest row's length (the mask hides the left
        padding). A lone row's are its own buffers' views: nothing is copied."""
        assert self._call is not None, "a layer asked the step cache outside a decoder step"
        step, rows = self._call
        for j, row in enumerate(rows):
            k, v = row.kv[step]
            if row.length == k.shape[2]:  # its room is full: more, by doubling (up to what the row can make)
                k, v = row.kv[step] = _room(k, v, row.length, self._room_for(row))
            k[0, :, row.length] = keys[j, :, 0]
            v[0, :, row.length] = values[j, :, 0]
        if len(rows) == 1:
            k, v = rows[0].kv[step]
            return k[:, :, :rows[0].length + 1], v[:, :, :rows[0].length + 1]
        width = max(r.length for r in rows) + 1
        k_out = keys.new_zeros(keys.shape[0], keys.shape[1], width, keys.shape[3])
        v_out = values.new_zeros(values.shape[0], values.shape[1], width, values.shape[3])
        for j, row in enumerate(rows):
            k, v = row.kv[step]
            k_out[j, :, width - row.length - 1:] = k[0, :, :row.length + 1]
            v_out[j, :, width - row.length - 1:] = v[0, :, :row.length + 1]
        return k_out, v_out

    # ------------------------------------------------------------------------- bookkeeping

    @staticmethod
    def _room_for(row: DecodeRow) -> int:
        """Positions to hold a row's keys in: twice its length (at least 64 more), never more than it can make."""
        return min(len(row.prompt) + row.max_new_tokens, max(2 * row.length, row.length + 64))

    def _known(self, model: CausalLM) -> _Model:
        key = id(model)
        if key not in self._models:
            known = _Model(model)
            if len(set(known.steps)) != len(known.steps):
                raise ValueError("a model that runs one layer twice cannot be decoded by steps")
            self._models[key] = known
        return self._models[key]

    def _order(self, groups: dict) -> list[tuple]:
        """(layer step, the models whose rows it runs on) in the order a step calls them."""
        key = frozenset(groups)
        if key not in self._orders:
            shareable = all(self._models[k].mask_format for k in groups)
            order = union_order([self._models[k].steps for k in groups]) if shareable else None
            if order is None:  # no common order: each model's layers on its own rows
                self._orders[key] = [(s, [k]) for k in groups for s in self._models[k].steps]
            else:
                self._orders[key] = [(s, [k for k in groups if s in self._models[k].position]) for s in order]
        return self._orders[key]

    def _pick(self, row: DecodeRow, logits: torch.Tensor) -> int:
        """The next token from one row's logits (V,): greedy, or sampled with temperature and top_p."""
        if row.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / row.temperature, dim=-1)
        if row.top_p < 1:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < row.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=row.generator))

    def _emit(self, row: DecodeRow, token: int) -> None:
        row.generated += 1
        row.last = token
        if token in row.eos:
            row.finished, row.reason = True, "stop"
        elif not row.on_token(token):
            row.finished, row.reason = True, "stop"
        elif row.generated >= row.max_new_tokens:
            row.finished, row.reason = True, "length"


def _by_model(rows: list[DecodeRow]) -> dict[int, list[DecodeRow]]:
    """Rows grouped by their model (keyed by its id), in the order they come."""
    groups: dict[int, list[DecodeRow]] = {}
    for row in rows:
        groups.setdefault(id(row.model), []).append(row)
    return groups


@functools.cache
def _names(forward) -> tuple[str, ...]:
    return tuple(inspect.signature(forward).parameters)[2:]  # after self and the hidden states


def _arg_names(layer: nn.Module) -> tuple[str, ...]:
    """The names of a layer's positional arguments after its hidden states."""
    return _names(type(layer).forward)


def _room(keys: torch.Tensor, values: torch.Tensor, length: int, room: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New buffers (1, H, room, D) holding the first `length` positions of `keys` and `values`."""
    k = keys.new_zeros(*keys.shape[:2], room, keys.shape[3])
    v = values.new_zeros(*values.shape[:2], room, values.shape[3])
    k[:, :, :length] = keys[:, :, :length]
    v[:, :, :length] = values[:, :, :length]
    return k, v


def _joined(parts: list, sizes: list[int], widths: list[int], masks: tuple):
    """The arguments of several models' rows as one call's: tensors with their rows on dim 0 concatenated; the rest
    (flags, one cache) taken from the first. A missing mask next to a present one is filled in as 'all visible'."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, dict):
        return {k: _masks([p.get(k) for p in parts], sizes, widths, *masks) if k == "attention_mask"
                else _joined([p.get(k) for p in parts], sizes, widths, masks) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_joined([p[i] for p in parts], sizes, widths, masks) for i in range(len(first)))
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    if not tensors:
        return first
    if all(p.dim() > 1 and p.shape[0] == n for p, n in zip(parts, sizes, strict=True)):
        return torch.cat(parts)  # (B, ...) per model: rows on dim 0
    return first


def _masks(masks: list, sizes: list[int], widths: list[int], kind: str, dtype: torch.dtype):
    """Several models' attention masks (B, 1, 1, T + 1; each as wide as its model's longest row, or None where a
    model's rows need none) as one: each padded on the left, where no row has a token, to the widest. `kind` is
    how the attention takes a mask: "bool" (sdpa: True is seen) or "float" (eager: 0 is seen, added to scores)."""
    tensors = [m for m in masks if isinstance(m, torch.Tensor)]
    width = max(widths)
    if not tensors:
        if min(widths) == width:
            return masks[0]
        like = torch.zeros((), dtype=torch.bool if kind == "bool" else dtype).expand(1, 1, 1, width)
    else:
        like = tensors[0]
    visible, hidden = (True, False) if like.dtype == torch.bool else (0.0, torch.finfo(like.dtype).min)
    out = []
    for m, n, own in zip(masks, sizes, widths, strict=True):
        if m is None:  # no padding among these rows: all their keys are visible
            m = like.new_full((n, *like.shape[1:-1], own), visible)
        if m.dim() != 4:
            raise ValueError(f"a {m.dim()}-dimensional attention mask cannot be joined with another model's")
        if m.shape[-1] < width:
            m = torch.cat([m.new_full((*m.shape[:-1], width - m.shape[-1]), hidden), m], dim=-1)
        out.append(m)
    return torch.cat(out)
