"""The one output path (sfpo_megatron.common.log): INFO to stdout as bare lines, warnings to
stderr, global rank 0 speaking unless a record is an error, marked EVERY_RANK, or
SFPO_LOG_ALL_RANKS=1."""

from __future__ import annotations

import logging

import pytest

from sfpo_megatron.common.log import ALL_RANKS_ENV, EVERY_RANK, configure

log = logging.getLogger("sfpo_megatron.test_log")


def speak() -> None:
    log.info("progress")
    log.warning("careful")
    log.warning("mine only", extra=EVERY_RANK)
    log.error("failed")


@pytest.fixture
def rank(monkeypatch, cli_logging):
    def set_rank(value: int, all_ranks: bool = False) -> None:
        monkeypatch.setenv("RANK", str(value))
        monkeypatch.setenv("WORLD_SIZE", "2")
        if all_ranks:
            monkeypatch.setenv(ALL_RANKS_ENV, "1")
        configure()  # reads SFPO_LOG_ALL_RANKS

    return set_rank


def test_rank_zero_prints_info_bare_to_stdout_and_warnings_to_stderr(rank, capsys):
    rank(0)
    speak()
    out, err = capsys.readouterr()
    assert out == "progress\n"
    assert err.splitlines() == [
        "WARNING sfpo_megatron.test_log: careful",
        "WARNING sfpo_megatron.test_log: mine only",
        "ERROR sfpo_megatron.test_log: failed",
    ]


def test_other_ranks_print_only_errors_and_their_own_events(rank, capsys):
    rank(1)
    speak()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "WARNING sfpo_megatron.test_log: mine only",
        "ERROR sfpo_megatron.test_log: failed",
    ]


def test_all_ranks_env_lets_every_rank_speak(rank, capsys):
    rank(1, all_ranks=True)
    speak()
    out, err = capsys.readouterr()
    assert out == "progress\n" and len(err.splitlines()) == 3


def test_configure_twice_does_not_print_twice(rank, capsys):
    rank(0)
    configure()
    log.info("once")
    assert capsys.readouterr().out == "once\n"


def test_other_libraries_speak_from_warning_on(rank, capsys):
    rank(0)
    logging.getLogger("some.library").info("chatter")
    logging.getLogger("some.library").warning("listen")
    out, err = capsys.readouterr()
    assert out == "" and err == "WARNING some.library: listen\n"
