"""The one exception type users see: a message that says what went wrong and what to do."""


class BoomerangError(ValueError):
    """Bad input or an unusable environment, with an actionable message.

    A subclass of ValueError so that callers validating configuration can catch both alike.
    """


def excerpt(value, limit: int = 80) -> str:
    """A value for an error message: its repr, cut to `limit` characters with what was left out counted.

    Messages quote what the user gave, never all of it: a megabyte typed into a form comes back as one line.
    """
    text = value if isinstance(value, str) and value.startswith(("'", '"')) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"
