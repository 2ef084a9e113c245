"""The one error type users see: a one-line message that names the file or row."""


class DataError(Exception):
    """Bad user input (data, labels, checkpoint, options). The CLI prints it on one line and exits 2."""
