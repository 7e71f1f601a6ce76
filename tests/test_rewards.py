"""Rewards: math verification, loading reward functions by spec (and checking their
signature), the one-call probe, the error-fraction stop, and the process-pool scorer surviving
reward functions that raise, return garbage, hang or end their process."""

import warnings
from pathlib import Path

import pytest
from math_verify.errors import TimeoutException

from sfpo_megatron.data import rewards
from sfpo_megatron.data.rewards import (
    REWARD_SIGNATURE,
    RewardComputer,
    RewardFailure,
    RewardTimeoutWarning,
    RewardWarning,
    check_error_fraction,
    load_reward_fn,
    math_reward,
    probe_reward_fn,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "custom_reward.py"
MIXED = f"{FIXTURE}:mixed"
CLEAN = {"reward_errors": 0, "reward_timeouts": 0}


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("The answer is \\boxed{42}.", "42", 1.0),
        ("\\boxed{0.75}", "3/4", 1.0),
        ("so it is \\boxed{3/4}", "0.75", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
        ("\\boxed{3/4}", "\\frac{3}{4}", 1.0),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),  # nested braces
        ("\\boxed{1+x^2}", "x^2+1", 1.0),
        ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0),  # escaped braces
        ("first \\boxed{1}, then \\boxed{2}", "2", 1.0),  # the last box counts
        ("first \\boxed{1}, then \\boxed{2}", "1", 0.0),
        ("\\boxed{5} and a cut-off \\boxed{\\frac{1", "5", 1.0),  # last complete box
        ("no box, but the answer is 0.75.", "3/4", 1.0),  # math_verify's own extraction
        ("\\boxed{43}", "42", 0.0),
        ("\\boxed{x^2-1}", "x^2+1", 0.0),
        ("I do not know.", "42", 0.0),
        ("", "42", 0.0),
        ("}{\\boxed{{{ \\frac{ $$ \\left(", "42", 0.0),
        ("\x00\ufffd\\\\\\" * 100, "1", 0.0),
    ],
)
def test_math_reward(response: str, answer: str, expected: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RewardWarning)  # a wrong answer is no reward error
        assert math_reward(response, answer, "math") == expected


def test_math_reward_warns_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.warns(RewardWarning, match="does not parse"):
        assert math_reward("\\boxed{1}", "", "math") == 0.0

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(rewards, "verify", fail)
    with pytest.warns(RewardWarning, match="RuntimeError: boom"):
        assert math_reward("\\boxed{1}", "1", "math") == 0.0

    def hang(*args: object, **kwargs: object) -> None:
        raise TimeoutException

    monkeypatch.setattr(rewards, "parse", hang)
    with pytest.warns(RewardTimeoutWarning):
        assert math_reward("\\boxed{1}", "1", "math") == 0.0


def test_load_reward_fn(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_reward_fn("math") is math_reward
    assert load_reward_fn(f"{FIXTURE}:length")("abc", "", "") == 3.0
    monkeypatch.syspath_prepend(str(REPO))
    assert load_reward_fn("tests.fixtures.custom_reward:length")("ab", "", "") == 2.0


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("no_such_module_4711:fn", ImportError, "cannot import 'no_such_module_4711'"),
        ("/no/such/file.py:fn", ImportError, "cannot import '/no/such/file.py'"),
        (f"{FIXTURE}:missing", AttributeError, "has no attribute 'missing'"),
        (f"{FIXTURE}:NOT_CALLABLE", TypeError, "is a int, not callable"),
        ("mathematics", ValueError, "not .math."),
        ("module:", ValueError, "not .math."),
        (f"{FIXTURE}:two_args", TypeError, r"two_args\(response: str, answer: str\) -> float"),
        (f"{FIXTURE}:keyword_source", TypeError, "too many positional arguments"),
    ],
)
def test_load_reward_fn_errors(spec: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        load_reward_fn(spec)
    assert repr(spec) in str(info.value)
    if "cannot be called" in str(info.value):
        assert f"cannot be called as {REWARD_SIGNATURE}" in str(info.value)


def test_signatures_that_take_three_positional_arguments_load() -> None:
    assert load_reward_fn(f"{FIXTURE}:star_args")("r", "a", "s") == 3.0
    assert load_reward_fn(f"{FIXTURE}:with_default")("r", "a", "s") == 2.0


@pytest.mark.parametrize(
    "name, problem",
    [
        ("raising", "raised ValueError: this reward function always fails"),
        ("nan", "returned nan, not a finite number"),
        ("not_a_number", "returned '1.0', not a finite number"),
        ("slow", "ran past 0.2 s"),
        ("length", None),
    ],
)
def test_probe_calls_the_function_once_as_the_trainer_will(name: str, problem: str) -> None:
    fn = load_reward_fn(f"{FIXTURE}:{name}")
    assert probe_reward_fn(fn, 0.2, "42", "src") == problem


def test_probe_of_math_without_a_reference_answer_fails() -> None:
    assert probe_reward_fn(math_reward, 5.0, "3/4", "math") is None
    problem = probe_reward_fn(math_reward, 5.0, "", "math")
    assert problem == "warned: ValueError: the reference answer '' does not parse"


@pytest.mark.parametrize(
    "errors, samples, max_fraction, stops",
    [
        (8, 8, 1.0, True),
        (7, 8, 1.0, False),
        (4, 8, 0.5, True),
        (3, 8, 0.5, False),
        (1, 8, 0.0, True),
        (0, 8, 0.0, False),
        (0, 0, 0.0, False),
    ],
)
def test_error_fraction_stops_the_run(errors, samples, max_fraction, stops) -> None:
    if not stops:
        check_error_fraction(errors, samples, max_fraction, "x.py:fn")
        return
    with pytest.raises(RewardFailure) as info:
        check_error_fraction(errors, samples, max_fraction, "x.py:fn")
    message = str(info.value)
    assert f"{errors} of {samples} samples" in message and "reward.fn='x.py:fn'" in message
    assert f"reward.max_error_fraction={max_fraction:g}" in message


@pytest.mark.parametrize("workers", [0, 2])
def test_misbehaving_functions_score_zero_and_are_counted(workers: int) -> None:
    responses = ["a", "raising", "bb", "nan", "ccc", "slow", "not_a_number", "dddd"]
    with RewardComputer(MIXED, workers=workers, timeout_s=0.5) as computer:
        scores, stats = computer.score(responses, ["x"] * 8, ["s"] * 8)
        assert scores == [1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 0.0, 4.0]
        assert stats == {"reward_errors": 3, "reward_timeouts": 1}
        assert computer.score(["abc"], ["x"], ["s"]) == ([3.0], CLEAN)


def test_dead_and_hung_workers_are_replaced() -> None:
    # exit_worker ends its process, likely while a nap runs in the other worker: both re-run
    # alone, and only the culprit is blamed. stuck ignores the alarm, so its worker is killed.
    responses = ["nap", "exit_worker", "a", "stuck", "bb"]
    with RewardComputer(MIXED, workers=2, timeout_s=1.0) as computer:
        computer.score(["nap"] * 2, ["x"] * 2, ["s"] * 2)  # start both workers
        scores, stats = computer.score(responses, ["x"] * 5, ["s"] * 5)
        assert scores == [3.0, 0.0, 1.0, 0.0, 2.0]
        assert stats == {"reward_errors": 1, "reward_timeouts": 1}
        assert computer.score(["ab"] * 3, ["x"] * 3, ["s"] * 3) == ([2.0] * 3, CLEAN)


def test_math_in_pool_keeps_order() -> None:
    responses = ["\\boxed{0.75}", "\\boxed{2}", "nothing", "\\boxed{\\frac{1}{2}}"] * 3
    answers = ["3/4", "3", "1", "0.5"] * 3
    with RewardComputer("math", workers=2) as computer:
        scores, stats = computer.score(responses, answers, ["math"] * 12)
    assert scores == [1.0, 0.0, 0.0, 1.0] * 3
    assert stats == CLEAN


def test_reward_computer_edge_cases() -> None:
    with RewardComputer(MIXED, workers=2) as computer:
        assert computer.score([], [], []) == ([], CLEAN)
    with pytest.raises(ImportError, match="no_such_module_4711"):
        RewardComputer("no_such_module_4711:fn")
    with pytest.raises(ValueError, match="workers"):
        RewardComputer("math", workers=-1)
    with pytest.raises(ValueError, match="2 responses, 1 answers"):
        RewardComputer("math", workers=0).score(["a", "b"], ["a"], ["s"])
