"""Prompt loading, length filtering, per-epoch shuffling, exact resume and the chat encoder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sfpo_megatron.common.errors import DataError
from sfpo_megatron.data.prompts import PromptRecord, PromptSet, chat_template_encoder, load_prompts


def write_jsonl(path: Path, lines: list[str | dict | list]) -> str:
    """Write raw strings as given and everything else as JSON, one per line."""
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return str(path)


def records(n: int) -> list[PromptRecord]:
    return [PromptRecord(f"q{i}", str(i), "t", i + 1, "t.jsonl") for i in range(n)]


def encode_len(record: PromptRecord) -> list[int]:
    """Prompt ``q<i>`` encodes to ``i + 1`` tokens, so lengths are easy to control."""
    return list(range(int(record.answer) + 1))


def indices(batch: list) -> list[int]:
    return [i for i, _, _ in batch]


# ---------------------------------------------------------------- loading


def test_load_jsonl_fields_and_counts(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(
        tmp_path / "gsm.jsonl",
        [
            {"prompt": "1+1?", "answer": 2, "data_source": "arith"},
            "",  # blank lines are not rows but still count for line numbers
            {"prompt": chat, "answer": "4", "extra": [1]},
            {"prompt": "float", "answer": 0.5},
        ],
    )
    recs, counts = load_prompts([path])
    assert counts == {"rows_read": 3, "malformed_skipped": 0}
    assert [r.row for r in recs] == [1, 3, 4]
    assert recs[0] == PromptRecord("1+1?", "2", "arith", 1, path)
    assert recs[1].prompt == chat and recs[1].source == "gsm"
    assert recs[2].answer == "0.5"


@pytest.mark.parametrize(
    "answer, text",
    [(4.0, "4"), (-0.0, "0"), (0.5, "0.5"), (1 / 3, "0.3333333333333333"), (1e20, "1e+20")]
    + [(7, "7"), (2**60, str(2**60)), ("4.0", "4.0")],
)
def test_numeric_answers_become_their_plain_text(tmp_path, answer, text):
    """An integral float (a Parquet float column, JSON 4.0) is written as the integer, any
    other float as its shortest repr; strings stay as they are."""
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "q", "answer": answer}])
    assert load_prompts([path])[0][0].answer == text


def test_a_row_without_an_answer_is_malformed_unless_not_required(tmp_path):
    lines = [{"prompt": "a", "answer": "1"}, {"prompt": "b"}, {"prompt": "c", "answer": None}]
    lines.append('{"prompt": "d", "answer": NaN}')
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_prompts([path], answer_key="answer")
    assert f"{path}, line 2: answer 'answer' is missing or null" in str(err.value)
    assert "data.require_answer=false" in str(err.value)
    recs, counts = load_prompts([path], skip_malformed=True)
    assert [r.prompt for r in recs] == ["a"] and counts["malformed_skipped"] == 3
    recs, _ = load_prompts([path], require_answer=False)
    assert [r.answer for r in recs] == ["1", "", "", ""]
    with pytest.raises(DataError, match="line 1: answer 'solution' is missing"):
        load_prompts([path], answer_key="solution")  # a misspelled key


def test_dotted_keys_reach_nested_fields(tmp_path):
    row = {"question": "x?", "reward_model": {"ground_truth": "7"}, "data_source": "m"}
    path = write_jsonl(tmp_path / "v.jsonl", [row])
    recs, _ = load_prompts([path], prompt_key="question", answer_key="reward_model.ground_truth")
    assert (recs[0].prompt, recs[0].answer) == ("x?", "7")


MALFORMED = [
    ('{"prompt": "unterminated', "invalid JSON"),
    ("[1, 2]", "must be an object, got list"),
    ({"answer": "1"}, "'prompt' is missing"),
    ({"prompt": "   "}, "'prompt' is empty"),
    ({"prompt": []}, "empty list of messages"),
    ({"prompt": 17}, "got int"),
    ({"prompt": [{"role": "user"}]}, "message 0 needs a string 'role'"),
    ({"prompt": ["hi"]}, "message 0 must be an object"),
    ({"prompt": "ok", "answer": [1]}, "'answer' must be a string or a number, got list"),
    ({"prompt": "ok", "answer": True}, "got bool"),
    ({"prompt": "ok", "data_source": 3}, "'data_source' must be a string"),
    ({"prompt": "ok"}, "'answer' is missing or null"),
    ({"prompt": "ok", "answer": None}, "'answer' is missing or null"),
    ({"prompt": "ok", "answer": float("inf")}, "'answer' is not finite"),
]


@pytest.mark.parametrize("bad,message", MALFORMED)
def test_malformed_row_names_file_and_line(tmp_path, bad, message):
    good = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    path = write_jsonl(tmp_path / "d.jsonl", [*good, bad])
    with pytest.raises(DataError, match="line 3") as err:
        load_prompts([path])
    assert path in str(err.value) and message in str(err.value)


def test_skip_malformed_counts_rows(tmp_path):
    lines = [{"prompt": "good", "answer": "1"}, *[bad for bad, _ in MALFORMED]]
    lines.append({"prompt": "also good", "answer": "2"})
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    recs, counts = load_prompts([path], skip_malformed=True)
    assert [r.prompt for r in recs] == ["good", "also good"]
    assert [r.row for r in recs] == [1, len(lines)]
    assert counts == {"rows_read": len(lines), "malformed_skipped": len(MALFORMED)}


def test_invalid_utf8_names_the_line_and_the_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    first = b'{"prompt": "a", "answer": "1"}\n'
    path.write_bytes(first + b'{"prompt": "\xc3\xa9\xff", "answer": "1"}\n')
    with pytest.raises(DataError) as err:
        load_prompts([str(path)])
    at = len('{"prompt": "') + 2  # after the two bytes of the valid "\xc3\xa9"
    assert str(err.value) == (
        f"{path}, line 2: not UTF-8: byte 0xff at byte {at} of the line, "
        f"{len(first) + at} of the file"
    )
    assert "invalid JSON" not in str(err.value)


def test_empty_inputs_are_errors(tmp_path):
    with pytest.raises(DataError, match="no prompt files"):
        load_prompts([])
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty.jsonl: no usable prompt rows"):
        load_prompts([empty])
    bad = write_jsonl(tmp_path / "bad.jsonl", ["nope", {"prompt": ""}])
    with pytest.raises(DataError, match=r"bad.jsonl: no usable prompt rows \(2 read"):
        load_prompts([bad], skip_malformed=True)
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "x", "answer": "1"}])
    with pytest.raises(DataError, match="empty.jsonl"):  # one empty file among good ones
        load_prompts([good, empty])


def test_missing_and_unsupported_files(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not found: .*nope.jsonl"):
        load_prompts([missing])
    csv = tmp_path / "d.csv"
    csv.write_text("prompt\nx\n")
    with pytest.raises(DataError, match="d.csv: unsupported prompt file type '.csv'"):
        load_prompts([str(csv)])


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"irrelevant")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(DataError, match=r"d.parquet: .*pip install pyarrow"):
        load_prompts([str(path)])


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed: Parquet is optional")
    import pyarrow.parquet as pq

    rows = [
        {"prompt": [{"role": "user", "content": "1+1?"}], "answer": 2, "data_source": "a"},
        {"prompt": [{"role": "user", "content": "2+2?"}], "answer": 4, "data_source": None},
    ]
    path = str(tmp_path / "math.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    recs, counts = load_prompts([path])
    assert counts == {"rows_read": 2, "malformed_skipped": 0}
    assert recs[0] == PromptRecord([{"role": "user", "content": "1+1?"}], "2", "a", 1, path)
    assert (recs[1].answer, recs[1].source, recs[1].row) == ("4", "math", 2)

    rows[1]["prompt"] = []
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"math.parquet, row 2: .*empty list"):
        load_prompts([path])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        load_prompts([str(tmp_path / "junk.parquet")])


def test_parquet_float_column_answers(tmp_path):
    """A float column (what pandas writes for integers with a gap) gives "4", not "4.0"; a
    NaN in it is a missing answer."""
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed: Parquet is optional")
    import pyarrow.parquet as pq

    path = str(tmp_path / "f.parquet")
    table = pa.table({"prompt": ["a", "b", "c"], "answer": pa.array([4.0, 2.5, 1.0])})
    pq.write_table(table, path)
    assert table.schema.field("answer").type == pa.float64()
    assert [r.answer for r in load_prompts([path])[0]] == ["4", "2.5", "1"]
    table = table.set_column(1, "answer", pa.array([4.0, float("nan"), None]))
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"f.parquet, row 2: answer 'answer' is missing or null"):
        load_prompts([path])
    recs, counts = load_prompts([path], skip_malformed=True)
    assert [r.answer for r in recs] == ["4"] and counts["malformed_skipped"] == 2


# ---------------------------------------------------------------- PromptSet


def test_length_filter_is_exact_and_counted():
    ps = PromptSet(records(10), encode_len, max_prompt_length=4, seed=0)
    assert len(ps) == 4 and ps.dropped_too_long == 6
    assert all(len(ids) <= 4 for ids in ps.token_ids)
    assert [r.prompt for r in ps.records] == ["q0", "q1", "q2", "q3"]


def test_all_prompts_too_long_is_an_error():
    with pytest.raises(DataError, match="all 5 prompts are longer than max_prompt_length=1"):
        PromptSet(records(6)[1:], encode_len, max_prompt_length=1, seed=0)
    with pytest.raises(DataError, match="max_prompt_length must be >= 1"):
        PromptSet(records(5), encode_len, max_prompt_length=0, seed=0)


def test_a_prompt_without_tokens_names_its_row():
    rows = records(4)
    with pytest.raises(DataError, match=rf"{rows[2].where}: the prompt encodes to no tokens"):
        PromptSet(rows, lambda r: [] if r is rows[2] else encode_len(r), 64, seed=0)


def test_empty_prompt_set_and_bad_batch_size():
    with pytest.raises(DataError, match="empty"):
        PromptSet([], encode_len, max_prompt_length=8, seed=0)
    with pytest.raises(DataError, match="batch_size"):
        PromptSet(records(3), encode_len, 8, seed=0).next_batch(0)


def test_batches_carry_tokens_and_records():
    ps = PromptSet(records(6), encode_len, 8, seed=3)
    for i, ids, rec in next(ps.batches(4)):
        assert ps.records[i] is rec and ids == encode_len(rec)


def test_order_is_a_seeded_permutation_per_epoch():
    n = 12
    a = PromptSet(records(n), encode_len, 64, seed=5)
    b = PromptSet(records(n), encode_len, 64, seed=5)
    epochs_a = [indices(a.next_batch(n)) for _ in range(3)]
    epochs_b = [indices(b.next_batch(n)) for _ in range(3)]
    assert epochs_a == epochs_b
    assert all(sorted(e) == list(range(n)) for e in epochs_a)
    assert epochs_a[0] != epochs_a[1] != epochs_a[2]
    other = PromptSet(records(n), encode_len, 64, seed=6)
    assert indices(other.next_batch(n)) == epochs_a[1]  # epoch e is seeded with seed + e
    assert a.epoch == 3


def test_with_seed_reorders_without_encoding_again():
    calls = []

    def counting(record):
        calls.append(record)
        return encode_len(record)

    base = PromptSet(records(9), counting, 64, seed=5)
    base.next_batch(4)
    other = base.with_seed(7)
    assert len(calls) == 9 and other.token_ids is base.token_ids
    fresh = PromptSet(records(9), encode_len, 64, seed=7)
    assert indices(other.next_batch(12)) == indices(fresh.next_batch(12))
    assert base.state_dict()["position"] == 4  # the original cursor did not move


def test_dataset_smaller_than_one_batch_wraps_into_next_epochs():
    ps = PromptSet(records(3), encode_len, 8, seed=1)
    full = PromptSet(records(3), encode_len, 8, seed=1)
    stream = [i for _ in range(6) for i in indices(full.next_batch(3))]
    first = ps.next_batch(8)
    assert len(first) == 8 and indices(first) == stream[:8]  # prompts repeat within a batch
    assert (ps.epoch, ps.state_dict()["position"]) == (2, 2)
    assert indices(ps.next_batch(8)) == stream[8:16]


def test_batches_cross_epoch_boundaries_without_gaps():
    ps = PromptSet(records(7), encode_len, 64, seed=2)
    full = PromptSet(records(7), encode_len, 64, seed=2)
    stream = [i for _ in range(4) for i in indices(full.next_batch(7))]
    got = [i for batch, _ in zip(ps.batches(4), range(7), strict=False) for i in indices(batch)]
    assert got == stream


@pytest.mark.parametrize("resume_after", [0, 1, 3, 4, 10, 11])
def test_resume_gives_identical_following_batches(resume_after):
    # 10 prompts, batches of 3: batch 4 straddles an epoch; after 10 batches (30 prompts)
    # the cursor sits exactly on an epoch boundary.
    make = lambda: PromptSet(records(10), encode_len, 64, seed=42)  # noqa: E731
    it = make().batches(3)
    reference = [indices(next(it)) for _ in range(resume_after + 5)]

    first = make()
    it = first.batches(3)
    for _ in range(resume_after):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    if resume_after == 10:
        assert (state["epoch"], state["position"]) == (3, 0)
    resumed = make()
    resumed.load_state_dict(state)
    it = resumed.batches(3)
    assert [indices(next(it)) for _ in range(5)] == reference[resume_after:]


def test_load_state_dict_rejects_foreign_cursors():
    ps = PromptSet(records(5), encode_len, 64, seed=1)
    good = ps.state_dict()
    assert good == {"epoch": 0, "position": 0, "seed": 1, "num_prompts": 5}
    with pytest.raises(DataError, match="seed 2, not 1"):
        ps.load_state_dict({**good, "seed": 2})
    with pytest.raises(DataError, match="saved for 6 prompts, this set has 5"):
        ps.load_state_dict({**good, "num_prompts": 6})
    with pytest.raises(DataError, match="invalid data cursor"):
        ps.load_state_dict({**good, "position": 5})
    with pytest.raises(DataError, match="lacks"):
        ps.load_state_dict({"epoch": 0, "position": 0})


# ---------------------------------------------------------------- chat template encoder

VOCAB = ["[UNK]", "user:", "system:", "assistant:", "what", "is", "1+1?", "be", "brief"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def save_tokenizer(directory: Path, chat_template: str | None) -> str:
    """A whitespace word-level tokenizer built and saved locally (no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return str(directory)


def ids(*words: str) -> list[int]:
    return [VOCAB.index(w) for w in words]


def test_chat_template_encoder_uses_the_tokenizer_template(tmp_path):
    pytest.importorskip("transformers")
    encode = chat_template_encoder(save_tokenizer(tmp_path, TEMPLATE))
    plain = PromptRecord("what is 1+1?", "2", "s", 1, "f.jsonl")
    assert encode(plain) == ids("user:", "what", "is", "1+1?", "assistant:")
    chat = PromptRecord(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}],
        "2",
        "s",
        2,
        "f.jsonl",
    )
    assert encode(chat) == ids("system:", "be", "brief", "user:", "1+1?", "assistant:")
    ps = PromptSet([plain, chat], encode, max_prompt_length=5, seed=0)
    assert ps.dropped_too_long == 1 and ps.records == [plain]


def test_chat_template_encoder_without_template(tmp_path):
    pytest.importorskip("transformers")
    directory = save_tokenizer(tmp_path, None)
    with pytest.raises(DataError, match="no chat template.*use_chat_template=False"):
        chat_template_encoder(directory)
    encode = chat_template_encoder(directory, use_chat_template=False)
    assert encode(PromptRecord("what is 1+1?", "2", "s", 1, "f.jsonl")) == ids("what", "is", "1+1?")
    chat = PromptRecord([{"role": "user", "content": "hi"}], "", "s", 4, "f.jsonl")
    with pytest.raises(DataError, match="f.jsonl, line 4: chat messages need a chat template"):
        encode(chat)
    with pytest.raises(DataError, match="tokenizer directory not found"):
        chat_template_encoder(str(tmp_path / "missing"))


def test_warm_start_refuses_an_answer_longer_than_a_response():
    from sfpo_megatron.algorithms.warm_start import answer_batch

    record = PromptRecord("q", "a b c", "s", 3, "train.jsonl")
    encode = lambda text: [5] * len(text.split())  # noqa: E731
    batch = answer_batch([(0, [1, 2], record)], encode, eos=9, max_response_length=4)
    assert batch.tokens.tolist() == [[1, 2, 5, 5, 5, 9]]
    assert batch.response_mask.tolist() == [[False, False, True, True, True, True]]
    with pytest.raises(
        DataError,
        match=r"train.jsonl, line 3: the warm start's answer \+ eos "
        r"is 4 tokens, over rollout.max_response_length=3",
    ):
        answer_batch([(0, [1, 2], record)], encode, eos=9, max_response_length=3)
