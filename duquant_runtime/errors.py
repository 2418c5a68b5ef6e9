"""Exception types shared by the runtime and the compiler.

Every expected failure (bad input, corrupt pack, wrong options) raises a subclass of
`DuquantError` whose message is one self-contained line; command-line tools print it and exit
non-zero instead of showing a traceback.
"""


class DuquantError(Exception):
    """Base class of every error this project raises on purpose."""


class PackError(DuquantError):
    """A pack directory is missing, incomplete, corrupt, of an unknown version or inconsistent."""
