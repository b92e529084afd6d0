"""Errors that a user can act on: each one prints as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a field): printed as one line.

    The message names the file and the field, e.g.
    ``data/cct.json: annotations[17].bbox: width is negative``.
    """


class DataError(UserError):
    """Input data that cannot be used as it is (malformed JSON, bad boxes, ...)."""
