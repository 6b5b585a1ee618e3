"""One labeller's session on the label page: the pair shown now and the one after it (so that the page can load its
pictures ahead), answers written to the label file at once, undo, and the counts the page shows. Thread-safe: the
page's requests and the background scorer call it from their own threads.

A pair's answer is "left" (image_0 preferred: label 0), "right" (label 1), "tie" (0.5) or "skip" (nothing
written; not asked again in this session). Undo takes back the last answer (its line leaves the file) and shows its
pair again. Pairs this labeller labelled before, in this file, are never asked again.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass
from typing import Any

from pickrank.taste.images import DisplayImages
from pickrank.taste.labels import Label, LabelFile, new_label
from pickrank.taste.pairs import PairPicker, Planned, Pool

ANSWERS = {"left": 0.0, "right": 1.0, "tie": 0.5, "skip": None}


class StalePair(Exception):
    """An answer for a pair that is not the one shown now (another tab answered it, or it was undone)."""


@dataclass(frozen=True)
class Shown:
    """A planned pair with the id the page answers it by."""

    id: int
    pair: Planned


@dataclass(frozen=True)
class SessionOptions:
    """Who labels, and how pairs are chosen."""

    labeler: str = "unknown"
    order: str = "uncertain"  # or "random"
    seed: int = 0


class LabelSession:
    """The state behind the label page (see the module docstring)."""

    def __init__(self, pool: Pool, labels: LabelFile, options: SessionOptions,
                 images: DisplayImages | None = None) -> None:
        self.pool, self.labels, self.options, self.images = pool, labels, options, images
        mine = [lab for lab in labels.existing if lab.labeler == options.labeler]
        self.picker = PairPicker(pool, {lab.key() for lab in mine}, options.order, options.seed)
        self.before = sum(1 for lab in mine if self.picker.in_pool(lab.key()))
        self.queue: collections.deque[Shown] = collections.deque()
        self.history: list[tuple[Shown, str | None]] = []  # (pair, the id of its label; None: skipped)
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.scored = 0  # prompts whose candidates the scorer has scored

    def _fill(self) -> None:
        while len(self.queue) < 2:
            planned = self.picker.next()
            if planned is None:
                return
            self.queue.append(Shown(next(self.ids), planned))
        if self.images is not None:
            self.images.prefetch([c for s in self.queue for c in (s.pair.left, s.pair.right)])

    def _view(self, shown: Shown | None) -> dict | None:
        if shown is None:
            return None
        p = shown.pair
        return {"id": shown.id, "prompt": self.pool.slots[p.slot].prompt, "left": p.left, "right": p.right}

    @property
    def made(self) -> int:
        """Labels made in this session (undone ones not counted)."""
        return sum(1 for _, lid in self.history if lid is not None)

    def _state(self, note: str | None = None) -> dict[str, Any]:
        self._fill()
        return {"current": self._view(self.queue[0] if self.queue else None),
                "next": self._view(self.queue[1] if len(self.queue) > 1 else None),
                "labelled": self.before + self.made, "session": self.made, "pairs": self.picker.total,
                "prompts": len(self.pool.slots), "scored": self.scored, "order": self.options.order,
                "labeler": self.options.labeler, "note": note}

    def state(self) -> dict[str, Any]:
        """What the page shows: the current pair, the next one, the counts."""
        with self.lock:
            return self._state()

    def answer(self, pair_id: int, choice: str) -> dict[str, Any]:
        """Answer the current pair (ValueError: not an answer; StalePair: not the pair shown now)."""
        if choice not in ANSWERS:
            raise ValueError(f"answer must be one of {', '.join(ANSWERS)}")
        with self.lock:
            if not self.queue or self.queue[0].id != pair_id:
                raise StalePair(f"pair {pair_id} is not the one shown now")
            shown = self.queue.popleft()
            label_id = None
            if ANSWERS[choice] is not None:
                label = self._label(shown.pair, ANSWERS[choice])  # type: ignore[arg-type]
                self.labels.append(label)
                label_id = label.id
            self.history.append((shown, label_id))
            return self._state()

    def _label(self, pair: Planned, value: float) -> Label:
        left, right = self.pool.candidates[pair.left], self.pool.candidates[pair.right]
        return new_label(self.pool.slots[pair.slot].prompt, left.path, right.path, value,
                         labeler=self.options.labeler, chosen_by=pair.chosen_by, system_0=left.system,
                         system_1=right.system)

    def undo(self) -> dict[str, Any]:
        """Take back the last answer: its label leaves the file, its pair is shown again."""
        with self.lock:
            if not self.history:
                return self._state("nothing to undo")
            shown, label_id = self.history.pop()
            if label_id is not None:
                self.labels.remove(label_id)
            self.queue.appendleft(Shown(next(self.ids), shown.pair))
            return self._state()

    def set_scores(self, slot: int, scores: dict[int, float]) -> None:
        """The scorer's scores of a prompt's candidates (the closest pairs come next)."""
        with self.lock:
            self.picker.set_scores(slot, scores)
            self.scored += 1


__all__ = ["ANSWERS", "StalePair", "Shown", "SessionOptions", "LabelSession"]
