"""User-facing errors: each carries one line that says what was wrong and what to do."""


class ControlNextError(Exception):
    """Bad input from the user (a file, an image, a flag, weights for another model).

    The CLI prints the message as one line and exits non-zero, without a traceback unless --debug.
    """


class MissingDependencyError(ControlNextError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"{package} is not installed: run `pip install 'controlnext[{extra}]'`")
        self.package = package
        self.extra = extra
