"""Parameter checks shared by every generator and CLI: one wording for every "bad parameter" error.

Errors name the parameter, the value and the allowed range, and are raised before elaboration (or,
for a CLI's output path, before anything is simulated: a long run must not end in a traceback that
loses its result).
"""

import os

__all__ = ["check_int", "check_output_path"]


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


def check_output_path(path, option):
    """Check that ``path`` (an output file named by CLI option ``option``) can be written.

    ``None`` (the option was not given) passes. The file itself is not created, so a run that fails
    later leaves nothing behind.

    Raises
    ------
    ValueError
        ``"{option} {path}: ..."`` naming why: the directory does not exist, is not writable, or the
        path is a directory or an existing file that cannot be overwritten.
    """
    if path is None:
        return
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a directory, not a file")
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: directory {folder} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ValueError(f"{option} {path}: file exists and is not writable")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: directory {folder} is not writable")
