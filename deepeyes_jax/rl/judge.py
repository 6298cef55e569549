"""Optional LLM-as-judge client (spec 3.3 / 3.4) for an OpenAI-compatible chat endpoint (vLLM).

DeepEyes asks a served Qwen2.5-72B-Instruct whether the extracted answer matches the ground truth
(tool data) or, for math, whether the boxed answer is equivalent. This client uses the same
prompts and verdict parsing, standard library only:
  * POST {base_url}/chat/completions with a per-request random seed (as DeepEyes);
  * every socket operation has `timeout` seconds; transport errors, timeouts, HTTP 429 and 5xx
    are retried up to `max_retries` times with exponential backoff (DeepEyes retried nothing for
    the tool judge, up to 8 attempts for math);
  * a malformed reply (not JSON, no choices[0].message.content) or a non-retryable HTTP error is
    not retried;
  * a judgement that still fails scores 0 and is counted; nothing raises;
  * a batch is judged by a thread pool of `max_workers`.
`judge_batch` / `judge_math_batch` return (scores, stats) with stats counts ok / failed / retried
(retry attempts) / timeouts / malformed / http_errors.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request

SYSTEM_MESSAGE = "You are a helpful assistant."

TEMPLATE = """
Below are two answers to a question. Question is [Question], [Standard Answer] is the standard answer to the question, and [Model_answer] is the answer extracted from a model's output to this question.  Determine whether these two answers are consistent.
Note that [Model Answer] is consistent with [Standard Answer] whenever they are essentially the same. If the meaning is expressed in the same way, it is considered consistent, for example, 'pink' and 'it is pink'.
If they are consistent, Judement is 1; if they are different, Judement is 0. Just output Judement and don't output anything else.\n\n
"""  # noqa: E501
EXAMPLES = (
    """
[Question]: Is the countertop tan or blue?
[Standard Answer]: The countertop is tan.
[Model_answer] : tan
Judgement: 1
""",
    """
[Question]: On which side of the picture is the barrier?
[Standard Answer]: The barrier is on the left side of the picture.
[Model_answer] : left
Judgement: 1
""",
    """
[Question]: Is the kite brown and large?
[Standard Answer]: Yes, the kite is brown and large.
[Model_answer] : Yes
Judgement: 1
""",
    """
[Question]: Are the spots on a giraffe?
[Standard Answer]: No, the spots are on a banana.
[Model_answer] : no
Judgement: 1
""",
    """
[Question]: Who is wearing pants?
[Standard Answer]: The boy is wearing pants.
[Model_answer] : The person in the picture is wearing pants.
Judgement: 1
""",
    """
[Question]: Is the man phone both blue and closed?
[Standard Answer]: Yes, the man phone is both blue and closed.
[Model_answer] : No.
Judgement: 0
""",
    """
[Question]: What color is the towel in the center of the picture?
[Standard Answer]: The towel in the center of the picture is blue.
[Model_answer] : The towel in the center of the picture is pink.
Judgement: 0
""",
)
TEST_TEMPLATE = """
[Question]: {question}
[Standard Answer]: {ground_truth}
[Model_answer] : {answer_text}
Judgement:"""

MATH_VERIFY_PROMPT = """# CONTEXT #
I am a teacher, and I have some high-level math problems. I am tasked with evaluating the correctness of a student's answer. 
Below, I am provided with a problem and a reference answer. Additionally, a student's answer is provided. My job is to assess whether the student's answer captures the same meaning as the reference answer, even when expressed with different wording or format.

# OBJECTIVE #
I need you to judge whether the student's answer is correct given the ground truth answer.

Your tasks include:
1. Identify Mathematical or Notational Equivalence: Pay special attention to any LaTeX expressions in both answers. Confirm that the mathematical relationships, variables, and operations conveyed are equivalent.

# TONE #
Professional, scientific.

# RESPONSE: MARKDOWN REPORT #
## Equivalence Judgement
[Whether the student's answer share the same meaning with the reference answer. (TRUE or FALSE)]

# ATTENTION #
 - The reference answer is ALWAYS correct. You should carefully judge whether the student gives the same answer as reference answer.
 - The Equivalence Judgement is only TRUE or FALSE. The answer is FALSE even if the student's final answer almost correct with a minor mistakes.
 - Don't give extra explanation.

**Question**:
{query}

**Reference Answer**
{gold_ans}

## Student Final Answer
{pred_ans}"""  # noqa: E501, W291


def judge_prompt(question: str, ground_truth: str, answer_text: str) -> str:
    """DeepEyes' `full_prompt`: TEMPLATE + each example followed by a blank line + the test item."""
    return (TEMPLATE + "".join(e + "\n\n" for e in EXAMPLES)
            + TEST_TEMPLATE.format(question=question, ground_truth=ground_truth, answer_text=answer_text))


def math_prompt(question: str, ground_truth: str, prediction: str) -> str:
    return MATH_VERIFY_PROMPT.format(query=question, gold_ans=ground_truth, pred_ans=prediction)


def parse_verdict(content: str) -> float:
    """DeepEyes' parsing: after the last "Judgement:" any "1" -> 1.0 ("1" checked first), else 0.0;
    without "Judgement:" only exactly "1" is 1.0."""
    r = content.strip()
    if "Judgement:" in r:
        r = r.split("Judgement:")[-1].strip()
        return 1.0 if "1" in r else 0.0
    return 1.0 if r == "1" else 0.0


def parse_math_verdict(content: str) -> bool | None:
    """True iff 'true' and not 'false' after the last "## Equivalence Judgement" (lowercased);
    False for the converse; None when undecided (scored 0)."""
    j = content.split("## Equivalence Judgement")[-1].lower()
    if "true" in j and "false" not in j:
        return True
    if "false" in j and "true" not in j:
        return False
    return None


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """base_url: e.g. "http://127.0.0.1:18901/v1" (DeepEyes' LLM_AS_A_JUDGE_BASE); empty = no judge (the
    on-device rule-based matcher decides). model: None reads the first id of GET {base_url}/models.
    temperature: 0.3 for the tool judge (math uses 0.0)."""

    base_url: str = ""
    model: str | None = None
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_workers: int = 16
    temperature: float = 0.3
    math_temperature: float = 0.0
    max_tokens: int | None = None


class _Malformed(Exception):
    pass


class _Retryable(Exception):
    pass


class JudgeClient:
    """Thread-safe client; see the module docstring."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self._model = config.model
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._rng = random.Random()

    # -- HTTP
    def _request(self, path: str, body: dict | None) -> dict:
        url = self.config.base_url.rstrip("/") + path
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}") from e
            raise
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            raise _Retryable(repr(e)) from e
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Malformed(str(e)) from e

    def _with_retries(self, fn, stats: dict):
        delay = self.config.backoff
        for attempt in range(self.config.max_retries + 1):
            try:
                return fn()
            except _Retryable as e:
                if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                    self._bump(stats, "timeouts")
                if attempt == self.config.max_retries:
                    raise
                self._bump(stats, "retried")
                time.sleep(delay)
                delay = min(delay * 2, self.config.max_backoff)

    def _bump(self, stats: dict, key: str):
        with self._lock:
            stats[key] += 1

    def model_name(self, stats: dict) -> str:
        """config.model, else the first id of GET /models (asked once; a failure is retried by the
        next judgement)."""
        with self._model_lock:
            if self._model is None:
                reply = self._with_retries(lambda: self._request("/models", None), stats)
                try:
                    self._model = reply["data"][0]["id"]
                except (KeyError, IndexError, TypeError) as e:
                    raise _Malformed(f"no model in /models reply: {e}") from e
            return self._model

    def chat(self, prompt: str, *, temperature: float, system: str | None, stats: dict) -> str:
        """One chat completion's content (may raise; `_judge_one` catches)."""
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": prompt})
        with self._lock:
            seed = self._rng.randint(0, 1000000)
        body = dict(model=self.model_name(stats), messages=messages, temperature=temperature, seed=seed)
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        reply = self._with_retries(lambda: self._request("/chat/completions", body), stats)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise _Malformed(f"no choices[0].message.content: {e}") from e
        if not isinstance(content, str):
            raise _Malformed("content is not a string")
        return content

    # -- judging
    def _judge_one(self, prompt: str, temperature: float, system: str | None, parse, stats: dict) -> float:
        try:
            score = parse(self.chat(prompt, temperature=temperature, system=system, stats=stats))
        except _Malformed:
            self._bump(stats, "malformed")
            self._bump(stats, "failed")
            return 0.0
        except urllib.error.HTTPError:
            self._bump(stats, "http_errors")
            self._bump(stats, "failed")
            return 0.0
        except Exception:  # noqa: BLE001 - a judgement never raises
            self._bump(stats, "failed")
            return 0.0
        self._bump(stats, "ok")
        return float(score)

    def _batch(self, prompts: list[str], temperature: float, system: str | None, parse):
        stats = dict(ok=0, failed=0, retried=0, timeouts=0, malformed=0, http_errors=0)
        if not prompts:
            return [], stats
        workers = max(1, min(self.config.max_workers, len(prompts)))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self._judge_one, p, temperature, system, parse, stats) for p in prompts]
            scores = [f.result() for f in futures]
        return scores, stats

    def judge_batch(self, items) -> tuple[list[float], dict]:
        """items: iterable of (question, ground_truth, answer_text) -> (scores in {0, 1}, stats)."""
        prompts = [judge_prompt(q, g, a) for q, g, a in items]
        return self._batch(prompts, self.config.temperature, SYSTEM_MESSAGE, parse_verdict)

    def judge_math_batch(self, items) -> tuple[list[float], dict]:
        """items: (question, ground_truth, prediction) -> (1.0 iff the verdict is TRUE, stats).
        DeepEyes sends the math prompt as a single user message."""
        prompts = [math_prompt(q, g, p) for q, g, p in items]
        return self._batch(prompts, self.config.math_temperature, None,
                           lambda c: 1.0 if parse_math_verdict(c) is True else 0.0)
