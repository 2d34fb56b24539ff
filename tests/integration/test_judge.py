"""The LLM-judge protocol (paper Appendix A) over real HTTP against a small fake OpenAI-compatible server.

The fake server is the one stand-in here (no judge model can run in CI). It scores an answer by its content
(9 if it contains GOOD, else 5) plus a position bias of +1 for whichever answer comes first, so the
both-orders average must cancel the bias exactly.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from layerexit.evaluation.config import EvalConfig, EvalMethod, JudgeConfig, PromptSetConfig
from layerexit.evaluation.judge import LLMJudge, parse_scores
from layerexit.evaluation.report import run_evaluation

pytestmark = pytest.mark.integration

_ANSWER = re.compile(r"\[The Start of Assistant (\d)'s Answer\]\n(.*?)\n\n\[The End of Assistant \1's Answer\]", re.S)


class FakeJudge:
    """Scripted replies: ``script`` is consumed first (one entry per request), then ``default`` applies.

    Entries: "score" (content-based scores with a position bias), "garbage-body", "no-choices", "prose",
    "http500", or any other string sent verbatim as the message content.
    """

    def __init__(self) -> None:
        self.script: list[str] = []
        self.default = "score"
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append({"path": self.path, "body": body})
                    action = judge.script.pop(0) if judge.script else judge.default
                if action == "http500":
                    self._send(500, b'{"error": "overloaded"}')
                    return
                if action == "garbage-body":
                    self._send(200, b"<html>not json</html>")
                    return
                if action == "no-choices":
                    self._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
                    return
                if action == "score":
                    answers = dict(_ANSWER.findall(body["messages"][-1]["content"]))
                    s1 = (9 if "GOOD" in answers["1"] else 5) + 1
                    s2 = 9 if "GOOD" in answers["2"] else 5
                    content = f"{s1} {s2}\nAssistant 1 was more detailed."
                elif action == "prose":
                    content = "Both assistants did fine, I would say the first is better."
                else:
                    content = action
                reply = {"id": "c", "object": "chat.completion", "model": body.get("model"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]}
                self._send(200, json.dumps(reply).encode())

            def _send(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake():
    with FakeJudge() as server:
        yield server


def _cfg(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(url=url, model="fake-judge", backoff_s=0.01, retries=kw.pop("retries", 2),
                       concurrency=kw.pop("concurrency", 2), timeout_s=5, **kw)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there any more


def test_both_orders_are_asked_and_averaged(fake):
    judge = LLMJudge(_cfg(fake.url))
    summary = judge.judge_many([("Q1?", "GOOD answer", "plain answer"), ("Q2?", "plain", "GOOD too")],
                               show_progress=False)
    assert summary.status == "ok" and summary.scored_pairs == 2 and summary.parse_failures == 0
    first, second = summary.judgements
    # Reference first: 10 vs 5; candidate first: 6 vs 9 -> the +1 position bias cancels in the mean.
    assert (first.reference, first.candidate) == (9.5, 5.5)
    assert (second.reference, second.candidate) == (5.5, 9.5)
    assert summary.reference_score == 7.5 and summary.candidate_score == 7.5
    assert len(fake.requests) == 4
    assert all(r["path"] == "/v1/chat/completions" for r in fake.requests)
    body = fake.requests[0]["body"]
    assert body["model"] == "fake-judge" and body["temperature"] == 0.0
    prompts = sorted(r["body"]["messages"][-1]["content"] for r in fake.requests if "Q1?" in
                     r["body"]["messages"][-1]["content"])
    orders = {tuple(a for _, a in _ANSWER.findall(p)) for p in prompts}
    assert orders == {("GOOD answer", "plain answer"), ("plain answer", "GOOD answer")}
    assert "scale of 1 to 10" in prompts[0] and "separated by a space" in prompts[0]


def test_malformed_replies_are_retried_then_counted(fake):
    fake.script = ["garbage-body", "no-choices", "score",  # first order: recovers on the third attempt
                   "prose", "prose", "prose"]              # second order: never parses (retries=2)
    judge = LLMJudge(_cfg(fake.url, concurrency=1))
    summary = judge.judge_many([("Q?", "GOOD", "meh")], show_progress=False)
    j = summary.judgements[0]
    assert summary.status == "ok" and j.orders_parsed == 1 and j.parse_failures == 1
    assert (j.reference, j.candidate) == (10.0, 5.0)  # the one parsed order
    assert summary.parse_failures == 1 and summary.request_failures == 0
    assert len(fake.requests) == 6


def test_server_errors_are_retried_with_backoff(fake):
    fake.script = ["http500", "http500", "score", "score"]
    delays: list[float] = []
    judge = LLMJudge(_cfg(fake.url, concurrency=1, retries=3), sleep=delays.append)
    summary = judge.judge_many([("Q?", "GOOD", "GOOD")], show_progress=False)
    assert summary.status == "ok" and summary.judgements[0].orders_parsed == 2
    assert delays == [0.01, 0.02]  # exponential backoff before each retry


def test_all_garbage_means_unavailable_without_raising(fake):
    fake.default = "prose"
    summary = LLMJudge(_cfg(fake.url, retries=0)).judge_many([("Q?", "a", "b")] * 3, show_progress=False)
    assert summary.status == "unavailable" and "no reply could be parsed" in summary.reason
    assert summary.parse_failures == 6 and summary.reference_score is None


def test_endpoint_down_is_unavailable_and_stops_sending():
    judge = LLMJudge(_cfg(_closed_port_url(), retries=1, concurrency=1, max_consecutive_failures=2))
    summary = judge.judge_many([("Q?", "a", "b")] * 10, show_progress=False)
    assert summary.status == "unavailable" and "failed 2 requests in a row" in summary.reason
    assert judge.requests_sent == 4  # two requests x (1 try + 1 retry), then the circuit opens
    assert summary.candidate_score is None


def test_parse_scores_protocol():
    assert parse_scores("8 7\nbecause...") == (8.0, 7.0)
    assert parse_scores("\n 7.5, 9 \n") == (7.5, 9.0)
    for bad in ("Assistant 1: 8", "8 7 6", "11 3", "", None, "The scores are 8 and 7"):
        assert parse_scores(bad) is None


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _eval_cfg(tmp_path, tiny_dir, judge_url: str) -> EvalConfig:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Write a poem about the sea."}\n{"prompt": "What is two plus two?"}\n')
    return EvalConfig(
        model=str(tiny_dir), prompt_sets=[PromptSetConfig(name="p", path=str(prompts))],
        methods=[EvalMethod(name="final", policy="final"),
                 EvalMethod(name="exit-1", policy="confidence", thresholds={1: 0.0})],
        max_new_tokens=4, judge=_cfg(judge_url, retries=1, max_consecutive_failures=2),
        similarity={"spacy": False, "embedding": False}, alignment={"enabled": False},
        mlflow={"enabled": False}, output_dir=str(tmp_path / "out"), show_progress=False,
    )


def test_report_judge_columns_with_a_live_judge(fake, tmp_path, tiny_dir, tiny_model_and_tokenizer):
    report = run_evaluation(_eval_cfg(tmp_path, tiny_dir, fake.url), model_and_tokenizer=tiny_model_and_tokenizer)
    s = report.summary()["exit-1"]
    assert s["judge_status"] == "ok" and s["judge_scored_pairs"] == 2
    assert s["judge_reference_score"] is not None and s["judge_candidate_score"] is not None
    assert report.summary()["final"]["judge_status"] == "reference"  # the reference is not judged against itself
    assert len(fake.requests) == 4  # 2 prompts x 2 orders, for the one non-reference method
    md = report.markdown_path.read_text()
    assert "LLM judge on `p`" in md and f"| exit-1 | {s['judge_candidate_score']:.2f} |" in md


def test_report_with_judge_down_still_reports_everything_else(tmp_path, tiny_dir, tiny_model_and_tokenizer):
    report = run_evaluation(_eval_cfg(tmp_path, tiny_dir, _closed_port_url()),
                            model_and_tokenizer=tiny_model_and_tokenizer)
    s = report.summary()["exit-1"]
    assert s["judge_status"] == "unavailable" and s["judge_candidate_score"] is None
    assert s["cost_improvement_pct"] > 0 and s["exit_share"] == {1: 1.0} and s["tokens_mean"] > 0
    md = report.markdown_path.read_text()
    assert "| exit-1 | unavailable | unavailable |" in md
    assert report.data["prompt_sets"]["p"]["judge_status"] == "unavailable"
