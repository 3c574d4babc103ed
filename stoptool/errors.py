"""The one exception type for mistakes a user can make.

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a wrong option, a missing file, a foreign checkpoint.

    `key`, when given, is the config field the message is about: the command line adds the
    flag that sets it."""

    exit_code = 2

    def __init__(self, message: str = "", key: str | None = None):
        super().__init__(message)
        self.key = key

    def __str__(self) -> str:
        text = super().__str__()
        # Raised in a DataLoader worker, it comes back as UserError("Caught UserError in
        # DataLoader worker process N.\nOriginal Traceback ...\nstoptool.errors.UserError: msg"):
        # the user's line is the last one.
        if "\nOriginal Traceback" in text:
            last = text.rstrip().splitlines()[-1]
            return last.split("UserError: ", 1)[-1]
        return text


def plural(n: int, noun: str) -> str:
    """"1 patch", "0 patches", "3 images": a count for a message (nouns in -s, -x, -ch, -sh
    take -es)."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}{'es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's'}"


class WriteFailed(UserError):
    """A file could not be written (no space left, no permission, its directory removed): not
    the user's input but the machine's state, so the command exits 1, with one line naming the
    file. `path`, `needed` (bytes, where known) and `free` (bytes, where known) say what failed."""

    exit_code = 1

    def __init__(self, message: str, path, needed: int | None = None, free: int | None = None):
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free
