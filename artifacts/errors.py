"""The one error type both halves raise for bad input.

A LarsError carries a one-line message that names the thing that is wrong and the fix. The CLIs print it (no
traceback) and exit non-zero; library users catch it like any exception.
"""


class LarsError(Exception):
    """Bad input: a missing or corrupt file, a malformed data line, an unsupported model or op."""


class BundleError(LarsError):
    """The bundle directory is missing, incomplete, corrupt or of another format version."""
