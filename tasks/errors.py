"""The one base class for mistakes a user can fix (bad input, settings, missing keys), and the
one environment failure the user must fix by hand: a full disk.

The CLI prints these as one clear line instead of a traceback; anything else is a bug.
"""

import errno

# No space on the device, over quota, or over the process's file-size limit: retrying will not
# help until the user frees space, so these are reported, never retried.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class UserError(ValueError):
    """A problem with the user's input or environment; the message says how to fix it."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is a write that failed for lack of space (disk, quota or size limit)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def disk_full_message(error: OSError) -> str:
    """One line for a full disk: what failed, and that finished work survives a re-run."""
    where = f" writing {error.filename}" if error.filename else ""
    return (
        f"{error.strerror or 'no space left'}{where}. Everything finished before it is kept "
        "(feature chunks marked done, reductions, runs with a report.json): free space or "
        "point --store/--runs elsewhere, then run the same command again to resume."
    )
