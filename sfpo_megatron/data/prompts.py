"""Prompt sets for RL: JSONL / Parquet loading, length filtering, resumable per-epoch shuffling.

Loading is strict by default: a malformed row is a :class:`DataError` naming the file and row,
because silently training on a subset of the data is worse than stopping. Tokenisation is a
caller-supplied function, so this module needs no tokenizer (see :func:`chat_template_encoder`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sfpo_megatron.common.errors import DataError

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with its reference answer and where it came from (for error messages/metrics)."""

    prompt: Prompt
    """Plain text, or chat messages ``[{"role": ..., "content": ...}, ...]``."""
    answer: str
    """Reference answer; ``""`` when the row has none (only with ``require_answer=False``)."""
    source: str
    """Data-source tag (per-source metrics); the file stem when the row has none."""
    row: int
    """1-based line (JSONL) or row (Parquet) number in ``path``."""
    path: str

    @property
    def where(self) -> str:
        """``"file, line N"`` (JSONL) or ``"file, row N"`` (Parquet), for error messages."""
        return f"{self.path}, {_row_unit(self.path)} {self.row}"


Encoder = Callable[[PromptRecord], list[int]]
BatchItem = tuple[int, list[int], PromptRecord]


def _row_unit(path: str) -> str:
    return "line" if path.lower().endswith(".jsonl") else "row"


def _lookup(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, following dots into nested objects (e.g. ``reward_model.ground_truth``)."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _parse_prompt(value: Any, key: str) -> Prompt:
    """Validate a prompt; chat messages keep only role and content (Parquet pads other fields)."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"prompt {key!r} is empty")
        return value
    if value is None:
        raise ValueError(f"prompt {key!r} is missing")
    if not isinstance(value, list):
        raise ValueError(
            f"prompt {key!r} must be a string or a list of messages, got {_kind(value)}"
        )
    if not value:
        raise ValueError(f"prompt {key!r} is an empty list of messages")
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ValueError(f"prompt message {i} must be an object, got {_kind(msg)}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise ValueError(f"prompt message {i} needs a string 'role' and a string 'content'")
        messages.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in messages):
        raise ValueError(f"prompt {key!r} has only empty messages")
    return messages


def _parse_answer(value: Any, key: str, required: bool) -> str:
    """The reference answer as the string a verifier compares. Numbers in the file become
    text: an integer, or an integral float (Parquet float columns, JSON ``4.0``), as ``"4"``;
    any other float as its shortest repr (``"0.5"``). A missing, null or NaN answer is an
    error unless ``required`` is false (then ``""``)."""
    if isinstance(value, float) and math.isnan(value):
        value = None
    if value is None:
        if required:
            raise ValueError(
                f"answer {key!r} is missing or null (data.answer_key names the field; "
                "data.require_answer=false accepts rows without one)"
            )
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"answer {key!r} is not finite: {value}")
            if value.is_integer() and abs(value) < 2**53:  # exactly an integer
                return str(int(value))
            return repr(value)
        return str(value)
    raise ValueError(f"answer {key!r} must be a string or a number, got {_kind(value)}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed JSON or a ValueError saying why not)``; blank lines are
    not rows. A line that is not UTF-8 is named by its first bad byte and where it is."""
    offset = 0  # of the line in the file, in bytes
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
                if text.strip():
                    yield lineno, json.loads(text)
            except UnicodeDecodeError as exc:
                where = f"byte {exc.start} of the line, {offset + exc.start} of the file"
                yield lineno, ValueError(f"not UTF-8: byte 0x{raw[exc.start]:02x} at {where}")
            except json.JSONDecodeError as exc:
                yield lineno, ValueError(f"invalid JSON: {exc}")
            offset += len(raw)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    yield from enumerate(rows, start=1)


def load_prompts(
    paths: list[str],
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    source_key: str = "data_source",
    skip_malformed: bool = False,
    require_answer: bool = True,
) -> tuple[list[PromptRecord], dict[str, int]]:
    """Read prompt records from ``.jsonl`` / ``.parquet`` files, in order.

    Keys may be dotted paths into nested objects. Returns the records and the counts
    ``{"rows_read", "malformed_skipped"}``. An empty file list, or a file without one usable
    row, is an error: an empty dataset must never silently train on nothing. A row without an
    answer is malformed unless ``require_answer`` is false (reward functions that need no
    reference).
    """
    if not paths:
        raise DataError("no prompt files given")
    records: list[PromptRecord] = []
    counts = {"rows_read": 0, "malformed_skipped": 0}
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"prompt file not found: {name}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = _jsonl_rows(path)
        elif suffix == ".parquet":
            rows = _parquet_rows(path)
        else:
            raise DataError(f"{name}: unsupported prompt file type {suffix!r} (.jsonl, .parquet)")
        read = kept = 0
        for row_no, row in rows:
            read += 1
            try:
                if isinstance(row, ValueError):
                    raise row
                if not isinstance(row, dict):
                    raise ValueError(f"row must be an object, got {_kind(row)}")
                source = _lookup(row, source_key)
                if source is not None and not isinstance(source, str):
                    raise ValueError(f"{source_key!r} must be a string, got {_kind(source)}")
                record = PromptRecord(
                    prompt=_parse_prompt(_lookup(row, prompt_key), prompt_key),
                    answer=_parse_answer(_lookup(row, answer_key), answer_key, require_answer),
                    source=source or path.stem,
                    row=row_no,
                    path=name,
                )
            except ValueError as exc:
                if not skip_malformed:
                    raise DataError(f"{name}, {_row_unit(name)} {row_no}: {exc}") from None
                counts["malformed_skipped"] += 1
                continue
            records.append(record)
            kept += 1
        counts["rows_read"] += read
        if kept == 0:
            raise DataError(f"{name}: no usable prompt rows ({read} read, all malformed or none)")
    return records, counts


class PromptSet:
    """Tokenised prompts served in fixed-size batches, reshuffled each epoch, resumable exactly.

    Epoch ``e`` visits the prompts in ``torch.randperm`` order drawn from a generator seeded
    with ``seed + e``, so the order depends only on (seed, epoch, dataset). A batch that runs
    past the end of an epoch continues in the next epoch's order; with fewer prompts than
    ``batch_size`` a prompt can therefore appear more than once in one batch. The cursor is
    shared by every :meth:`batches` iterator: use one consumer at a time.
    """

    def __init__(
        self, records: list[PromptRecord], encode: Encoder, max_prompt_length: int, seed: int
    ) -> None:
        if max_prompt_length < 1:
            raise DataError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        if not records:
            raise DataError("the prompt set is empty")
        self.seed = seed
        self.max_prompt_length = max_prompt_length
        # Encode everything once up front: the length filter is then exact, not estimated.
        self.records: list[PromptRecord] = []
        self.token_ids: list[list[int]] = []
        for record in records:
            ids = [int(t) for t in encode(record)]
            if not ids:
                raise DataError(
                    f"{record.where}: the prompt encodes to no tokens (does the tokenizer "
                    "know its words?)"
                )
            if len(ids) <= max_prompt_length:
                self.records.append(record)
                self.token_ids.append(ids)
        self.dropped_too_long = len(records) - len(self.records)
        if not self.records:
            raise DataError(
                f"all {len(records)} prompts are longer than max_prompt_length={max_prompt_length}"
            )
        self._rewind()

    def _rewind(self) -> None:
        self._epoch, self._position = 0, 0
        self._order_epoch, self._order = -1, []

    def with_seed(self, seed: int) -> PromptSet:
        """The same encoded prompts in another order with a cursor of its own (nothing is
        encoded again)."""
        other = copy.copy(self)
        other.seed = seed
        other._rewind()
        return other

    def __len__(self) -> int:
        return len(self.records)

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + self._epoch)
            self._order = torch.randperm(len(self), generator=gen).tolist()
            self._order_epoch = self._epoch
        return self._order

    def next_batch(self, batch_size: int) -> list[BatchItem]:
        """The next ``batch_size`` prompts as ``(index, token_ids, record)``; moves the cursor."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        batch: list[BatchItem] = []
        while len(batch) < batch_size:
            order = self._epoch_order()
            stop = min(len(order), self._position + batch_size - len(batch))
            batch.extend(
                (i, self.token_ids[i], self.records[i]) for i in order[self._position : stop]
            )
            self._position = stop
            if self._position == len(order):
                self._epoch, self._position = self._epoch + 1, 0
        return batch

    def batches(self, batch_size: int) -> Iterator[list[BatchItem]]:
        """Endless batches; :meth:`state_dict` after a batch resumes right after it."""
        while True:
            yield self.next_batch(batch_size)

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, int]:
        """The cursor a checkpoint saves (``num_prompts`` guards against a changed dataset)."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_prompts": len(self),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved cursor; it must come from the same seed and dataset size."""
        missing = {"epoch", "position", "seed", "num_prompts"} - state.keys()
        if missing:
            raise DataError(f"data cursor lacks {sorted(missing)}")
        if state["seed"] != self.seed:
            raise DataError(f"data cursor was saved with seed {state['seed']}, not {self.seed}")
        if state["num_prompts"] != len(self):
            raise DataError(
                f"data cursor was saved for {state['num_prompts']} prompts, this set has "
                f"{len(self)} (different files or max_prompt_length?)"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self):
            raise DataError(f"invalid data cursor: epoch={epoch}, position={position}")
        self._epoch, self._position = epoch, position


def load_tokenizer(tokenizer_dir: str) -> Any:
    """The transformers tokenizer saved in ``tokenizer_dir`` (local files only)."""
    from transformers import AutoTokenizer

    if not Path(tokenizer_dir).is_dir():
        raise DataError(f"tokenizer directory not found: {tokenizer_dir}")
    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def chat_template_encoder(tokenizer: Any, use_chat_template: bool = True) -> Encoder:
    """An encoder with the tokenizer's own chat template (a tokenizer or its directory).

    Plain-string prompts become one user message; the generation prompt is appended so the
    policy answers as the assistant. ``use_chat_template=False`` encodes plain text as is (for
    base models without a template).
    """
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(str(tokenizer))
    if use_chat_template and not tokenizer.chat_template:
        raise DataError(
            f"the tokenizer in {tokenizer.name_or_path} has no chat template; "
            "set use_chat_template=False to encode prompts as plain text"
        )

    def encode(record: PromptRecord) -> list[int]:
        if use_chat_template:
            messages = record.prompt
            if isinstance(messages, str):
                messages = [{"role": "user", "content": messages}]
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            return list(ids)
        if not isinstance(record.prompt, str):
            raise DataError(
                f"{record.where}: chat messages need a chat template "
                "(use_chat_template=False encodes plain-text prompts only)"
            )
        return list(tokenizer.encode(record.prompt))

    return encode
