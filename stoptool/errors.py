"""The one exception type for mistakes a user can make.

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a wrong option, a missing file, a foreign checkpoint."""
