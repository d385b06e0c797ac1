"""The one exception type users see: a one-line message that names the problem and the fix."""


class OnpError(ValueError):
    """Bad input or a broken artifact. The message says what is wrong and how to fix it."""
