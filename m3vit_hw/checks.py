"""Parameter checks shared by every generator: one wording for every "bad parameter" error.

Errors name the parameter, the value and the allowed range, and are raised before elaboration.
"""

__all__ = ["check_int"]


def check_int(name, value, minimum, maximum=None):
    """Require an ``int`` (not ``bool``) in ``[minimum, maximum]`` (no upper bound if ``maximum`` is None).

    Raises
    ------
    TypeError
        ``"{name} must be an integer, not {value!r}"``
    ValueError
        ``"{name} must be an integer >= {minimum}, not {value}"`` or
        ``"{name} must be in [{minimum}, {maximum}], not {value}"``
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if maximum is None:
        if value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, not {value}")
    elif not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], not {value}")
