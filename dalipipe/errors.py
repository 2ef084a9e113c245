"""The one error type users see: a one-line message that names the file or row."""


class DataError(ValueError):
    """Bad user input (data, labels, checkpoint, options). The CLI prints it on one line and exits 2.

    Only this type means "the user's input is wrong": any other exception is a dalipipe bug, which the
    CLI reports as one (exit 3, with the traceback to attach to a report)."""
