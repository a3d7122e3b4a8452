"""One exception type for mistakes a user can fix: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input, missing data, mismatched runs: say what is wrong and what to do."""
