"""``mlx-med serve`` driven by the real ``openai`` client (and raw HTTP) over loopback sockets.

One server (tiny llama + two random adapters) runs as a subprocess for the module; answers are
checked against the chat session engine on a live model at the same α, in this process.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from random_adapters import ALL, make_adapter

from mlx_med.adapters.live import load_with_adapters
from mlx_med.chat.session import ChatSession, context_window
from mlx_med.evaluation.decoding import DecodingConfig
from mlx_med.prompts import DEFAULT_SYSTEM_PROMPT

openai = pytest.importorskip("openai")

MAX_TOKENS = 8
QUESTIONS = ["Is aspirin indicated after a stroke?", "fever", "高血压患者应该注意什么？", "chest pain at night",
             "dose of amoxicillin", "What is sepsis?"]
START_TIMEOUT_S = 180
TIMEOUT_S = 60  # per request


class ServerProcess:
    """``mlx-med serve ... --port 0`` in a subprocess; the URL is read from its first stdout line."""

    def __init__(self, args: list[str], log: Path):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_med.cli", "serve", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not line or "http://" not in line[0]:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line} {log.read_text()}")
        self.base = line[0].split()[1].removesuffix("/v1")
        self.url = self.base + "/v1"

    def log_records(self) -> list[dict]:
        return [json.loads(x.split(" ", 2)[2]) for x in self.log.read_text().splitlines() if ' {"id"' in x]

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(TIMEOUT_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT_S)


class Raw:
    """Plain HTTP on one loopback connection (``http.client``), for what a client library would hide."""

    def __init__(self, base: str):
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict, bytes]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = self.conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def json(self, method: str, path: str, body=None, headers=None):
        status, _, data = self.request(method, path, body, headers)
        return status, json.loads(data)

    def close(self):
        self.conn.close()


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    make_adapter(tiny_llama, root / "pt", rank=4, lora_alpha=8, keys=ALL, seed=1, phase="pt")
    make_adapter(tiny_llama, root / "sft", rank=2, lora_alpha=16, keys=ALL, seed=2, phase="sft")
    return tiny_llama, root / "sft", root / "pt", root


@pytest.fixture(scope="module")
def server(runs):
    model, sft, pt, root = runs
    proc = ServerProcess(["--model", str(model), "--sft", str(sft), "--pt", str(pt), "--alpha", "0.5",
                          "--max-tokens", str(MAX_TOKENS), "--batch-size", "4"], root / "server.log")
    yield proc
    assert proc.interrupt() == 0  # Ctrl-C: a clean stop, exit status 0
    proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", timeout=TIMEOUT_S, max_retries=0)


@pytest.fixture(scope="module")
def live_model(runs):
    model, sft, pt, _ = runs
    return load_with_adapters(model, sft=sft, pt=pt, alpha=0.5)


def chat_answer(live_model, weights: dict[str, float], question: str, max_tokens: int = MAX_TOKENS):
    """The peer: ``mlx-med chat``'s session engine, greedy, on the live model at ``weights``."""
    loaded, live = live_model
    live.set_weights(**weights)
    session = ChatSession(loaded.model, loaded.tokenizer, DecodingConfig(temperature=0.0, max_new_tokens=max_tokens),
                          system=DEFAULT_SYSTEM_PROMPT, window=context_window(loaded.config), adapters=live)
    reply = session.ask(question)
    return reply.text, reply.stats.generation_tokens


def ask(client, question: str, model: str = "merged", **extra):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=MAX_TOKENS,
        extra_body=extra or None)
    return response


# -- choosing the mix ----------------------------------------------------------------------------
def test_models_list_merged_first(client):
    assert [m.id for m in client.models.list().data] == ["merged", "base", "pt", "sft"]


@pytest.mark.parametrize(("model", "extra", "weights"), [
    ("merged", {}, {"sft": 0.5, "pt": 0.5}),  # the server's --alpha
    ("merged", {"alpha": 0.3}, {"sft": 0.3, "pt": 0.7}),
    ("merged@0.8", {}, {"sft": 0.8, "pt": 0.2}),
    ("merged", {"lora": [{"id": 0, "scale": 0.3}, {"id": 1, "scale": 0.7}]}, {"sft": 0.3, "pt": 0.7}),
    ("pt", {}, {"sft": 0.0, "pt": 1.0}),
    ("sft", {}, {"sft": 1.0, "pt": 0.0}),
    ("base", {}, {"sft": 0.0, "pt": 0.0}),
])
def test_each_mix_answers_as_chat_at_that_alpha(client, live_model, model, extra, weights):
    response = ask(client, QUESTIONS[0], model, **extra)
    text, tokens = chat_answer(live_model, weights, QUESTIONS[0])
    assert response.choices[0].message.content.strip() == text
    assert response.usage.completion_tokens == tokens
    assert response.model == model


def test_mixes_really_differ(client):
    answers = {m: ask(client, QUESTIONS[1], m).choices[0].message.content for m in ("base", "pt", "sft")}
    assert len(set(answers.values())) == 3


def test_lora_adapters_endpoint_sets_the_server_mix(server, client, live_model):
    raw = Raw(server.base)
    _, adapters = raw.json("GET", "/lora-adapters")
    assert [(a["id"], a["scale"]) for a in adapters] == [(0, 0.5), (1, 0.5)]
    assert raw.json("POST", "/lora-adapters", [{"id": 0, "scale": 0.2}, {"id": 1, "scale": 0.8}]) == (
        200, {"success": True})
    try:
        assert [a["scale"] for a in raw.json("GET", "/lora-adapters")[1]] == [0.2, 0.8]
        got = ask(client, QUESTIONS[2]).choices[0].message.content.strip()
        assert got == chat_answer(live_model, {"sft": 0.2, "pt": 0.8}, QUESTIONS[2])[0]
    finally:
        raw.json("POST", "/lora-adapters", [{"id": 0, "scale": 0.5}, {"id": 1, "scale": 0.5}])
        raw.close()


# -- streaming -----------------------------------------------------------------------------------
def test_stream_adds_up_to_the_whole_answer_with_usage(server, client):
    whole = ask(client, QUESTIONS[2], alpha=0.3)
    stream = client.chat.completions.create(
        model="merged", messages=[{"role": "user", "content": QUESTIONS[2]}], temperature=0, max_tokens=MAX_TOKENS,
        stream=True, stream_options={"include_usage": True}, extra_body={"alpha": 0.3})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # On the wire: server-sent events ending with [DONE].
    raw = Raw(server.base)
    _, headers, data = raw.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "fever"}], "stream": True, "max_tokens": 3, "temperature": 0})
    raw.close()
    assert headers["content-type"].startswith("text/event-stream")
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completions_endpoint_reads_a_raw_prompt(client, live_model):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    loaded, live = live_model
    prompt = "Aspirin is"
    response = client.completions.create(model="merged@0.3", prompt=prompt, temperature=0, max_tokens=6)
    live.set_alpha(0.3)
    ids = []
    for token, _ in generate_step(mx.array(loaded.tokenizer.encode(prompt)), loaded.model, max_tokens=6):
        if token in loaded.tokenizer.eos_token_ids:
            break
        ids.append(int(token))
    assert response.choices[0].text == loaded.tokenizer.decode(ids, skip_special_tokens=True)
    assert response.usage.completion_tokens == len(ids)


def test_stop_string_cuts_the_answer(client):
    full = ask(client, QUESTIONS[0]).choices[0].message.content
    stop = full.strip()[2:4]
    assert stop and stop in full
    cut = client.chat.completions.create(model="merged", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                         temperature=0, max_tokens=MAX_TOKENS, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


# -- batching ------------------------------------------------------------------------------------
def test_mixed_alpha_concurrent_requests_equal_the_same_requests_alone(client):
    cases = [(q, a) for q, a in zip(QUESTIONS, (0.0, 0.2, 0.4, 0.6, 0.8, 1.0))]

    def one(case):
        question, alpha = case
        r = ask(client, question, alpha=alpha)
        return r.choices[0].message.content, r.usage.completion_tokens

    alone = [one(c) for c in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(one, cases))
    assert together == alone
    assert len({t for t, _ in alone}) > 1


def test_seeded_sampling_is_repeatable_in_any_batch(client):
    def sample(question):
        r = client.chat.completions.create(model="merged", messages=[{"role": "user", "content": question}],
                                           temperature=1.0, top_p=0.95, seed=7, max_tokens=MAX_TOKENS)
        return r.choices[0].message.content

    first = sample(QUESTIONS[1])
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(sample, [QUESTIONS[1], QUESTIONS[0], QUESTIONS[1]]))
    assert results[0] == results[2] == first


def test_disconnect_mid_stream_frees_the_slot(server, client):
    raw = Raw(server.base)
    raw.conn.request("POST", "/v1/completions", body=json.dumps({
        "prompt": "The patient", "stream": True, "max_tokens": 400, "temperature": 0, "model": "base"}))
    response = raw.conn.getresponse()
    received = [response.fp.readline() for _ in range(6)]  # a few events, then hang up
    raw.conn.sock.shutdown(2)
    raw.close()
    assert any(x.startswith(b"data: ") for x in received)
    health = Raw(server.base)
    deadline = time.monotonic() + TIMEOUT_S
    while health.json("GET", "/health")[1]["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health.json("GET", "/health")[1]["active_requests"] == 0
    health.close()
    record = [r for r in server.log_records() if r["path"] == "/v1/completions" and r["stream"]][-1]
    assert record["finish_reason"] == "disconnected" and record["completion_tokens"] < 400
    # Requests are logged without their text unless --log-prompts.
    assert "input" not in record and "The patient" not in server.log.read_text()
    assert ask(client, QUESTIONS[1]).choices[0].message.content  # the server carries on


# -- refusals ------------------------------------------------------------------------------------
BAD_REQUESTS = [
    # (what, body or raw bytes, status, param)
    ("malformed JSON", b'{"messages": [', 400, None),
    ("not an object", [1, 2], 400, None),
    ("no messages", {"model": "merged"}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("alpha out of range", {"alpha": 1.5, "messages": [{"role": "user", "content": "x"}]}, 400, "alpha"),
    ("alpha not a number", {"alpha": "half", "messages": [{"role": "user", "content": "x"}]}, 400, "alpha"),
    ("alpha with a fixed mix", {"model": "sft", "alpha": 0.2, "messages": [{"role": "user", "content": "x"}]},
     400, "alpha"),
    ("merged@ out of range", {"model": "merged@2", "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("lora id unknown", {"lora": [{"id": 5, "scale": 1.0}], "messages": [{"role": "user", "content": "x"}]},
     400, "lora[0].id"),
    ("prompt too long", {"messages": [{"role": "user", "content": "fever " * 600}]}, 400, "messages"),
    ("max_tokens over the limit", {"max_tokens": 100000, "messages": [{"role": "user", "content": "x"}]},
     400, "max_tokens"),
    ("temperature out of range", {"temperature": 9, "messages": [{"role": "user", "content": "x"}]},
     400, "temperature"),
    ("n > 1", {"n": 2, "messages": [{"role": "user", "content": "x"}]}, 400, "n"),
    ("body too large", {"messages": [{"role": "user", "content": "x" * 1_100_000}]}, 413, None),
]


def test_bad_inputs_get_openai_errors_while_a_good_request_completes(server, client):
    question = QUESTIONS[3]
    alone = client.chat.completions.create(model="merged", messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=100)
    stream = iter(client.chat.completions.create(model="merged", messages=[{"role": "user", "content": question}],
                                                 temperature=0, max_tokens=100, stream=True))
    pieces = [next(stream)]  # the good request is in flight while the bad ones arrive
    for what, body, status, param in BAD_REQUESTS:
        raw = Raw(server.base)  # a fresh connection each: the server may close one it refused
        got, answer = raw.json("POST", "/v1/chat/completions", body)
        raw.close()
        assert got == status, what
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], what
        assert error["param"] == param, what
    raw = Raw(server.base)
    got, answer = raw.json("GET", "/v1/chat/completions")
    assert got == 405 and "error" in answer
    got, answer = raw.json("GET", "/v2/nothing")
    assert got == 404 and "error" in answer
    raw.close()
    pieces += list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == alone.choices[0].message.content
    # The openai client raises its own typed errors for them.
    with pytest.raises(openai.NotFoundError):
        ask(client, "x", "gpt-4")
    with pytest.raises(openai.BadRequestError, match="alpha"):
        ask(client, "x", alpha=-0.1)


# -- start-up and shutdown -----------------------------------------------------------------------
def test_other_hosts_need_an_api_key(runs):
    model, *_ = runs
    result = subprocess.run([sys.executable, "-m", "mlx_med.cli", "serve", "--model", str(model), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 2 and "--api-key" in result.stderr and "Traceback" not in result.stderr


def test_config_file_and_flags(runs, tmp_path):
    """``-c serve.yaml``: keys as the flags, mistakes named by file and line, flags win over the file."""
    from click.testing import CliRunner

    from mlx_med.cli import cli

    model, *_ = runs
    runner = CliRunner()
    help_text = runner.invoke(cli, ["serve", "--help"]).output
    for flag in ("--model", "--sft", "--pt", "--alpha", "--adapter", "--host", "--port", "--api-key", "--config"):
        assert flag in help_text
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model: {model}\nhots: 0.0.0.0\n")
    result = runner.invoke(cli, ["serve", "-c", str(cfg)])
    assert result.exit_code == 2 and "serve.yaml:2" in result.stderr and "hots" in result.stderr
    cfg.write_text(f"model: {model}\nhost: 0.0.0.0\n")
    result = runner.invoke(cli, ["serve", "-c", str(cfg)])
    assert result.exit_code == 2 and "--api-key" in result.stderr
    result = runner.invoke(cli, ["serve", "-c", str(cfg), "--alpha", "1.5", "--host", "127.0.0.1"])
    assert result.exit_code == 2 and "alpha" in result.stderr


def test_api_key_and_ctrl_c_with_a_request_in_flight(runs):
    model, sft, pt, root = runs
    proc = ServerProcess(["--model", str(model), "--adapter", str(sft), "--api-key", "s3cret"], root / "keyed.log")
    try:
        raw = Raw(proc.base)
        assert raw.json("GET", "/v1/models")[0] == 401
        status, answer = raw.json("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert raw.json("GET", "/health")[0] == 200
        raw.close()
        keyed = openai.OpenAI(base_url=proc.url, api_key="s3cret", timeout=TIMEOUT_S, max_retries=0)
        assert [m.id for m in keyed.models.list().data] == ["adapter", "base"]
        stream = keyed.completions.create(model="adapter", prompt="The patient", max_tokens=300, temperature=0,
                                          stream=True)
        next(iter(stream))
        assert proc.interrupt() == 0  # Ctrl-C with a stream open: finished or cancelled, exit 0
        assert "Traceback" not in proc.log.read_text()
    finally:
        proc.kill()


def test_quantized_model_with_one_adapter(runs):
    """A 4-bit model (its loaded weights are lazy until first used) served from the batch thread."""
    from click.testing import CliRunner

    from mlx_med.cli import cli

    model, sft, _, root = runs
    quantized = root / "q4"
    result = CliRunner().invoke(cli, ["convert", "--hf-path", str(model), "-o", str(quantized), "--q-bits", "4",
                                      "--q-group-size", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    proc = ServerProcess(["--model", str(quantized), "--adapter", str(sft), "--max-tokens", str(MAX_TOKENS)],
                         root / "q4.log")
    try:
        client = openai.OpenAI(base_url=proc.url, api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        got = ask(client, QUESTIONS[0], "adapter").choices[0].message.content.strip()
    finally:
        assert proc.interrupt() == 0
        proc.kill()
    loaded, live = load_with_adapters(quantized, adapter=sft)
    session = ChatSession(loaded.model, loaded.tokenizer, DecodingConfig(temperature=0.0, max_new_tokens=MAX_TOKENS),
                          system=DEFAULT_SYSTEM_PROMPT, window=context_window(loaded.config), adapters=live)
    assert got == session.ask(QUESTIONS[0]).text
