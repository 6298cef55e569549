"""The LLM judge client against a real HTTP server on 127.0.0.1 speaking OpenAI chat-completions JSON.

The server's path prefix selects a behaviour (/ok, /flaky, /hang, /malformed, ...). In /ok and
/math it echoes the model answer found in the prompt as the completion content, so a test
chooses the judge's reply by choosing the answer text.
"""

import http.server
import json
import socket
import threading
import time

import pytest

from deepeyes_jax.rl import judge


class _Server:
    def __init__(self):
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.hits = {}  # (mode, endpoint) -> count
        self.bodies = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                """Silenced: the default handler writes a line per request to stderr."""

            def _send(self, code, payload: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _route(self):
                mode, _, endpoint = self.path.strip("/").partition("/v1/")
                with outer.lock:
                    n = outer.hits.get((mode, endpoint), 0)
                    outer.hits[(mode, endpoint)] = n + 1
                return mode, endpoint, n

            def do_GET(self):
                mode, endpoint, _ = self._route()
                if endpoint == "models" and mode != "nomodels":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "judge", "object": "model"}]}).encode())
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                mode, endpoint, n = self._route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.bodies.append((mode, body))
                prompt = body["messages"][-1]["content"]
                if mode == "hang":
                    outer.release.wait(10)
                    return
                if mode == "flaky" and n < 2:
                    self._send(500, b'{"error": "overloaded"}')
                    return
                if mode == "bad_request":
                    self._send(400, b'{"error": "bad"}')
                    return
                if mode == "malformed":
                    self._send(200, b'{"choices": [{"message": {"content": "Judgement: 1"')
                    return
                if mode == "nochoices":
                    self._send(200, b'{"choices": []}')
                    return
                if mode == "always":  # a judge that accepts every answer
                    content = "Judgement: 1"
                elif mode == "letter_a":  # a judge that accepts exactly the answer "A"
                    said = prompt.split("[Model_answer] : ")[-1].rsplit("\nJudgement:", 1)[0].strip()
                    content = "Judgement: 1" if said == "A" else "Judgement: 0"
                elif "## Student Final Answer\n" in prompt:
                    content = prompt.split("## Student Final Answer\n")[-1]
                else:
                    content = prompt.split("[Model_answer] : ")[-1].rsplit("\nJudgement:", 1)[0]
                reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]}
                self._send(200, json.dumps(reply).encode())

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, mode):
        return f"http://127.0.0.1:{self.port}/{mode}/v1"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.close()


def _client(url, **kw):
    kw.setdefault("timeout", 5.0)
    kw.setdefault("backoff", 0.02)
    return judge.JudgeClient(judge.JudgeConfig(base_url=url, **kw))


def test_parse_verdict():
    assert judge.parse_verdict("1") == 1.0
    assert judge.parse_verdict("  1\n") == 1.0
    assert judge.parse_verdict("0") == 0.0
    assert judge.parse_verdict("Judgement: 1") == 1.0
    assert judge.parse_verdict("Judgement: 0") == 0.0
    assert judge.parse_verdict("Judgement: 10") == 1.0  # substring test, "1" first
    assert judge.parse_verdict("Judgement: 1\nJudgement: 0") == 0.0  # the last one
    assert judge.parse_verdict("The judgement is 1") == 0.0  # no "Judgement:", not exactly "1"
    assert judge.parse_verdict("yes") == 0.0
    assert judge.parse_math_verdict("## Equivalence Judgement\nTRUE") is True
    assert judge.parse_math_verdict("## Equivalence Judgement\nFALSE") is False
    assert judge.parse_math_verdict("## Equivalence Judgement\nTRUE or FALSE") is None
    assert judge.parse_math_verdict("true") is True


def test_prompt_is_verbatim():
    p = judge.judge_prompt("Q?", "The sky is blue.", "blue")
    assert p.startswith("\nBelow are two answers to a question.")
    assert "Judement is 0. Just output Judement and don't output anything else.\n\n\n\n[Question]: Is the countertop" in p
    assert p.count("Judgement: 1\n\n\n") == 5 and p.count("Judgement: 0\n\n\n") == 2
    assert p.endswith("\n[Question]: Q?\n[Standard Answer]: The sky is blue.\n[Model_answer] : blue\nJudgement:")
    m = judge.math_prompt("1+1?", "2", "two")
    assert "correctness of a student's answer. \nBelow" in m
    assert m.endswith("**Question**:\n1+1?\n\n**Reference Answer**\n2\n\n## Student Final Answer\ntwo")


def test_verdicts_over_http(server):
    replies = ["1", "Judgement: 1", "0", "Judgement: 0", "Judgement: 10", "The judgement is 1", "yes", " 1 "]
    want = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    client = _client(server.url("ok"), max_workers=4)
    scores, stats = client.judge_batch([("What color?", "blue", r) for r in replies])
    assert scores == want
    assert stats["ok"] == len(replies) and stats["failed"] == 0 and stats["retried"] == 0
    assert server.hits[("ok", "models")] == 1  # model name read once, then cached
    bodies = [b for m, b in server.bodies if m == "ok"]
    assert all(b["model"] == "judge" and b["temperature"] == 0.3 and isinstance(b["seed"], int) for b in bodies)
    assert all([m["role"] for m in b["messages"]] == ["system", "user"] for b in bodies)
    assert bodies[0]["messages"][0]["content"] == "You are a helpful assistant."


def test_math_verdicts_over_http(server):
    client = _client(server.url("math"), model="judge")
    items = [("q", "1/2", "## Equivalence Judgement\nTRUE"), ("q", "1/2", "## Equivalence Judgement\nFALSE"),
             ("q", "1/2", "TRUE or FALSE")]
    scores, stats = client.judge_math_batch(items)
    assert scores == [1.0, 0.0, 0.0] and stats["ok"] == 3
    assert ("math", "models") not in server.hits  # model given
    bodies = [b for m, b in server.bodies if m == "math"]
    assert all(b["temperature"] == 0.0 and len(b["messages"]) == 1 for b in bodies)


def test_retry_after_500(server):
    client = _client(server.url("flaky"), model="judge", max_retries=3, max_workers=1)
    scores, stats = client.judge_batch([("q", "a", "1")])
    assert scores == [1.0]
    assert stats == dict(ok=1, failed=0, retried=2, timeouts=0, malformed=0, http_errors=0)
    assert server.hits[("flaky", "chat/completions")] == 3


def test_retries_exhausted(server):
    """A 4xx is not retried; an unreachable server is retried, then given up."""
    client = _client(server.url("bad_request"), model="judge", max_retries=3)
    scores, stats = client.judge_batch([("q", "a", "1"), ("q", "a", "0")])
    assert scores == [0.0, 0.0]
    assert stats["failed"] == 2 and stats["http_errors"] == 2 and stats["retried"] == 0
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    client = _client(f"http://127.0.0.1:{dead}/v1", model="judge", max_retries=2)
    scores, stats = client.judge_batch([("q", "a", "1")])
    assert scores == [0.0] and stats["failed"] == 1 and stats["retried"] == 2


def test_hang_is_bounded(server):
    client = _client(server.url("hang"), model="judge", timeout=0.3, max_retries=1, max_workers=4)
    t0 = time.monotonic()
    scores, stats = client.judge_batch([("q", "a", "1")] * 3)
    elapsed = time.monotonic() - t0
    assert scores == [0.0, 0.0, 0.0]
    assert stats["failed"] == 3 and stats["ok"] == 0 and stats["retried"] == 3 and stats["timeouts"] == 6
    assert elapsed < 3.0


def test_malformed_json(server):
    for mode in ("malformed", "nochoices"):
        client = _client(server.url(mode), model="judge", max_retries=3)
        scores, stats = client.judge_batch([("q", "a", "1"), ("q", "a", "1")])
        assert scores == [0.0, 0.0]
        assert stats["failed"] == 2 and stats["malformed"] == 2 and stats["ok"] == 0 and stats["retried"] == 0


def test_models_endpoint_failure_is_counted(server):
    client = _client(server.url("nomodels"), max_retries=2)  # no model given: GET /models 404s
    scores, stats = client.judge_batch([("q", "a", "1")])
    assert scores == [0.0] and stats["failed"] == 1 and stats["http_errors"] == 1
    assert ("nomodels", "chat/completions") not in server.hits


def test_empty_batch():
    scores, stats = _client("http://127.0.0.1:9/v1", model="judge").judge_batch([])
    assert scores == [] and stats["ok"] == stats["failed"] == 0
