"""The user-error type of `offload`.

`offload` sits below `fuyou` and must not import it, so it has its own subclass of `ValueError`; the
CLI catches `ValueError` subclasses the same way it catches `fuyou.errors.FuyouError`. Every message
is one line that names the problem and the fix.
"""


class OffloadError(ValueError):
    """A request the store cannot serve (no space, over a memory cap, corrupted data); the message
    says what is wrong and how to fix it."""
