"""How the data's errors read: a library's message on one line, a long list cut short."""


def one_line(error: Exception) -> str:
    """The error's text with its line breaks and runs of spaces made single spaces."""
    return " ".join(str(error).split())


def listed(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, then "..." where there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
