"""The error family the command-line entry points report as one line, without a traceback.

`InputError` means the input is wrong (a config field, a data file, a weights file), not the program: its message
names the field or file, what was expected and what to do. `sfd_jax.main`, `sfd_jax.convert` and
`sfd_jax.train.export` print `error: <message>` as the last line and exit 1; every other exception keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """A config field, data file or weights file the program cannot use; the message names it."""


class DataError(InputError):
    """A dataset, statistics or sample file that is corrupt or does not fit the model; the message names the file."""


class MissingInputError(InputError, FileNotFoundError):
    """A file the run was pointed at (a dataset description, statistics, a model's config) does not exist. Still a
    FileNotFoundError for callers that test for one."""
