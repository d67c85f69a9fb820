"""Decoding rows of several sizes at once (boomerang.decoding) against each row decoded alone with a cache."""

from __future__ import annotations

import threading

import pytest
import torch
from test_family import make_family
from transformers import DynamicCache

from boomerang.arch import adapter_for
from boomerang.decoding import Decoder, DecodeRow, union_order
from tiny import CONFIGS, VOCAB


def alone(model, prompt: list[int], n: int) -> list[torch.Tensor]:
    """The next-token logits of `n` greedy steps of `model` alone, by its own forward with a cache."""
    cache, out = DynamicCache(), []
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
        for _ in range(n):
            out.append(logits)
            logits = model(input_ids=torch.tensor([[int(logits.argmax())]]), past_key_values=cache,
                           use_cache=True).logits[0, -1]
    return out


class Recording(Decoder):
    """A decoder that keeps the logits each row's tokens were picked from."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, list[torch.Tensor]] = {}

    def _pick(self, row, logits):
        self.seen.setdefault(id(row), []).append(logits.clone())
        return super()._pick(row, logits)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_rows_of_several_sizes_joining_at_different_steps_get_what_they_get_alone(model_type):
    _, _, _, fam = make_family(model_type, order=[2, 0, 1])  # sizes that share only some of their layers
    models = {n: fam.build(n) for n in fam.layer_counts}
    g = torch.Generator().manual_seed(0)
    rows, joins = [], []
    for i in range(7):  # prompts of 2 to 11 tokens; past a sliding window (6) by the end
        prompt = torch.randint(3, VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
        rows.append(DecodeRow(models[fam.layer_counts[i // 2 % len(models)]], prompt, 6, on_token=lambda t: True))
        joins.append(i // 3)  # rows 0-2 at the first step (two of one size: their prompts run as one batch), ...
    dec = Recording()
    for step in range(12):
        dec.add_many([row for row, join in zip(rows, joins, strict=True) if join == step])
        dec.step()
    assert not dec.rows and all(r.finished and r.reason == "length" and r.generated == 6 for r in rows)
    calls_alone = 5 * sum(len(adapter_for(r.model).layer_list(r.model)) for r in rows)  # 5 steps after the prompt
    assert dec.layer_calls < calls_alone  # shared calls
    for row in rows:
        for got, want in zip(dec.seen[id(row)], alone(row.model, row.prompt, 6), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_a_common_order_keeps_each_paths_order_and_runs_a_shared_layer_once():
    order = union_order([["s0", "s1", "t4", "t5"], ["t0", "t1", "t2", "t3", "t4", "t5"], ["s0", "t2", "t3", "t4", "t5"]])
    assert sorted(order) == sorted({"s0", "s1", "t0", "t1", "t2", "t3", "t4", "t5"})
    for path in (["s0", "s1", "t4", "t5"], ["t0", "t1", "t2", "t3", "t4", "t5"], ["s0", "t2", "t3", "t4", "t5"]):
        assert [order.index(s) for s in path] == sorted(order.index(s) for s in path)
    assert union_order([["a", "b"], ["b", "a"]]) is None  # no order serves both: each runs on its own


def test_rows_stop_on_end_of_sequence_their_consumer_a_cancel_and_their_limit():
    _, _, _, fam = make_family("llama")
    model = fam.build(6)
    first = alone(model, [5, 6, 7], 4)
    greedy = [int(x.argmax()) for x in first]
    dec = Decoder()
    cancel = {"now": False}
    got: dict[str, list[int]] = {k: [] for k in ("eos", "consumer", "cancel", "limit")}
    rows = {
        "eos": DecodeRow(model, [5, 6, 7], 10, lambda t: got["eos"].append(t) or True, eos={greedy[0]}),
        "consumer": DecodeRow(model, [5, 6, 7], 10, lambda t: got["consumer"].append(t) or len(got["consumer"]) < 2),
        "cancel": DecodeRow(model, [5, 6, 7], 10, lambda t: got["cancel"].append(t) or True,
                            cancelled=lambda: cancel["now"]),
        "limit": DecodeRow(model, [5, 6, 7], 3, lambda t: got["limit"].append(t) or True),
    }
    for row in rows.values():
        dec.add(row)
    dec.step()
    cancel["now"] = True
    for _ in range(5):
        dec.step()
    assert not dec.rows
    assert got["eos"] == [] and rows["eos"].reason == "stop"  # the end-of-sequence token is not handed on
    assert got["consumer"] == greedy[:2] and rows["consumer"].reason == "stop"
    assert got["cancel"] == greedy[:2] and rows["cancel"].reason == "cancelled"
    assert got["limit"] == greedy[:3] and rows["limit"].reason == "length"


def test_a_seeded_sample_does_not_depend_on_the_rows_beside_it():
    _, _, _, fam = make_family("qwen2")
    small, big = fam.build(5), fam.build(8)

    def sample(companions: int) -> list[int]:
        out: list[int] = []
        dec = Decoder()
        dec.add(DecodeRow(small, [9, 8, 7, 6], 8, lambda t: out.append(t) or True, temperature=0.9, top_p=0.8, seed=7))
        for i in range(companions):
            dec.add(DecodeRow(big if i % 2 else small, [3 + i, 4], 8, lambda t: True, temperature=1.0, seed=i))
        while dec.rows:
            dec.step()
        return out

    assert sample(0) == sample(3) and len(sample(0)) == 8


def test_other_threads_run_the_same_models_while_a_decoder_steps():
    _, _, _, fam = make_family("llama")
    size, teacher = fam.build(6), fam.build(8)
    x = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        want = size(x).logits
    dec = Decoder()
    for model in (size, teacher):
        dec.add(DecodeRow(model, [9, 10, 11], 60, lambda t: True))
    runner = threading.Thread(target=lambda: [dec.step() for _ in range(59)])
    runner.start()
    with torch.no_grad():
        while runner.is_alive():
            torch.testing.assert_close(size(x).logits, want, rtol=0, atol=0)
    runner.join()
    assert not dec.rows


def test_the_chat_pair_decodes_both_sides_together_as_each_generates_alone():
    from boomerang.generation import Sampling, prompt_ids, stream_pair
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    _, _, _, fam = make_family("gemma2")
    size, teacher = fam.build(6), fam.build(8)
    sides = [(size, [{"role": "user", "content": "hello there"}]), (teacher, [{"role": "user", "content": "hi"}])]
    *_, last = stream_pair(sides, tok, Sampling(12, 0.0), threading.Event(), every=0.01)
    for (model, messages), reply in zip(sides, last, strict=True):
        ids = prompt_ids(tok, messages)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        assert reply.done and reply.error is None
        assert reply.text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    stop = threading.Event()
    stop.set()
    *_, last = stream_pair(sides, tok, Sampling(12, 0.0), stop, every=0.01)
    assert all(r.done and r.tokens <= 1 for r in last)  # a stop ends both sides before their first step


def test_a_long_row_grows_its_room_for_keys_and_still_gets_what_it_gets_alone():
    _, _, _, fam = make_family("qwen2")  # sliding layers: the window passes long before the end
    model = fam.build(6)
    dec = Recording()
    row = DecodeRow(model, [5, 6, 7], 90, lambda t: True)
    dec.add(row)
    rooms = set()
    while dec.rows:
        dec.step()
        rooms.add(next(iter(row.kv.values()))[0].shape[2])
    assert rooms == {67, 93}  # 3 + 64 first, then what the row can make (not 3 + 90 from the start)
    for got, want in zip(dec.seen[id(row)], alone(model, [5, 6, 7], 90), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
