"""Argument checks shared by the modules: one wording for every error."""


def check_positive_int(owner: str, name: str, value) -> None:
    """Raise ValueError unless ``value`` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
