"""The errors every layer raises and the CLI maps to exit codes (ConfigError, DataError and
CheckpointError: 2), kept at the bottom so that no layer imports another for them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key and the rule."""


class RolloutError(RuntimeError):
    """A rollout server failed, timed out or answered with something unusable."""


class CheckpointError(ValueError):
    """The checkpoint does not match its config, or a file is unreadable; names what and where."""


class DataError(ValueError):
    """A prompt file or prompt set that cannot be used as given."""
