"""SFT data: JSONL conversations (OpenAI messages, Alpaca, ShareGPT) → token ids with assistant-only labels,
optionally packed several to a sequence, served by a resumable batch source.

Labels are already shifted, as `causal_lm_loss` expects: `labels[t]` is the token that follows
`input_ids[t]`, or -100 where that token is not trained on (prompt, system, padding). Packing puts several
conversations in one row with `document_ids`, which makes the model build a block-diagonal causal mask and
restart positions per conversation, so a packed batch gives the same token-weighted loss as the
conversations one by one (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..core.errors import DataError
from ..data.readers import ReadStats, bad_line, iter_json_objects
from ..train.losses import IGNORE_INDEX

FORMATS = ("auto", "messages", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "tool": "tool", "function": "tool", "observation": "tool"}


# ----- formats → messages ---------------------------------------------------------------------------------
def detect_format(obj: dict) -> str | None:
    """The SFT format a JSON object is written in, or None when it is none of them."""
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


def to_messages(obj: dict, fmt: str = "auto") -> list[dict[str, str]]:
    """One conversation as [{"role", "content"}, ...]; ValueError (with the reason) when it is malformed."""
    found = detect_format(obj) if fmt == "auto" else fmt
    if found == "messages":
        raw = obj.get("messages")
        if not isinstance(raw, list):
            raise ValueError("'messages' must be a list of {role, content} objects")
        messages = [_message(m.get("role") if isinstance(m, dict) else None,
                             m.get("content") if isinstance(m, dict) else None, i) for i, m in enumerate(raw)]
    elif found == "sharegpt":
        raw = obj.get("conversations")
        if not isinstance(raw, list):
            raise ValueError("'conversations' must be a list of {from, value} objects")
        messages = []
        for i, turn in enumerate(raw):
            if not isinstance(turn, dict) or turn.get("from") not in _SHAREGPT_ROLES:
                who = turn.get("from") if isinstance(turn, dict) else turn
                raise ValueError(f"conversations[{i}].from={who!r} is not one of {sorted(_SHAREGPT_ROLES)}")
            messages.append(_message(_SHAREGPT_ROLES[turn["from"]], turn.get("value"), i))
        if "system" in obj and isinstance(obj["system"], str) and obj["system"]:
            messages.insert(0, {"role": "system", "content": obj["system"]})
    elif found == "alpaca":
        parts = [obj.get("instruction"), obj.get("input") or "", obj.get("output")]
        if not all(isinstance(p, str) for p in parts):
            raise ValueError("alpaca fields instruction, input, output must be strings")
        prompt = parts[0] if not parts[1] else f"{parts[0]}\n\n{parts[1]}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": parts[2]}]
        if isinstance(obj.get("system"), str) and obj["system"]:
            messages.insert(0, {"role": "system", "content": obj["system"]})
    elif fmt == "auto":
        raise ValueError(f"not an SFT record (keys: {', '.join(sorted(obj)[:8])}); expected 'messages', "
                         f"'conversations' (ShareGPT) or 'instruction'+'output' (Alpaca)")
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant reply to train on")
    return messages


def _message(role: Any, content: Any, index: int) -> dict[str, str]:
    if role not in ROLES:
        raise ValueError(f"message {index}: role {role!r} is not one of {list(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def read_conversations(paths: str | Path | Sequence[str | Path], fmt: str = "auto", on_error: str = "raise",
                       stats: ReadStats | None = None) -> list[list[dict[str, str]]]:
    """Every conversation in the JSONL file(s), normalised to messages lists.

    A malformed line raises DataError naming file:line, or is skipped and counted in `stats` under
    on_error='skip' (the data contract in DESIGN.md §3)."""
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not one of {list(FORMATS)}")
    stats = stats if stats is not None else ReadStats()
    out = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        if not Path(path).is_file():
            raise DataError(f"SFT data file {path} not found")
        stats.files += 1
        for lineno, obj in iter_json_objects(path, on_error, stats):
            try:
                out.append(to_messages(obj, fmt))
            except ValueError as e:
                bad_line(path, lineno, str(e), on_error, stats)
                continue
            stats.documents += 1
    return out


# ----- tokenise ------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One tokenised conversation: model input and shifted labels of equal length."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], max_seq_len: int,
                          train_on_prompt: bool = False) -> Example:
    """input_ids = the rendered chat minus its last token; labels[t] = token t+1 where that token is part of an
    assistant reply (the template's {% generation %} span, end-of-turn token included), else -100.

    Truncated to max_seq_len inputs: the tail of a long conversation is dropped, never the start, so
    the prompt the model conditions on stays intact."""
    enc = tokenizer.encode_chat(messages)
    ids, mask = enc.input_ids[: max_seq_len + 1], enc.assistant_mask[: max_seq_len + 1]
    if train_on_prompt:
        mask = [1] * len(ids)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids[1:], mask[1:])]
    return Example(ids[:-1], labels)


def tokenize_all(tokenizer, conversations: list[list[dict[str, str]]], max_seq_len: int,
                 train_on_prompt: bool = False) -> list[Example]:
    """Tokenised conversations, dropping those left with nothing to train on after truncation."""
    out = [tokenize_conversation(tokenizer, c, max_seq_len, train_on_prompt) for c in conversations]
    return [e for e in out if e.num_targets > 0]


# ----- packing and batches -------------------------------------------------------------------------------
def pack_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Rows of example indices: examples taken in `order`, each appended to the current row while it fits
    in seq_len tokens (greedy, order-preserving, so the row set is a pure function of the order)."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        n = lengths[index]
        if current and used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += n
    if current:
        rows.append(current)
    return rows


def collate(examples: Sequence[Sequence[Example]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """A batch dict: each row is the concatenation of its examples, right-padded to the longest row.

    Packed rows carry document_ids (0, 1, ... per conversation, the padding its own document) so no token
    attends across conversations and positions restart at each one."""
    width = max(sum(len(e.input_ids) for e in row) for row in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    document_ids = torch.zeros((batch, width), dtype=torch.long)
    for r, row in enumerate(examples):
        start = 0
        for d, example in enumerate(row):
            end = start + len(example.input_ids)
            input_ids[r, start:end] = torch.tensor(example.input_ids)
            labels[r, start:end] = torch.tensor(example.labels)
            document_ids[r, start:end] = d
            start = end
        document_ids[r, start:] = len(row)
    out = {"input_ids": input_ids, "labels": labels}
    if packed:
        out["document_ids"] = document_ids
    return out


class SFTBatches:
    """Batches of tokenised conversations, reshuffled each epoch from (seed, epoch); resumable exactly.

    The position is (epoch, next batch index); the epoch's row plan is recomputed from the seed, so
    `load_state_dict(state_dict())` continues with the very batches an uninterrupted run would see. Each
    rank of a multi-process run takes rows rank, rank + world_size, ... of each global batch.
    """

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, *, seed: int = 0,
                 packing: bool = False, shuffle: bool = True, pad_id: int = 0, rank: int = 0, world_size: int = 1,
                 epochs: int | None = None):
        if not examples:
            raise DataError("no SFT examples to train on (all empty or filtered out)")
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.seed, self.packing, self.shuffle, self.pad_id = seed, packing, shuffle, pad_id
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.epoch, self.index = 0, 0
        self._plan_epoch: int | None = None
        self._rows: list[list[int]] = []

    def rows(self, epoch: int) -> list[list[int]]:
        """The epoch's rows (lists of example indices), a pure function of (seed, epoch)."""
        if self._plan_epoch != epoch:
            n = len(self.examples)
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(n, generator=generator).tolist()
            else:
                order = list(range(n))
            if self.packing:
                self._rows = pack_rows([len(e.input_ids) for e in self.examples], order, self.seq_len)
            else:
                self._rows = [[i] for i in order]
            self._plan_epoch = epoch
        return self._rows

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches per epoch (a ragged last batch is dropped when training, kept in evaluation)."""
        rows, step = len(self.rows(self.epoch)), self.batch_size * self.world_size
        return rows // step if self.shuffle else math.ceil(rows / step)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current position to the end of this epoch; the next iteration starts the next."""
        while self.epochs is None or self.epoch < self.epochs:
            rows = self.rows(self.epoch)
            step = self.batch_size * self.world_size
            total = self.batches_per_epoch
            if total == 0:
                raise DataError(f"{len(rows)} training rows are fewer than one global batch of {step}")
            while self.index < total:
                global_rows = rows[self.index * step:(self.index + 1) * step]
                mine = global_rows[self.rank::self.world_size]
                self.index += 1
                if mine:
                    yield collate([[self.examples[i] for i in row] for row in mine], self.pad_id, self.packing)
            self.epoch, self.index = self.epoch + 1, 0
            return

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "packing": self.packing,
                "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_examples") != len(self.examples) or state.get("packing") != self.packing:
            raise DataError(f"the checkpoint's data position ({state.get('num_examples')} examples, packing="
                            f"{state.get('packing')}) does not match this data ({len(self.examples)} examples, "
                            f"packing={self.packing}); resume with the same data and data.packing")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


@torch.no_grad()
def sft_loss(model, batches) -> dict[str, float]:
    """Token-weighted mean cross-entropy over every labelled token of the batches (fp32), and its count."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(batch["input_ids"], document_ids=batch.get("document_ids"))
        labels = batch["labels"]
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return {"val_loss": total / count, "val_tokens": float(count)} if count else {}


# ----- NEFTune -------------------------------------------------------------------------------------------
def add_neftune(model, alpha: float):
    """Add NEFTune noise (Jain et al. 2023) to the input embeddings while the model trains; returns the
    hook handle (`.remove()` to undo).

    Uniform noise in ±alpha/sqrt(T·d) (T = sequence length, d = width) regularises SFT on small data. The
    hook is a no-op in eval mode, so validation, generation and saved weights are unaffected; the noise
    comes from torch's RNG, which checkpoints restore, so resumed runs stay exact."""
    embed = model.model.embed_tokens

    def hook(module, inputs, output):
        if not module.training or alpha <= 0:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return embed.register_forward_hook(hook)
