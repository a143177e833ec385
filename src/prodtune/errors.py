"""The one exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input or settings: the message says what was wrong, the value, and the fix."""
