"""The errors a run can stop with. Each message says what is wrong and how to fix it.

They sit apart from the code that raises them so that every module (and a notebook's `except`) can
name them without importing the rest of the package.
"""


class ParameterError(ValueError):
    """A notebook parameter has a value it cannot take. The message names it and what is allowed."""


class CheckpointError(RuntimeError):
    """A file is not a checkpoint of this project, or does not fit the notebook's settings."""


class DataError(RuntimeError):
    """A dataset is missing, corrupt or unreadable. The message names the file and the fix."""


class DivergenceError(RuntimeError):
    """Training produced NaN or inf losses."""
