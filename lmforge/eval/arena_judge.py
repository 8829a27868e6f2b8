"""Who won a battle: an LLM judge over any OpenAI-compatible endpoint, or human votes from a JSONL file.

The judge sees the user's question and two anonymous answers, "A" and "B", and must end its reply with a
verdict token: `[[A]]` (A is better), `[[B]]` (B is better) or `[[C]]` (a tie). The prompt (JUDGE_SYSTEM,
JUDGE_USER below) asks it to reason briefly first and to ignore answer length, order and style.

LLM judges favour the answer shown first (or second). So each pair is judged twice, once with model_a in
position A and once with the two swapped; the two verdicts are mapped back to models, and only a winner
named by both counts; disagreeing verdicts (one says A, the swap says A again — i.e. the judge followed the
position, not the answer) become a tie. A judge that always answers `[[A]]` therefore produces only ties.

Verdict parsing (`parse_verdict`): the `[[X]]` token, case- and space-insensitive (also full-width
brackets); when the reply holds several, they must agree or the last one counts (judges sometimes quote the
format first). Without one, a line like "Verdict: A" / "Winner: B" / "tie" is accepted. Anything else is
unparseable: the battle is kept with winner None and left out of the ratings (counted in the report).

Human votes: JSONL lines {"model_a", "model_b", "winner": "model_a|model_b|tie|both_bad", ...}; a bad line
is a DataError naming file:line, or is skipped and counted with on_error="skip".
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..config import opt
from ..core.errors import ConfigError, DataError
from ..data.readers import ReadStats, bad_line, iter_json_objects
from .arena_ratings import WINNERS, Battle

JUDGE_SYSTEM = (
    "You are an impartial judge comparing two AI assistants' answers to the same user question.\n"
    "Decide which answer serves the user better: correct, helpful, relevant, and as detailed as the question "
    "needs. Do not let the order of the answers, their length, or the assistants' names influence you.\n"
    "Explain your reasoning in at most three sentences, then give your verdict on the last line as exactly one "
    "of these tokens: [[A]] if answer A is better, [[B]] if answer B is better, [[C]] if they are equally good "
    "or equally bad."
)

JUDGE_USER = (
    "[User question]\n{question}\n\n"
    "[Answer A]\n{answer_a}\n[End of answer A]\n\n"
    "[Answer B]\n{answer_b}\n[End of answer B]"
)

_TOKEN_RE = re.compile(r"[\[【［]\s*[\[【［]\s*(A|B|C|TIE)\s*[\]】］]\s*[\]】］]", re.IGNORECASE)
_LINE_RE = re.compile(r"(?:verdict|winner|final answer)\s*(?:is)?\s*[:：=]?\s*\(?\[?\s*"
                      r"(?:(?:assistant|answer|model)\s+)?(A|B|C|tie)\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "C" (tie) from a judge's reply; None when it names no verdict (see the module docstring)."""
    if not text:
        return None
    tokens = [m.upper() for m in _TOKEN_RE.findall(text)]
    if not tokens:
        tokens = [m.upper() for m in _LINE_RE.findall(text)]
    if not tokens:
        stripped = text.strip().strip(".!").upper()
        tokens = [stripped] if stripped in ("A", "B", "C", "TIE") else []
    if not tokens:
        return None
    verdict = tokens[-1]
    return "C" if verdict == "TIE" else verdict


def combine_verdicts(first: str | None, swapped: str | None) -> str | None:
    """The battle's winner from the verdict on (A=model_a, B=model_b) and on the swapped order.

    Returns "model_a" / "model_b" when both verdicts name the same model, "tie" when they disagree or both
    say tie, None when either is unparseable."""
    if first is None or swapped is None:
        return None
    as_model = {"A": "model_a", "B": "model_b", "C": "tie"}
    swap_back = {"A": "model_b", "B": "model_a", "C": "tie"}
    one, two = as_model[first], swap_back[swapped]
    return one if one == two else "tie"


@dataclass
class JudgeConfig:
    """An OpenAI-compatible chat endpoint that judges battles (our `lmforge serve` is one)."""

    base_url: str = opt("http://127.0.0.1:8000/v1", "the judge endpoint's base URL (…/v1)")
    model: str = opt("", "model name to send to the judge endpoint")
    api_key: str = opt("", "API key; empty: read the environment variable named by api_key_env")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the API key when api_key is empty")
    temperature: float = opt(0.0, "judge sampling temperature (0: deterministic verdicts)")
    max_tokens: int = opt(512, "longest judge reply")
    timeout_s: float = opt(120.0, "seconds per judge request")
    max_retries: int = opt(2, "retries on connection errors / 5xx / 429 (the openai client's own backoff)")
    swap: bool = opt(True, "judge each pair twice with A/B swapped; disagreeing verdicts become ties")

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"judge.max_tokens={self.max_tokens} must be >= 1")


def resolve_api_key(api_key: str, api_key_env: str) -> str:
    """The explicit key, else the named environment variable, else a placeholder (local servers need none)."""
    return api_key or (os.environ.get(api_key_env, "") if api_key_env else "") or "EMPTY"


def openai_client(base_url: str, api_key: str, api_key_env: str, timeout_s: float, max_retries: int) -> Any:
    """The official `openai` client for an OpenAI-compatible endpoint."""
    try:
        from openai import OpenAI
    except ImportError as e:  # pragma: no cover - openai is a dependency of the eval extra
        raise ConfigError("talking to an OpenAI-compatible endpoint needs the `openai` package "
                          "(pip install 'lmforge[eval]')") from e
    if not base_url:
        raise ConfigError("base_url is empty: give the endpoint, e.g. http://127.0.0.1:8000/v1")
    return OpenAI(base_url=base_url, api_key=resolve_api_key(api_key, api_key_env), timeout=timeout_s,
                  max_retries=max_retries)


@dataclass
class Judgement:
    """The judge's replies and verdicts for one battle, and the resulting winner (None: unparseable)."""

    winner: str | None
    verdicts: list[str | None]
    replies: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner, "verdicts": self.verdicts, "replies": self.replies}


class LLMJudge:
    """Judges battles through an OpenAI-compatible chat endpoint, with position swap."""

    def __init__(self, config: JudgeConfig, client: Any = None) -> None:
        if not config.model:
            raise ConfigError("judge.model is empty: name the judge model the endpoint serves")
        self.config = config
        self.client = client or openai_client(config.base_url, config.api_key, config.api_key_env,
                                              config.timeout_s, config.max_retries)

    def messages(self, question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": JUDGE_USER.format(question=question, answer_a=answer_a,
                                                              answer_b=answer_b)}]

    def ask(self, question: str, answer_a: str, answer_b: str) -> str:
        """The judge's raw reply for one ordering."""
        response = self.client.chat.completions.create(
            model=self.config.model, messages=self.messages(question, answer_a, answer_b),
            temperature=self.config.temperature, max_tokens=self.config.max_tokens)
        return response.choices[0].message.content or ""

    def judge(self, question: str, answer_a: str, answer_b: str) -> Judgement:
        """Winner between model_a's `answer_a` and model_b's `answer_b` (see the module docstring)."""
        first = self.ask(question, answer_a, answer_b)
        v1 = parse_verdict(first)
        if not self.config.swap:
            winner = None if v1 is None else {"A": "model_a", "B": "model_b", "C": "tie"}[v1]
            return Judgement(winner, [v1], [first])
        second = self.ask(question, answer_b, answer_a)
        v2 = parse_verdict(second)
        return Judgement(combine_verdicts(v1, v2), [v1, v2], [first, second])


def iter_human_votes(path: str | Path, on_error: str = "raise", stats: ReadStats | None = None
                     ) -> Iterator[tuple[int, Battle]]:
    """(line, Battle) for each vote in a JSONL file; bad lines raise DataError (file:line) or are counted."""
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error={on_error!r} is not 'raise' or 'skip'")
    path, stats = Path(path), stats if stats is not None else ReadStats()
    if not path.is_file():
        raise DataError(f"human votes file not found: {path}")
    stats.files += 1
    for lineno, obj in iter_json_objects(path, on_error, stats):
        a, b, winner = obj.get("model_a"), obj.get("model_b"), obj.get("winner")
        if not isinstance(a, str) or not a.strip() or not isinstance(b, str) or not b.strip():
            bad_line(path, lineno, "model_a and model_b must be non-empty strings", on_error, stats)
            continue
        if a == b:
            bad_line(path, lineno, f"model_a and model_b are both {a!r}", on_error, stats)
            continue
        if winner not in WINNERS:
            bad_line(path, lineno, f"winner={winner!r} is not one of {'|'.join(WINNERS)}", on_error, stats)
            continue
        stats.documents += 1
        yield lineno, Battle(a, b, winner)


def read_human_votes(path: str | Path, on_error: str = "raise", stats: ReadStats | None = None) -> list[Battle]:
    """Every vote in a JSONL file as a Battle (see `iter_human_votes`)."""
    return [battle for _, battle in iter_human_votes(path, on_error, stats)]
