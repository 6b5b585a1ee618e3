"""`pickrank compare`: which text-to-image system is better on a fixed prompt set, with confidence intervals.

Three stages, frozen dataclasses between them, no torch here:
  1. `plan`: `plan_comparison(...)` turns folders / a prompts CSV / a manifest into a `Comparison` (systems,
     prompts, each system's image paths per prompt); `Comparison.candidate_sets()` is what the engine scores.
  2. `stats`: `collect_scores(plan, records)` turns the engine's `Record`s into a `ScoreTable` (or build one with
     `ScoreTable.from_scores` from plain lists); `compare_systems(table, ...)` computes the statistics (numpy
     only, vectorised, paired bootstrap) -> `CompareResult`.
  3. `render`: `print_table`, `to_json`, `write_csv`, `per_prompt_rows` / `write_per_prompt`
     (and `pickrank.report.comparison.write_html`).
"""

from pickrank.analysis.comparison.plan import LAYOUTS, Comparison, Excluded, Slot, detect_layout, plan_comparison
from pickrank.analysis.comparison.render import (
    CSV_FIELDS,
    csv_rows,
    per_prompt_rows,
    print_table,
    prompt_scores,
    to_json,
    win_matrix,
    winner,
    write_csv,
    write_per_prompt,
)
from pickrank.analysis.comparison.stats import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_CONFIDENCE,
    DEFAULT_SEED,
    BestOfK,
    CompareResult,
    PairStats,
    PromptScores,
    Sample,
    ScoreTable,
    SystemStats,
    bootstrap_means,
    collect_scores,
    compare_systems,
    sign_test,
)

__all__ = ["LAYOUTS", "Slot", "Excluded", "Comparison", "detect_layout", "plan_comparison", "DEFAULT_BOOTSTRAP",
           "DEFAULT_SEED", "DEFAULT_CONFIDENCE", "Sample", "PromptScores", "ScoreTable", "collect_scores",
           "SystemStats", "PairStats", "BestOfK", "CompareResult", "compare_systems", "sign_test", "bootstrap_means",
           "print_table", "win_matrix", "to_json", "CSV_FIELDS", "csv_rows", "write_csv", "per_prompt_rows",
           "write_per_prompt", "prompt_scores", "winner"]
