"""User-facing errors. Each message says what went wrong and how to fix it."""


class KvbenchError(Exception):
    """A user-facing error whose message says how to fix it."""
