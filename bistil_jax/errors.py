"""The one exception type for bad user input."""


class BistilError(Exception):
  """Bad input, named in one line: the CLI prints it and exits non-zero.

  Raise it for problems the user can fix (missing files, wrong shapes,
  unknown keys); let programming errors surface as ordinary exceptions.
  """
