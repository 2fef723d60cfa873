"""Run the Locust load test headless for a bounded time and summarise it.

    python -m loadtests.run --host http://127.0.0.1:8000 --users 4 --spawn-rate 2 \\
        --run-time 30s --out reports/loadtest

Writes Locust's CSVs (``locust_stats.csv``, ``locust_failures.csv``, ...), ``report.html`` and
``locust.json`` into ``--out``, then prints requests, failures and p50/p95 latency per endpoint
and saves that table as ``summary.csv``. The table comes from Locust's final statistics
(``--json-file``): its ``_stats.csv`` is rewritten every second and flushed every ten, so at exit
it can miss the last seconds of the run. Only loopback hosts are targeted unless
``--allow-remote`` is given. Exits with Locust's status (non-zero when a request failed).
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from locust.stats import calculate_response_time_percentile

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USER_CLASSES = ("SearchUser", "AnswerUser", "FeedbackUser")
STOP_TIMEOUT_S = 10
_DURATION = re.compile(r"^(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$")


def parse_duration(text: str) -> int:
    """Seconds in a Locust time string: ``90``, ``30s``, ``5m``, ``1h30m``."""
    text = text.strip()
    if text.isdigit():
        seconds = int(text)
    else:
        match = _DURATION.fullmatch(text)
        if not text or match is None:
            raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 5m, 1h30m)")
        units = (("h", 3600), ("m", 60), ("s", 1))
        seconds = sum(int(match[unit] or 0) * mult for unit, mult in units)
    if seconds <= 0:
        raise argparse.ArgumentTypeError("run time must be positive")
    return seconds


def is_loopback(url: str) -> bool:
    """True when ``url`` names this machine: ``localhost``, 127.0.0.0/8 or ``::1``."""
    host = urlsplit(url).hostname
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def locust_command(args: argparse.Namespace) -> list[str]:
    out: Path = args.out
    return [
        sys.executable,
        "-m",
        "locust",
        "--locustfile",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--host",
        args.host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{args.run_time}s",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--json-file",
        str(out / "locust"),
        *args.user_classes,
    ]


Row = tuple[str, str, str, str, str]
SUMMARY_HEADER: Row = ("endpoint", "requests", "failures", "p50 ms", "p95 ms")


def _row(name: str, requests: int, failures: int, times: dict[int, int]) -> Row:
    p50, p95 = (calculate_response_time_percentile(times, requests, q) for q in (0.5, 0.95))
    return (name, str(requests), str(failures), str(p50), str(p95))


def summary_rows(stats_json: Path) -> list[Row]:
    """(endpoint, requests, failures, p50 ms, p95 ms) per endpoint and in total, from the final
    statistics Locust writes with ``--json-file``."""
    rows: list[Row] = []
    total_requests = total_failures = 0
    total_times: dict[int, int] = {}
    for entry in json.loads(stats_json.read_text()):
        times = {int(float(ms)): count for ms, count in entry["response_times"].items()}
        requests, failures = int(entry["num_requests"]), int(entry["num_failures"])
        rows.append(_row(f"{entry['method']} {entry['name']}", requests, failures, times))
        total_requests += requests
        total_failures += failures
        for ms, count in times.items():
            total_times[ms] = total_times.get(ms, 0) + count
    rows.sort()
    rows.append(_row("Aggregated", total_requests, total_failures, total_times))
    return rows


def write_summary_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUMMARY_HEADER)
        writer.writerows(rows)


def format_table(rows: Sequence[Row]) -> str:
    table = [SUMMARY_HEADER, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(SUMMARY_HEADER))]
    lines = []
    for n, row in enumerate(table):
        numbers = zip(row[1:], widths[1:], strict=True)
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in numbers]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="http://127.0.0.1:8000", help="orchestrator base URL")
    parser.add_argument("--users", type=int, default=4, help="concurrent simulated users")
    parser.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    parser.add_argument(
        "--run-time", type=parse_duration, default=30, help="how long to run: 30s, 5m, 1h30m"
    )
    parser.add_argument("--out", type=Path, default=Path("reports/loadtest"), help="report folder")
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a host that is not this machine"
    )
    parser.add_argument(
        "user_classes",
        nargs="*",
        metavar="USER_CLASS",
        help=f"run only these user classes ({', '.join(USER_CLASSES)}); default: all",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if urlsplit(args.host).scheme not in ("http", "https"):
        parser.error(f"--host must be an http(s) URL, got {args.host!r}")
    if not is_loopback(args.host) and not args.allow_remote:
        parser.error(f"refusing to load-test {args.host}: not a loopback host (--allow-remote)")
    unknown = sorted(set(args.user_classes) - set(USER_CLASSES))
    if unknown:
        parser.error(f"unknown user class {', '.join(unknown)}; choose from {USER_CLASSES}")
    if args.users < 1 or args.spawn_rate <= 0:
        parser.error("--users must be >= 1 and --spawn-rate > 0")

    args.out.mkdir(parents=True, exist_ok=True)
    command = locust_command(args)
    print(f"running locust for {args.run_time}s against {args.host} ...", flush=True)
    try:
        # Hard bound on top of Locust's own --run-time: start-up, stop timeout and report writing.
        completed = subprocess.run(command, timeout=args.run_time + STOP_TIMEOUT_S + 60)
        code = completed.returncode
    except subprocess.TimeoutExpired:
        print("locust did not stop in time; killed", file=sys.stderr)
        code = 124

    stats_json = args.out / "locust.json"
    if not stats_json.exists():
        print(f"no statistics written ({stats_json} missing)", file=sys.stderr)
        return code or 1
    rows = summary_rows(stats_json)
    write_summary_csv(rows, args.out / "summary.csv")
    print()
    print(format_table(rows))
    print(f"\nreports: {args.out}/ (summary.csv, locust_*.csv, report.html, locust.json)")
    return code


if __name__ == "__main__":
    sys.exit(main())
