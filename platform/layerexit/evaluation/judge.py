"""LLM-as-judge through any OpenAI-compatible endpoint, with the LITE paper's protocol (Appendix A).

The judge sees the question and two answers and replies with one line holding two scores (1-10). To cancel
position bias every pair is judged in both orders (reference first, then candidate first) and each side's two
scores are averaged. Replies that do not parse are retried, then counted as parse failures; a pair with one
parsed order keeps that order's scores. Transport failures are retried with exponential backoff; after
``max_consecutive_failures`` requests in a row failed the endpoint is considered down, nothing more is sent,
and the summary's status is ``unavailable`` (as it is when no pair could be scored at all).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import httpx
from tqdm.auto import tqdm

from layerexit.evaluation.config import JudgeConfig

UNAVAILABLE = "unavailable"

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
# Appendix A of the paper (its Claude "Human:" turn), verbatim apart from the chat framing.
USER_TEMPLATE = """[Question]
{question}

[The Start of Assistant 1's Answer]
{answer_1}

[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{answer_2}

[The End of Assistant 2's Answer]

We would like to request your feedback on the performance of two AI assistants in response to the user question \
displayed above.
Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an \
overall score on a scale of 1 to 10, where a higher score indicates better overall performance.
Please output a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. \
The two scores are separated by a space."""

_NUM = r"(\d+(?:\.\d+)?)"
_SCORE_LINE = re.compile(rf"^\s*\**\s*{_NUM}\s*(?:[,;/]\s*|\s+){_NUM}\s*\**\s*$")


def parse_scores(text: str | None) -> tuple[float, float] | None:
    """The two scores from the judge's reply: its first non-empty line must hold exactly two numbers in [0, 10]."""
    if not text:
        return None
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        m = _SCORE_LINE.match(line)
        if not m:
            return None
        a, b = float(m.group(1)), float(m.group(2))
        return (a, b) if 0.0 <= a <= 10.0 and 0.0 <= b <= 10.0 else None
    return None


@dataclass
class PairJudgement:
    """Both orders of one (reference, candidate) pair."""

    reference: float | None = None  # mean score of the reference (final layer) over the parsed orders
    candidate: float | None = None
    orders_parsed: int = 0
    parse_failures: int = 0  # orders whose replies never parsed
    request_failures: int = 0  # orders that got no usable HTTP answer
    raw: list[str | None] = field(default_factory=list)  # the replies, reference-first order then swapped


@dataclass
class JudgeSummary:
    """Aggregate of a batch of pairs; the judge columns of the report."""

    status: str  # "ok" or "unavailable"
    reason: str | None
    pairs: int
    scored_pairs: int
    parse_failures: int
    request_failures: int
    reference_score: float | None
    candidate_score: float | None
    judgements: list[PairJudgement] = field(default_factory=list)

    def to_dict(self, with_pairs: bool = False) -> dict:
        data = asdict(self)
        if not with_pairs:
            data.pop("judgements")
        return data


class _Unusable(Exception):
    """The endpoint answered in a way retries cannot fix (bad URL, auth, unknown model)."""


class LLMJudge:
    """Scores pairs of answers with an OpenAI-compatible chat endpoint (thread-safe; one instance per report)."""

    def __init__(self, cfg: JudgeConfig, client: httpx.Client | None = None, sleep=time.sleep) -> None:
        if not cfg.url:
            raise ValueError("JudgeConfig.url is required")
        self.cfg = cfg
        headers = {}
        key = os.environ.get(cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = client or httpx.Client(timeout=cfg.timeout_s, headers=headers)
        self.endpoint = cfg.url.rstrip("/") + "/chat/completions"
        self._sleep = sleep
        self._lock = threading.Lock()
        self._consecutive_failures = 0
        self.down_reason: str | None = None
        self.requests_sent = 0

    @property
    def down(self) -> bool:
        return self.down_reason is not None

    def close(self) -> None:
        self.client.close()

    # --------------------------------------------------------------------------------------------- transport
    def _post(self, question: str, answer_1: str, answer_2: str) -> str:
        """One chat completion; returns the content or raises httpx errors / ValueError (garbage) / _Unusable."""
        body = {
            "model": self.cfg.model or "judge",
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": USER_TEMPLATE.format(question=question, answer_1=answer_1,
                                                                 answer_2=answer_2)},
            ],
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        with self._lock:
            self.requests_sent += 1
        resp = self.client.post(self.endpoint, json=body)
        if resp.status_code in (400, 401, 403, 404, 405, 422):
            raise _Unusable(f"HTTP {resp.status_code} from {self.endpoint}")
        resp.raise_for_status()
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError("reply is not an OpenAI chat completion") from None
        if not isinstance(content, str):
            raise ValueError("reply content is not text")
        return content

    def _ask(self, question: str, answer_1: str, answer_2: str) -> tuple[tuple[float, float] | None, str | None, bool]:
        """(scores or None, last reply text, transport_failed) for one order, with retries and backoff."""
        last_text: str | None = None
        last_error = ""
        transport_failed = False
        for attempt in range(self.cfg.retries + 1):
            if self.down:
                return None, last_text, True
            if attempt:
                self._sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                last_text = self._post(question, answer_1, answer_2)
                transport_failed = False
            except _Unusable as err:
                self._mark_down(str(err))
                return None, last_text, True
            except (httpx.HTTPError, OSError) as err:  # refused, timeout, 5xx, 429
                transport_failed = True
                last_error = f"{type(err).__name__}: {str(err)[:120]}"
                continue
            except ValueError:  # garbage body: retry, then a parse failure
                with self._lock:
                    self._consecutive_failures = 0
                continue
            with self._lock:
                self._consecutive_failures = 0
            scores = parse_scores(last_text)
            if scores is not None:
                return scores, last_text, False
        if transport_failed:
            with self._lock:
                self._consecutive_failures += 1
                if self._consecutive_failures >= self.cfg.max_consecutive_failures and not self.down:
                    self.down_reason = f"endpoint {self.endpoint} failed {self._consecutive_failures} requests in a " \
                                       f"row ({last_error})"
        return None, last_text, transport_failed

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            if self.down_reason is None:
                self.down_reason = reason

    # ------------------------------------------------------------------------------------------------ protocol
    def judge_pair(self, question: str, reference: str, candidate: str) -> PairJudgement:
        """Both orders; each side's score is the mean over the orders that parsed."""
        out = PairJudgement()
        ref_scores: list[float] = []
        cand_scores: list[float] = []
        for swapped in (False, True):
            a1, a2 = (candidate, reference) if swapped else (reference, candidate)
            scores, text, transport_failed = self._ask(question, a1, a2)
            out.raw.append(text)
            if scores is None:
                if transport_failed:
                    out.request_failures += 1
                else:
                    out.parse_failures += 1
                continue
            out.orders_parsed += 1
            ref_scores.append(scores[1] if swapped else scores[0])
            cand_scores.append(scores[0] if swapped else scores[1])
        if ref_scores:
            out.reference = sum(ref_scores) / len(ref_scores)
            out.candidate = sum(cand_scores) / len(cand_scores)
        return out

    def judge_many(self, items: Sequence[tuple[str, str, str]], desc: str = "judge",
                   show_progress: bool = True) -> JudgeSummary:
        """Judge (question, reference, candidate) triples; never raises for endpoint trouble."""
        judgements: list[PairJudgement] = [PairJudgement() for _ in items]
        if not self.down and items:
            with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
                futures = [pool.submit(self.judge_pair, *item) for item in items]
                for i, fut in enumerate(tqdm(futures, desc=desc, disable=not show_progress, unit="pair")):
                    judgements[i] = fut.result()
        scored = [j for j in judgements if j.orders_parsed]
        status, reason = "ok", None
        if self.down:
            status, reason = UNAVAILABLE, self.down_reason
        elif not scored:
            status, reason = UNAVAILABLE, "no reply could be parsed as two scores" if items else "no pairs"
        ok = status == "ok"
        return JudgeSummary(
            status=status,
            reason=reason,
            pairs=len(items),
            scored_pairs=len(scored),
            parse_failures=sum(j.parse_failures for j in judgements),
            request_failures=sum(j.request_failures for j in judgements),
            reference_score=sum(j.reference for j in scored) / len(scored) if ok else None,
            candidate_score=sum(j.candidate for j in scored) / len(scored) if ok else None,
            judgements=judgements,
        )


def unavailable_summary(pairs: int, reason: str) -> JudgeSummary:
    """The judge columns when no judge is configured or it could not be used."""
    return JudgeSummary(UNAVAILABLE, reason, pairs, 0, 0, 0, None, None)
