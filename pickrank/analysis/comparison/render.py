"""The comparison for people and programs: the summary table, one JSON object, CSV rows, and one JSON line per
prompt (the HTML page is `pickrank.report.comparison`)."""

from __future__ import annotations

import csv
import io
import json
from typing import IO, Callable, Iterator, Sequence

import numpy as np

from pickrank.analysis.comparison.stats import CompareResult, PromptScores, ScoreTable
from pickrank.report.page import interval, number


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def marked(low: float | None, high: float | None, caveat: str | None) -> str:
    """An interval as text, with a * when it is unreliable (`stats.interval_caveat`)."""
    return interval(low, high) + ("*" if caveat and low is not None else "")


def caveats(result: CompareResult) -> list[str]:
    """Why some intervals are unreliable (`stats.interval_caveat`), each reason once, sorted; [] when none is."""
    return sorted({c for c in [s.caveat for s in result.systems] + [p.caveat for p in result.pairs]
                   + [c.caveat for c in result.best_of_k] if c})


def caveat_note(result: CompareResult) -> str | None:
    """The footnote of the intervals marked *, or None when none is."""
    why = caveats(result)
    return f"* unreliable interval: {' / '.join(why)}" if why else None


def print_table(result: CompareResult, stream: IO[str], *, is_terminal: bool = False) -> None:
    """The summary for people: one row per system, a win-rate matrix with all pairs, best-of-k curves."""
    from rich.console import Console
    from rich.markup import escape as markup_escape
    from rich.table import Table

    from pickrank.output.terminal import print_titled, terminal_safe

    def esc(text: str) -> str:  # neither rich markup nor terminal control sequences in system names
        return markup_escape(terminal_safe(text))

    console = Console(file=stream, force_terminal=is_terminal or None, width=None if is_terminal else 120)
    level = f"{round(result.confidence * 100):g}%"
    base = result.baseline
    table = Table()
    for name, justify in (("system", "left"), ("mean", "right"), (f"mean {level} CI", "right"),
                          (f"win vs {esc(base)}", "right"), (f"win {level} CI", "right"), ("p", "right"),
                          ("prompts", "right"), ("images", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    for s in result.systems:
        p = result.pair(s.name, base)
        win = ("baseline", "", "") if s.name == base else ("-", "-", "-") if p is None else (
            number(p.win_rate), marked(p.win_low, p.win_high, p.caveat), _p(p.p_value))
        images = f"{s.images}" + (f" ({s.failed} failed)" if s.failed else "")
        table.add_row(esc(s.name), number(s.mean), marked(s.low, s.high, s.caveat), *win, str(s.prompts), images)
    print_titled(console, f"PickScore by system ({result.prompts} prompts, {level} intervals, "
                          f"{result.bootstrap} bootstrap resamples)", table)
    note = caveat_note(result)
    if note:
        console.print(note, markup=False, highlight=False)
    if result.all_pairs:
        console.print(_matrix_table(result, esc))
    if result.best_of_k:
        print_titled(console, "best-of-k win rate", _curves_table(result, esc))


def _curves_table(result: CompareResult, esc: Callable[[str], str]) -> object:
    """One row per best-of-k curve: the win rate of the best of k samples of a system over one sample of another."""
    from rich.table import Table

    ks = sorted({k for c in result.best_of_k for k in c.ks})
    # The description heads the rows' column: a title would wrap to the width of a few narrow k columns.
    table = Table()
    table.add_column("best of k samples vs one sample", justify="left", overflow="fold")
    for k in ks:
        table.add_column(f"k={k}", justify="right")
    for c in result.best_of_k:
        win = dict(zip(c.ks, c.win))
        table.add_row(f"{esc(c.system)} vs {esc(c.reference)}", *(number(win[k]) if k in win else "" for k in ks))
    return table


def _matrix_table(result: CompareResult, esc: Callable[[str], str]) -> object:
    """Win rate of the row's system over the column's."""
    from rich.table import Table

    names = [s.name for s in result.systems]
    table = Table()  # the description heads the row names' column: a title would wrap to a narrow matrix
    table.add_column("win rate of row over column", justify="left", overflow="fold")
    for n in names:
        table.add_column(esc(n), justify="right")
    for a in names:
        cells = []
        for b in names:
            p = None if a == b else result.pair(a, b)
            cells.append("-" if p is None else number(p.win_rate))
        table.add_row(esc(a), *cells)
    return table


def win_matrix(result: CompareResult) -> list[list[float | None]]:
    """matrix[i][j]: win rate of system i over system j (None on the diagonal and for pairs not computed)."""
    names = [s.name for s in result.systems]
    return [[None if a == b else getattr(result.pair(a, b), "win_rate", None) for b in names] for a in names]


def to_json(result: CompareResult, model: dict | None = None) -> dict:
    """One object: settings, systems, pairs, best-of-k curves, prompts left out, model provenance."""
    return {
        "settings": {"baseline": result.baseline, "all_pairs": result.all_pairs, "bootstrap": result.bootstrap,
                     "seed": result.seed, "confidence": result.confidence, "layout": result.layout},
        "unreliable_intervals": caveat_note(result),
        "prompts": result.prompts,
        "systems": [dict(s.__dict__, missing=list(s.missing)) for s in result.systems],
        "pairs": [dict(p.__dict__) for p in result.pairs],
        "best_of_k": [dict(c.__dict__, ks=list(c.ks), win=list(c.win), low=list(c.low), high=list(c.high))
                      for c in result.best_of_k],
        "excluded": [dict(e.__dict__) for e in result.excluded],
        "model": dict(model if model is not None else result.model) or None,
    }


CSV_FIELDS = ("kind", "system", "reference", "k", "prompts", "images", "failed", "mean", "mean_low",
              "mean_high", "win_rate", "win_low", "win_high", "wins", "ties", "losses", "mean_diff", "diff_low",
              "diff_high", "pref_prob", "p_value", "sample_win_rate", "interval_caveat")


def csv_rows(result: CompareResult) -> Iterator[dict]:
    """One row per system (kind=system), per pair (kind=pair: system against reference) and per best-of-k
    point (kind=best_of_k); the columns that do not apply are empty."""
    for s in result.systems:
        yield {"kind": "system", "system": s.name, "prompts": s.prompts, "images": s.images, "failed": s.failed,
               "mean": s.mean, "mean_low": s.low, "mean_high": s.high, "interval_caveat": s.caveat}
    for p in result.pairs:
        yield {"kind": "pair", "system": p.system, "reference": p.reference, "prompts": p.prompts,
               "win_rate": p.win_rate, "win_low": p.win_low, "win_high": p.win_high, "wins": p.wins,
               "ties": p.ties, "losses": p.losses, "mean_diff": p.mean_diff, "diff_low": p.diff_low,
               "diff_high": p.diff_high, "pref_prob": p.pref_prob, "p_value": p.p_value,
               "sample_win_rate": p.sample_win_rate, "interval_caveat": p.caveat}
    for c in result.best_of_k:
        for k, w, lo, hi in zip(c.ks, c.win, c.low, c.high):
            yield {"kind": "best_of_k", "system": c.system, "reference": c.reference, "k": k,
                   "prompts": c.prompts, "win_rate": w, "win_low": lo, "win_high": hi, "interval_caveat": c.caveat}


def write_csv(result: CompareResult, stream: IO[str]) -> None:
    """The CSV form of csv_rows, with a header; text cells that look like formulas escaped."""
    from pickrank.output.writers import csv_safe

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for row in csv_rows(result):
        w.writerow(["" if row.get(k) is None else csv_safe(row[k]) for k in CSV_FIELDS])
    stream.write(buf.getvalue())


def prompt_scores(row: PromptScores) -> list[float | None]:
    """Each system's score for the prompt (the mean of its scored samples), None where it has none."""
    out = []
    for samples in row.samples:
        vals = [x.score for x in samples if x.score is not None]
        out.append(float(np.mean(vals)) if vals else None)
    return out


def winner(systems: Sequence[str], scores: Sequence[float | None]) -> str | None:
    """The system with the prompt's highest score; None when the top is tied or fewer than two have a score."""
    scored = sorted(((v, s) for s, v in zip(systems, scores) if v is not None), reverse=True)
    if len(scored) < 2 or scored[0][0] == scored[1][0]:
        return None
    return scored[0][1]


def per_prompt_rows(table: ScoreTable) -> Iterator[dict]:
    """One object per prompt: id, prompt, each system's score and samples, the winner."""
    for row in table.prompts:
        scores = prompt_scores(row)
        yield {"id": row.id, "prompt": row.prompt,
               "scores": dict(zip(table.systems, scores)),
               "samples": {s: [{"path": x.path, "score": x.score, "error": x.error} for x in samples]
                           for s, samples in zip(table.systems, row.samples)},
               "winner": winner(table.systems, scores)}


def write_per_prompt(table: ScoreTable, stream: IO[str]) -> None:
    """per_prompt_rows as JSON Lines."""
    stream.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_prompt_rows(table)))


__all__ = ["print_table", "win_matrix", "to_json", "CSV_FIELDS", "csv_rows", "write_csv", "prompt_scores", "winner",
           "per_prompt_rows", "write_per_prompt"]
