"""The one exception type for mistakes a user can make (bad files, bad checkpoints, bad values)."""


class CropYieldError(ValueError):
    """A problem with the user's input, described in one line that says what to do.

    The console commands print it as ``<command>: error: <message>`` and exit with code 2.
    """


class TrainingDivergedError(CropYieldError):
    """The training loss or the weights became non-finite."""
