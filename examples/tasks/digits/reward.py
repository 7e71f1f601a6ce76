"""The demo task's reward: 1 for exactly the right number, else 0."""


def exact_match(response: str, answer: str, source: str) -> float:
    return float(response.strip() == answer)
