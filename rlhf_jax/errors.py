"""The one exception type for mistakes a user can make (config, data, mesh).

The command line prints such an error as a single line and exits non-zero instead
of showing a traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem the user can fix: bad config field, bad data record, bad mesh."""


class ConfigError(UserError):
  """An invalid config value. The message names the field."""


class DataError(UserError):
  """A bad data record: formatted as ``FILE:LINE: field: what is wrong``."""

  def __init__(self, path: str, line: int, field: str, problem: str):
    self.path, self.line, self.field, self.problem = path, line, field, problem
    super().__init__(f"{path}:{line}: {field}: {problem}")
