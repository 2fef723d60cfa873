"""What the benchmark commands share: writing their JSON, printing their summary, wiring the CLI."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.settings import Settings


def write_results(out: Path, result: dict[str, Any], *printed: str) -> None:
    """Write ``result`` with the evaluation's ``write_json`` (atomic), print ``printed``, then
    where it went."""
    from lodestar.evaluation.common import write_json

    write_json(out, result)
    for text in printed:
        print(text)
    print(f"wrote {out}")


def _out_option(args: argparse.Namespace) -> Path:
    return Path(args.out)


@dataclass(frozen=True)
class TableBenchmark:
    """An in-process benchmark that writes one JSON and prints a Markdown table, run as
    ``lodestar bench <name>`` or ``python -m lodestar.bench.<name>`` with the same arguments."""

    name: str
    help: str
    #: The module's docstring; its first line describes the standalone command.
    doc: str | None
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Settings | None], dict[str, Any]]
    format_table: Callable[[dict[str, Any]], str]
    out_path: Callable[[argparse.Namespace], Path] = _out_option

    def command(self, args: argparse.Namespace, settings: Settings | None = None) -> int:
        result = self.run(args, settings)
        out = self.out_path(args)
        # Indented by 2, not atomic, a blank line before "wrote": as these benchmarks always did.
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(self.format_table(result))
        print(f"\nwrote {out}")
        return 0

    def register(self, group: Any) -> None:
        """``lodestar bench <name>`` on the ``bench`` group."""
        parser = group.add_parser(self.name, help=self.help)
        self.add_arguments(parser)
        parser.set_defaults(handler=self.command)

    def main(self, argv: Sequence[str] | None = None) -> int:
        parser = argparse.ArgumentParser(description=self.doc.splitlines()[0] if self.doc else None)
        self.add_arguments(parser)
        return self.command(parser.parse_args(argv))


def kill_group(popen: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of ``popen`` (started with ``start_new_session``) and reap it."""
    if popen.poll() is None:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()


def stop_group(popen: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM the process group of ``popen``; SIGKILL it when it has not exited in ``timeout_s``
    (a service's workers are in its group, so they go with it)."""
    if popen.poll() is None:
        os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(popen)
