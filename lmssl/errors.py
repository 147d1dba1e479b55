"""The one exception type that the CLI turns into a single clear line."""


class UserError(Exception):
    """A problem with the user's input: printed as one line by the CLI, exit code 2."""
