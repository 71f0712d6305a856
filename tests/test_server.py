"""A live `gridserve serve` (real processes, real sockets) driven by the official openai client, plus the
fault paths: a killed scheduler, SIGTERM, and gRPC mode giving the same tokens as HTTP."""

import json
import os
import signal
import threading
import time

import grpc
import httpx
import openai
import pytest

from gridserve.entrypoints.engine import Engine
from gridserve.entrypoints.grpc import gridserve_pb2 as pb
from gridserve.entrypoints.grpc import gridserve_pb2_grpc as pb_grpc
from gridserve.ipc import PortArgs, remove_stale_ipc_dirs
from tests.server_utils import ServerProcess, cmdline, health, ipc_dir, wait_gone

QUESTION = "Name three colors."


@pytest.fixture(scope="module")
def server():
    s = ServerProcess()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine():
    e = Engine(max_total_tokens=4096, show_progress=False, log_level="warning")
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")


def test_startup_time_is_reported_honestly(server, capsys):
    """The logged start-up time spans the launch (children started, model loaded, HTTP up): no more than the
    wall time the test saw from process start to the log line, and no less than that minus the interpreter's own
    start (a few seconds at most)."""
    reported = server.startup_seconds()
    with capsys.disabled():
        print(f"\n[gridserve serve, embedded model, CPU] start-up to ready: {reported:.1f} s "
              f"(wall time from exec: {server.ready_wall_s:.1f} s)")
    assert 1.0 < reported <= server.ready_wall_s
    assert reported > server.ready_wall_s - 5.0


def test_openai_client_greedy_equals_engine(client, engine):
    chat_prompt = engine.apply_chat_template([{"role": "user", "content": QUESTION}])
    want_chat = engine.generate(chat_prompt, {"temperature": 0, "max_new_tokens": 24})
    want_text = engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 12})

    chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=24,
                                          messages=[{"role": "user", "content": QUESTION}])
    assert chat.choices[0].message.content == want_chat["text"]
    assert chat.usage.completion_tokens == want_chat["meta_info"]["completion_tokens"]
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=24, stream=True,
                                            messages=[{"role": "user", "content": QUESTION}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want_chat["text"]

    comp = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                     temperature=0, max_tokens=12)
    assert comp.choices[0].text == want_text["text"]
    stream = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                       temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want_text["text"]


def test_32_concurrent_streams_are_well_formed_sse(server):
    results: list[str | None] = [None] * 32

    def one(i: int) -> None:
        body = {"prompt": f"Count to {i}:", "max_tokens": 16, "stream": True, "temperature": 0.7, "seed": i}
        events = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    events.append(line)
        assert events[-1] == "data: [DONE]"
        for e in events[:-1]:
            assert e.startswith("data: ")
            json.loads(e[len("data: "):])
        results[i] = "ok"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == ["ok"] * 32


def test_idle_server_reports_no_running_requests(server, client):
    for prompt in ("One", "Two"):  # requests that finish normally: the last stats must not count them
        client.completions.create(model="default", prompt=prompt, max_tokens=4, temperature=0)
    metrics = _metrics(server)
    assert metrics["gridserve:num_running_reqs"] == 0 and metrics["gridserve:num_queue_reqs"] == 0


def test_disconnected_client_frees_kv_and_counts_as_aborted(server):
    aborted_before = _metrics(server)["gridserve:num_aborted_requests_total"]
    body = {"prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # leave mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = httpx.get(f"{server.url}/server_info", timeout=10).json()["internal_states"][0]
        if state["used_tokens"] == 0 and state["num_running"] == 0:
            break
        time.sleep(0.2)
    assert state["used_tokens"] == 0 and state["num_running"] == 0
    metrics = _metrics(server)
    assert metrics["gridserve:num_running_reqs"] == 0  # the idle server's gauge is back to 0
    assert metrics["gridserve:num_aborted_requests_total"] == aborted_before + 1


def test_metrics_users_chart(server, client):
    before = _metrics(server)
    for prompt in ("One", "Two", "Three"):
        client.completions.create(model="default", prompt=prompt, max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "_created" not in text  # no start-time series beside every counter and histogram
    after = _metrics(server)
    assert after["gridserve:queue_time_seconds_count"] - before.get("gridserve:queue_time_seconds_count", 0) == 3
    assert 0 <= after["gridserve:queue_time_seconds_sum"] < 60
    assert after["gridserve:max_total_num_tokens"] == 4096  # ServerProcess's --max-total-tokens
    assert after["gridserve:num_used_tokens"] == 0  # idle: the cache holds tokens, no request does
    assert "gridserve:gen_throughput" in after


def _metrics(server: ServerProcess) -> dict[str, float]:
    """Every unlabelled-by-replica sample of /metrics by name (dp 1: one series each)."""
    out = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            out.setdefault(name, value)
    return out


def test_killed_scheduler_takes_the_deployment_down():
    s = ServerProcess()
    try:
        tree = s.descendants()
        scheduler = s.child_pid("gridserve::scheduler dp0 pp0 tp0")
        in_flight: dict = {}

        def request() -> None:  # a request running when the scheduler dies gets an error, not a hang
            try:
                r = httpx.post(f"{s.url}/v1/completions", timeout=30,
                               json={"prompt": "Hi", "max_tokens": 2000, "ignore_eos": True})
                in_flight["status"] = r.status_code
            except httpx.HTTPError as e:
                in_flight["status"] = repr(e)

        t = threading.Thread(target=request)
        t.start()
        time.sleep(1.0)
        signal_time = time.monotonic()
        os.kill(scheduler, signal.SIGKILL)
        saw_failure = False
        while s.proc.poll() is None and time.monotonic() - signal_time < 10:
            saw_failure |= health(s.url) != 200
            time.sleep(0.1)
        assert s.proc.poll() is not None, "server still running 10 s after its scheduler died"
        assert s.proc.returncode != 0
        assert saw_failure
        assert "scheduler dp0 pp0 tp0" in s.output() and "SIGKILL" in s.output()
        t.join(10)
        assert not t.is_alive() and in_flight["status"] != 200
        assert wait_gone(tree, 5) == []
    finally:
        s.stop()


def test_grpc_streams_the_same_tokens_as_http_and_sigterm_cleans_up(server):
    http = httpx.post(f"{server.url}/generate", timeout=60,
                      json={"text": "The capital of France is", "sampling_params": {"temperature": 0,
                                                                                    "max_new_tokens": 12}}).json()
    g = ServerProcess(grpc=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{g.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            req = pb.GenerateRequest(text="The capital of France is", stream=True,
                                     sampling_params=pb.SamplingParams(temperature=0, max_new_tokens=12))
            ids, text = [], ""
            for resp in stub.Generate(req, timeout=60):
                ids += list(resp.token_ids)
                text += resp.text
        assert ids == http["output_ids"] and text == http["text"]
        tree = g.descendants()
        start = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        g.proc.wait(10)
        assert wait_gone(tree, max(0.1, 10 - (time.monotonic() - start))) == []
    finally:
        g.stop()


def test_sigterm_is_a_clean_shutdown(server):
    """Open streams end with an error event, every child stops, the IPC directory goes, and the status is 0."""
    tree = server.descendants()
    assert len(tree) >= 2  # a scheduler and the detokenizer at least
    ipc = ipc_dir(server)
    assert os.path.isdir(ipc)
    events, streaming = [], threading.Event()

    def stream() -> None:
        body = {"prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    streaming.set()

    t = threading.Thread(target=stream)
    t.start()
    assert streaming.wait(30)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(10)
    t.join(10)
    assert server.proc.returncode == 0, server.output()[-2000:]
    assert wait_gone(tree, max(0.1, 10 - (time.monotonic() - start))) == []
    assert not os.path.exists(ipc)
    assert events[-1] == "data: [DONE]" and "the server is shutting down: stopped by SIGTERM" in events[-2], events[-3:]


def _logs_within(text: str, server: ServerProcess, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while text not in server.output():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_children_die_with_a_killed_main_process():
    s = ServerProcess()
    try:
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
        assert _logs_within('"GET /health HTTP/1.1" 200', s, 5)  # the HTTP server logs requests at info, by default
        tree = s.descendants()
        assert any("gridserve::scheduler" in cmdline(p) for p in tree)
        ipc = ipc_dir(s)
        s.proc.kill()
        s.proc.wait(5)
        assert wait_gone(tree, 10) == []
        # a killed main process cannot remove its IPC directory: the next start does (one of a live one stays)
        assert os.path.isdir(ipc)
        assert ipc in remove_stale_ipc_dirs() and not os.path.exists(ipc)
        live = PortArgs.create()  # this process is alive: its directory stays
        try:
            assert live.ipc_dir not in remove_stale_ipc_dirs() and os.path.isdir(live.ipc_dir)
        finally:
            live.cleanup()
    finally:
        s.stop()


def test_watchdog_ends_a_deployment_whose_rank_is_stopped():
    """SIGSTOP of a scheduler: within --watchdog-timeout /health turns 503 naming the rank, the request in
    flight ends with an error, and the deployment exits non-zero with no process left."""
    s = ServerProcess("--watchdog-timeout", "3", "--log-level-http", "warning")
    assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
    assert not _logs_within("GET /health", s, 1)  # --log-level-http warning: no line per request
    victim = s.child_pid("gridserve::scheduler dp0 pp0 tp0")
    try:
        tree = s.descendants()
        result: dict = {}

        def request() -> None:
            try:
                r = httpx.post(f"{s.url}/v1/completions", timeout=30, json={"prompt": "Hi", "max_tokens": 50})
                result["status"] = r.status_code
                result["body"] = r.text
            except httpx.HTTPError as e:
                result["status"] = repr(e)

        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        t = threading.Thread(target=request)
        t.start()
        body = ""
        while time.monotonic() - stopped < 8:
            try:
                r = httpx.get(f"{s.url}/health", timeout=2)
            except httpx.HTTPError:
                break
            if r.status_code == 503:
                body = r.text
                break
            time.sleep(0.1)
        assert "scheduler dp0 pp0 tp0 made no progress" in body, body
        assert 3 <= time.monotonic() - stopped < 8
        t.join(30)
        assert result["status"] != 200, result
        s.proc.wait(15)
        assert s.proc.returncode != 0 and "--watchdog-timeout" in s.output()
        assert wait_gone(tree, 10) == []
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
        s.stop()
