"""The one exception type of the loader, and the load report."""

from __future__ import annotations

import dataclasses


class CheckpointError(ValueError):
    """A malformed or unsupported checkpoint. ``file`` and ``tensor`` name where, when known."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        self.message, self.file, self.tensor = message, file, tensor
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if self.tensor is not None:
            where.append(f"tensor {self.tensor!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def at(self, *, file: str | None = None, tensor: str | None = None) -> CheckpointError:
        """A copy with the location filled in where it was unknown."""
        return CheckpointError(self.message, file=self.file or file, tensor=self.tensor or tensor)


@dataclasses.dataclass
class LoadReport:
    """What a load found, all together.

    missing: ``(file, tensor, why)`` a module or the index needs but no file has.
    unexpected: ``(file, tensor, why)`` present but belonging to nothing the loader understands
      (kept out of the result; not fatal).
    mismatched: ``(file, tensor, why)`` present with the wrong dtype, shape or value.
    """

    missing: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    unexpected: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    @property
    def fatal(self) -> bool:
        return bool(self.missing or self.mismatched)

    def __str__(self) -> str:
        lines = []
        for kind in ("missing", "mismatched", "unexpected"):
            for file, tensor, why in getattr(self, kind):
                lines.append(f"  {kind}: file {file}, tensor {tensor!r}: {why}")
        return "\n".join(lines) if lines else "  (clean)"

    def raise_if_fatal(self) -> None:
        """One :class:`CheckpointError` naming the first offender's file and tensor, listing all."""
        if not self.fatal:
            return
        file, tensor, why = (self.missing + self.mismatched)[0]
        n = len(self.missing) + len(self.mismatched)
        extra = f"\n(load report, {n} problem(s)):\n{self}" if n > 1 or self.unexpected else ""
        err = CheckpointError(why + extra, file=file, tensor=tensor)
        err.report = self  # type: ignore[attr-defined]
        raise err
