"""The exceptions the loaders raise: :class:`DatasetError` and :class:`MissingPackageError`."""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    """A data file is malformed. The message names the file and the line or record at fault."""

    def __init__(
        self,
        path: Path | str,
        message: str,
        *,
        line: int | None = None,
        record: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.record = record
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if record is not None:
            where += f", record {record}"
        super().__init__(f"{where}: {message}")


class MissingPackageError(ModuleNotFoundError):
    """A data-carrying package from ``requirements-models.txt`` is not installed."""
