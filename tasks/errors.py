"""The one base class for mistakes a user can fix (bad input, settings, missing keys).

The CLI prints these as one clear line instead of a traceback; anything else is a bug.
"""


class UserError(ValueError):
    """A problem with the user's input or environment; the message says how to fix it."""
