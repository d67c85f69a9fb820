"""`boomerang serve` as a real server process on the real default teacher, driven by the official
`openai` client (and raw HTTP where the error's exact shape matters)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from boomerang.cli import main

pytestmark = pytest.mark.real
KEY = "test-key-123"
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write one sentence about the sea.",
           "What is 2 + 2?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    home = tmp / "home"
    home.mkdir()
    cache = Path(os.environ.get("BOOMERANG_HOME", "~/.boomerang")).expanduser() / "teachers"
    if cache.is_dir():  # the conversion is tested elsewhere
        (home / "teachers").symlink_to(cache)
    env = {**os.environ, "BOOMERANG_HOME": str(home), "OMP_NUM_THREADS": "2"}
    assert subprocess.run([sys.executable, "-m", "boomerang.cli", "cut", "--teacher", "default", "--out",
                           str(tmp / "fam")], env=env, capture_output=True).returncode == 0
    # the family's best patch order is measured on first use (minutes on 2 busy cores): once here, outside the
    # server's readiness wait, so what is timed below is the server's own start
    assert subprocess.run([sys.executable, "-m", "boomerang.cli", "family", "--student", str(tmp / "fam")], env=env,
                          capture_output=True, timeout=1200).returncode == 0
    assert json.loads((tmp / "fam" / "boomerang.json").read_text()).get("best_sizes"), "the best order was not kept"
    (tmp / "key").write_text(KEY + "\n")
    port = free_port()
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "boomerang.cli", "serve", "--student", str(tmp / "fam"), "--port",
                             str(port), "--api-key-file", str(tmp / "key"), "--max-queue", "4"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    try:
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not become ready"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    except BaseException:  # a server that never became ready is not left running
        proc.kill()
        proc.wait(timeout=30)
        raise
    yield {"base": base, "tmp": tmp, "home": home, "env": env, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)
    assert not list((home / "servers").glob("*.json")), "a stopped server is still listed"


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client, model, prompt, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
                                          **{"max_tokens": 20, **kw})


def test_every_size_is_listed_with_layers_and_parameters(client, server):
    models = {m.id: m.model_extra for m in client.models.list().data}
    sizes = {mid: extra for mid, extra in models.items() if mid.endswith("L")}
    assert sorted(extra["layers"] for extra in sizes.values()) == list(range(16, 31))
    assert models["fam-teacher"]["alias_of"] == "fam-30L" and models["fam-student"]["alias_of"] == "fam-16L"
    assert "fam-auto" in models and sizes["fam-30L"]["parameters"] == 134_515_008
    from boomerang.servers import running_servers

    os.environ["BOOMERANG_HOME"], saved = str(server["home"]), os.environ.get("BOOMERANG_HOME")
    try:
        (listed,) = running_servers()
    finally:
        os.environ.pop("BOOMERANG_HOME") if saved is None else os.environ.__setitem__("BOOMERANG_HOME", saved)
    assert listed["url"] == server["base"] + "/v1" and listed["family"] == "fam"


def test_a_greedy_completion_is_what_boomerang_generate_says(client, server, capsys, monkeypatch):
    monkeypatch.setenv("BOOMERANG_HOME", str(server["home"]))
    assert main(["generate", "--student", str(server["tmp"] / "fam"), "--layers", "23", "--prompt", PROMPTS[0],
                 "--greedy", "--max-new-tokens", "20"]) == 0
    captured = capsys.readouterr()
    expected, new_tokens = captured.out.strip(), int(captured.err.split("layers: ")[1].split(" tokens")[0])
    reply = chat(client, "fam-23L", PROMPTS[0])
    assert reply.model == "fam-23L" and reply.choices[0].message.content.strip() == expected
    assert reply.usage.completion_tokens == new_tokens
    from boomerang.generation import prompt_ids
    from boomerang.models import load_teacher

    tok = load_teacher("default").tokenizer
    assert reply.usage.prompt_tokens == prompt_ids(tok, [{"role": "user", "content": PROMPTS[0]}]).shape[1]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_text_and_usage(client):
    whole = chat(client, "fam-20L", PROMPTS[1])
    parts, usage, finish = [], None, None
    for event in chat(client, "fam-20L", PROMPTS[1], stream=True, stream_options={"include_usage": True}):
        if event.usage:
            usage = event.usage
        for choice in event.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens and finish == whole.choices[0].finish_reason
    text = client.completions.create(model="fam-student", prompt="The capital of France is", max_tokens=8,
                                     temperature=0)
    assert text.model == "fam-16L" and text.usage.completion_tokens == 8 and text.choices[0].finish_reason == "length"


def test_errors_have_the_openai_shape_and_status(server):
    base, auth = server["base"], {"Authorization": f"Bearer {KEY}"}
    body = {"model": "fam-23L", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        (400, {**body, "temperature": -1}, auth, "temperature"),
        (400, {**body, "max_tokens": 0}, auth, "max_tokens"),
        (400, {**body, "messages": []}, auth, "messages"),
        (400, {**body, "stop": [1]}, auth, "stop"),
        (400, {**body, "model": "fam-auto"}, auth, "max_latency_ms"),
        (404, {**body, "model": "fam-99L"}, auth, "model"),
        (400, {**body, "seed": 2**80}, auth, "seed"),  # was a 500 ("Overflow when unpacking long long")
        (400, {**body, "logprobs": True}, auth, "logprobs"),  # was silently ignored; answered on completions
        (400, {**body, "top_logprobs": 3}, auth, "top_logprobs"),
        (400, {**body, "echo": True}, auth, "echo"),
        (400, {**body, "ignore_eos": "yes"}, auth, "ignore_eos"),
        (401, body, {}, None),
        (401, body, {"Authorization": "Bearer wrong"}, None),
    ]
    for status, payload, headers, param in cases:
        r = httpx.post(base + "/v1/chat/completions", json=payload, headers=headers, timeout=30)
        assert r.status_code == status, (payload, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["param"] == param, error
    for method, path, status in (("GET", "/v1/chat/completions", 405), ("POST", "/v1/nothing", 404)):
        r = httpx.request(method, base + path, headers=auth, timeout=10)  # was FastAPI's {"detail": ...}
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    done = {"model": "fam-23L", "prompt": "x", "max_tokens": 2}
    for payload, param in (({**done, "logprobs": 9}, "logprobs"), ({**done, "echo": "yes"}, "echo"),
                           ({**done, "prompt": [5, 10**9]}, "prompt"), ({**done, "prompt": []}, "prompt"),
                           ({**done, "prompt": ["a", "b"], "stream": True}, "stream"),
                           ({**done, "logprobs": 1, "stream": True}, "stream"), ({**done, "top_logprobs": 2}, "top_logprobs")):
        r = httpx.post(base + "/v1/completions", json=payload, headers=auth, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (payload, r.text)
    assert httpx.get(base + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(base + "/health", timeout=10).status_code == 200  # health needs no key
    # ignore_eos (vLLM's extension, for benchmarks): exactly max_tokens, past any end-of-sequence token
    r = httpx.post(base + "/v1/chat/completions", json={**body, "max_tokens": 40, "ignore_eos": True}, headers=auth,
                   timeout=120)
    assert r.json()["usage"]["completion_tokens"] == 40 and r.json()["choices"][0]["finish_reason"] == "length"


def test_a_full_queue_answers_429(server):
    base, auth = server["base"], {"Authorization": f"Bearer {KEY}"}
    body = {"model": "fam-30L", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 48}
    codes, errors = [], []

    def send():
        r = httpx.post(base + "/v1/chat/completions", json=body, headers=auth, timeout=300)
        codes.append(r.status_code)
        if r.status_code == 429:
            errors.append(r.json()["error"])

    threads = [threading.Thread(target=send) for _ in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes.count(200) >= 4 and codes.count(429) >= 1, codes  # --max-queue 4
    assert errors[0]["code"] == "queue_full" and "at most 4" in errors[0]["message"]


def test_a_client_that_disconnects_stops_its_generation(server):
    base, auth = server["base"], {"Authorization": f"Bearer {KEY}"}
    body = {"model": "fam-30L", "messages": [{"role": "user", "content": "Count from one to a thousand."}],
            "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(8)]
    assert any(line.startswith("data: {") for line in seen)
    time.sleep(1.0)  # at most one more token after the disconnect, then nothing

    def tokens():
        return httpx.get(base + "/health", timeout=10).json()["tokens_generated"]

    before = tokens()
    time.sleep(1.5)
    assert tokens() == before, "the server went on generating for a client that left"
    assert httpx.get(base + "/health", timeout=10).json()["running"] == 0


def test_auto_serves_the_largest_size_within_the_budget(client):
    sizes = {m.id: m.model_extra for m in client.models.list().data if m.id.endswith("L")}
    budget = sizes["fam-23L"]["parameters"] + 1
    reply = chat(client, "fam-auto", "hi", max_tokens=2, extra_body={"max_params": budget})
    assert reply.model == "fam-23L"
    assert chat(client, "fam-auto", "hi", max_tokens=2, extra_body={"max_latency_ms": 1e9}).model == "fam-30L"
    assert all(e["prefill_ms"] > 0 for e in sizes.values())  # measured at start-up for every size
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="no size fits the budget"):
        chat(client, "fam-auto", "hi", max_tokens=2, extra_body={"max_params": 1000})


def test_concurrent_streams_each_return_what_they_return_alone(client):
    alone = [chat(client, "fam-26L", p).choices[0].message.content for p in PROMPTS]
    together = [None] * len(PROMPTS)

    def run(i):
        parts = []
        for event in chat(client, "fam-26L", PROMPTS[i], stream=True):
            parts += [c.delta.content or "" for c in event.choices]
        together[i] = "".join(parts)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert json.dumps(together)  # plain strings


def test_completions_score_token_id_prompts_with_echo_and_logprobs(server):
    """What scoring harnesses send: token ids, echo, logprobs, max_tokens 0; checked against the size in process."""
    import torch

    from boomerang.student import open_family

    base, auth = server["base"], {"Authorization": f"Bearer {KEY}"}
    opened = open_family(server["tmp"] / "fam")
    ids = opened.teacher.tokenizer("The boomerang came back to the hand that threw it.").input_ids
    r = httpx.post(base + "/v1/completions", headers=auth, timeout=60,
                   json={"model": "fam-23L", "prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 0})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    with torch.no_grad():
        want = torch.log_softmax(opened.family.build(23)(torch.tensor([ids])).logits[0].float(), -1)
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) == len(lp["tokens"])
    for i in range(1, len(ids)):
        assert abs(lp["token_logprobs"][i] - float(want[i - 1, ids[i]])) < 1e-4
        assert len(lp["top_logprobs"][i]) <= 2 and abs(max(lp["top_logprobs"][i].values()) - float(want[i - 1].max())) < 1e-4
    assert r.json()["choices"][0]["text"] == opened.teacher.tokenizer.decode(ids)
    # a batch of prompts, text and ids mixed, with one greedy token each: one choice per prompt, in order
    r = httpx.post(base + "/v1/completions", headers=auth, timeout=60,
                   json={"model": "fam-23L", "prompt": ["The sea is", ids], "max_tokens": 1, "temperature": 0,
                         "echo": True, "logprobs": 1})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and choices[1]["text"].startswith(opened.teacher.tokenizer.decode(ids))
    last = choices[1]["logprobs"]
    assert len(last["tokens"]) == len(ids) + 1
    assert last["token_logprobs"][-1] == max(last["top_logprobs"][-1].values())  # greedy: the top token was taken


@pytest.mark.slow
def test_lm_eval_scores_a_size_over_http_as_it_does_in_process(server, monkeypatch):
    """lm-eval's own `local-completions` client against `boomerang serve`: the same accuracy as in process."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from boomerang.evaluation.metrics import EvalSettings, lm_eval_task, run_lm_eval
    from boomerang.evaluation.task_files import resolve
    from boomerang.student import open_family

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    task = resolve(["arc_easy_mini"], None)[0]
    settings = EvalSettings(limit=24, batch_size=4)
    opened = open_family(server["tmp"] / "fam")
    here = lm_eval_task(opened.family.build(23), opened.teacher.tokenizer, task, settings)
    lm = LocalCompletionsAPI(base_url=server["base"] + "/v1/completions", model="fam-23L",
                             tokenizer=str(server["tmp"] / "fam"), tokenizer_backend="huggingface",
                             tokenized_requests=True, num_concurrent=2, max_retries=1, batch_size=1)
    there = run_lm_eval(lm, task, settings)
    for metric in ("acc,none", "acc_norm,none"):
        assert there["results"][metric] == here["results"][metric], (metric, here["results"], there["results"])
    assert there["n-samples"] == here["n-samples"]
