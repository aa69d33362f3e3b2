"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class TunesmithError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
