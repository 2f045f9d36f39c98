"""The one error type both halves raise for bad input.

A LarsError carries a one-line message that names the thing that is wrong and the fix. The CLIs print it (no
traceback) and exit non-zero; library users catch it like any exception.
"""


class LarsError(Exception):
    """Bad input: a missing or corrupt file, a malformed data line, an unsupported model or op."""


class BundleError(LarsError):
    """The bundle directory is missing, incomplete, corrupt or of another format version."""


def os_error_line(e: OSError, rerun: str = "run again") -> str:
    """One line for an OSError no check foresaw: the path, the OS's reason and, where the cause is known, the fix
    (`rerun`: how to start again after freeing disk space)."""
    import errno

    path = e.filename if e.filename is None or e.filename2 is None else f"{e.filename} -> {e.filename2}"
    reason = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
    line = f"{path}: {reason}" if path is not None else reason
    if e.errno == errno.ENOSPC:
        line += f"; free disk space and {rerun}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        line += "; fix its permissions or choose another path"
    return line


def cli_exit_code(work, interrupted: str, rerun: str = "run again") -> int:
    """Run a command's `work()` and return its exit code (0 if it returns None): bad input (LarsError) and an OSError
    no check foresaw print one line on stderr and give 2, Ctrl-C prints `interrupted` and gives 130 (both CLIs)."""
    import sys

    try:
        return work() or 0
    except LarsError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:  # a safety net (a full disk, a permission changed mid-run): the checks name the fix
        print(f"error: {os_error_line(e, rerun)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 2
