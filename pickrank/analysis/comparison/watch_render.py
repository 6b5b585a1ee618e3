"""The signals (`watch.Watch`) for people and programs: a table with the flags under it, a JSON object, CSV rows
(the page's charts are `pickrank.report.series`)."""

from __future__ import annotations

from typing import IO, Iterator

from pickrank.analysis.comparison.stats import CompareResult
from pickrank.analysis.comparison.watch import MONITOR, SIGNAL_NAMES, Estimate, Watch, relative_change
from pickrank.report.page import interval, number

# The CSV columns the signals add to compare's (`render.CSV_FIELDS`), in every row (empty where they do not apply).
WATCH_FIELDS = ("signal", "change", "threshold", "flag")


def _estimate(e: Estimate | None) -> dict | None:
    return None if e is None else dict(e.__dict__)


def watch_json(watch: Watch) -> dict:
    """The signals as one JSON object: per system each signal's mean and interval, the flags, the thresholds."""
    return {
        "series": watch.series,
        "monitor_model": watch.monitor_model,
        "thresholds": dict(watch.thresholds),
        "systems": [{"name": s.name, "signals": {n: _estimate(e) for n, e in s.signals},
                     "diversity_all": s.diversity_all, "monitor": _estimate(s.monitor),
                     "monitor_diff": _estimate(s.monitor_diff)} for s in watch.systems],
        "flags": [dict(f.__dict__) for f in watch.flags],
    }


def series_rows(result: CompareResult) -> list[tuple[str, str, str]]:
    """Per system: its name, win rate against the first and against the one before it (a series' figures)."""
    names = [s.name for s in result.systems]

    def win(name: str, reference: str) -> str:
        p = result.pair(name, reference)
        return "" if p is None else f"{number(p.win_rate)} {interval(p.win_low, p.win_high)}"

    return [(name, win(name, names[0]) if i else "", win(name, names[i - 1]) if i else "")
            for i, name in enumerate(names)]


def _cell(e: Estimate | None, ref: Estimate | None, digits: int = 3) -> str:
    if e is None or e.mean is None:
        return "-"
    change = relative_change(e.mean, ref.mean if ref else None) if ref is not e else None
    return number(e.mean, digits) + ("" if change is None else f" ({change:+.0%})")


def print_watch(watch: Watch, result: CompareResult, stream: IO[str], *, is_terminal: bool = False) -> None:
    """The signals table (each mean, with its change against the baseline), then one line per flag."""
    from rich.console import Console
    from rich.markup import escape as markup_escape
    from rich.table import Table

    from pickrank.output.terminal import print_titled, terminal_safe

    def esc(text: str) -> str:
        return markup_escape(terminal_safe(text))

    console = Console(file=stream, force_terminal=is_terminal or None, width=None if is_terminal else 120)
    if watch.series:
        table = Table()
        for name in ("checkpoint", "win vs first", "win vs previous"):
            table.add_column(name, justify="left" if name == "checkpoint" else "right", overflow="fold")
        for row in series_rows(result):
            table.add_row(esc(row[0]), row[1], row[2])
        print_titled(console, "series: win rate against the first checkpoint and the one before", table)
    # One row per signal, a column per system: a series of checkpoints reads left to right.
    table = Table()
    table.add_column("signal", justify="left", overflow="fold")
    for s in watch.systems:
        table.add_column(esc(s.name), justify="right", overflow="fold")
    base = watch.system(watch.baseline)
    for n in SIGNAL_NAMES:
        table.add_row(n, *(_cell(s.get(n), None if s is base else base.get(n)) for s in watch.systems))
    table.add_row("diversity_all", *(number(s.diversity_all) for s in watch.systems))
    if watch.monitor_model:
        table.add_row(MONITOR, *(_cell(s.monitor, None if s is base else base.monitor) for s in watch.systems))
    print_titled(console, f"signals (mean over prompts; change vs {esc(result.baseline)})", table)
    if watch.flags:
        for f in watch.flags:
            console.print(f"FLAG {f.text}", markup=False, highlight=False)
    else:
        console.print("no flag raised", markup=False, highlight=False)


def watch_csv_rows(watch: Watch) -> Iterator[dict]:
    """kind=signal rows (system, signal, mean and interval, change against the baseline) and kind=flag rows."""
    base = watch.system(watch.baseline)
    for s in watch.systems:
        for name, e in [*s.signals, *([(MONITOR, s.monitor)] if s.monitor is not None else [])]:
            ref = base.monitor if name == MONITOR else base.get(name)
            yield {"kind": "signal", "system": s.name, "signal": name, "prompts": e.prompts, "mean": e.mean,
                   "mean_low": e.low, "mean_high": e.high,
                   "change": relative_change(e.mean, ref.mean if ref is not None else None)}
        yield {"kind": "signal", "system": s.name, "signal": "diversity_all", "mean": s.diversity_all}
    for f in watch.flags:
        yield {"kind": "flag", "system": f.system, "signal": f.signal, "change": f.change, "threshold": f.threshold,
               "flag": f.text}


__all__ = ["WATCH_FIELDS", "watch_json", "print_watch", "watch_csv_rows", "series_rows"]
