"""User-facing error types.

Anything a user can cause (a bad config, a missing file, a model that does not fit) raises a
subclass of `FuyouError` whose message is one line naming the problem and the fix. The CLI turns it
into that line on stderr and exit code 2, with no traceback. Internal invariants use `assert`.
"""


class FuyouError(ValueError):
    """A mistake in the user's input; the message says what is wrong and how to fix it."""


class ConfigError(FuyouError):
    """A config file, key or value is wrong."""


class DataError(FuyouError):
    """A dataset, tokenizer or data file is missing or malformed."""


class ModelError(FuyouError):
    """A model directory or model description is missing or malformed."""
