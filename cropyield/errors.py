"""The one exception type for mistakes a user can make (bad files, bad checkpoints, bad values),
and the warning type for what a user should know."""

import warnings


class CropYieldError(ValueError):
    """A problem with the user's input, described in one line that says what to do.

    The console commands print it as ``<command>: error: <message>`` and exit with code 2.
    """


class TrainingDivergedError(CropYieldError):
    """The training loss or the weights became non-finite."""


class CropYieldWarning(UserWarning):
    """Something the user should know about their data or settings; training goes on.

    The console commands print it as one line: ``<command>: warning: <message>``.
    """


def one_line_warnings(command: str) -> None:
    """Makes a console command print each :class:`CropYieldWarning` as ``<command>: warning: <message>``."""
    default = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, CropYieldWarning):
            return f"{command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
