"""The one error type users see: a one-line message naming the file, row or key; the CLI exits 1 with it."""


class LmlineError(Exception):
    pass
