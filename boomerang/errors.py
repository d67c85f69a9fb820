"""The one exception type users see: a message that says what went wrong and what to do."""


class BoomerangError(ValueError):
    """Bad input or an unusable environment, with an actionable message.

    A subclass of ValueError so that callers validating configuration can catch both alike.
    """
