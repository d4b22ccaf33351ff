"""The one exception type for mistakes a user can fix (a bad config, a missing file, ...).

The scripts catch `UserError` and print its message on one line with a non-zero exit code, so
a typo never ends in a Python traceback. Anything else escaping is a bug in this project.
"""


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and what to do."""
