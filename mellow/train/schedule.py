"""The learning-rate schedule of a run: a factor of each parameter group's peak rate per update, and how it is
planned again when a resume gives the run another length.

    cosine  linear warmup to 1 over warmup_updates, a cosine down to min_lr_ratio at the end less cooldown_updates,
            then a linear cooldown from min_lr_ratio to 0 over cooldown_updates (none by default)
    wsd     warmup-stable-decay: linear warmup to 1, stable at 1, then a linear decay from 1 to min_lr_ratio over
            the last cooldown_updates

A resume with a new length (--resume with another --train.max_updates or --train.epochs; `mellow` calls it a
re-plan) continues from the update `at` it resumes at, r being the rate the last update before it trained with
(for a run that had finished, its last update's), by one rule per schedule:

    still warming up (at < warmup_updates): the plan as if the new length had been given from the start;
    cosine: from r along a new cosine to min_lr_ratio at the new end less cooldown_updates, then the cooldown
            (a new end inside the cooldown: a straight line from r to 0 at the new end);
    wsd:    stable at 1 until the new end less cooldown_updates, then the decay; if the decay had begun (r < 1),
            the rate first climbs back linearly from r to 1 over warmup_updates (a re-warm), and the decay starts
            no earlier than that.

The optimizer state is kept. A run's schedule is its first plan and the chain of its re-plans (each recorded in
its checkpoints and in <run>/replans.json), so a resumed run follows exactly the rates of one never stopped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

RULES = {"warmup": "still warming up: the plan to the new end as if given from the start",
         "cosine": "a new cosine from the current rate to min_lr_ratio at the new end less cooldown_updates",
         "wsd": "the stable rate goes on; the decay moves to the new end",
         "wsd-rewarm": "the decay had begun: back to the stable rate over warmup_updates, the decay at the new end"}


@dataclass(frozen=True)
class Replan:
    """A change of the run's length at update `at`: from `before` updates to `after`, by `rule` (RULES)."""

    at: int
    before: int
    after: int
    rule: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Schedule:
    """The factor of the peak learning rate at each update (see the module docstring)."""

    kind: str  # cosine or wsd
    warmup: int
    cooldown: int
    min_ratio: float
    end: int  # the first plan's length
    replans: tuple[Replan, ...] = ()

    @property
    def planned(self) -> int:
        """The run's length now: the last re-plan's, else the first plan's."""
        return self.replans[-1].after if self.replans else self.end

    def __call__(self, update: int) -> float:
        return self.factor(update)

    def factor(self, update: int, replans: int | None = None) -> float:
        """The factor at `update`, under the first `replans` re-plans (all of them by default)."""
        chain = self.replans if replans is None else self.replans[:replans]
        for number in range(len(chain) - 1, -1, -1):
            if update >= chain[number].at:
                return self._replanned(update, chain[number], self.factor(chain[number].at - 1, number))
        return self._planned(update, self.end)

    def _planned(self, update: int, end: int) -> float:
        """The first plan's factor, for a run of `end` updates."""
        if update < self.warmup:
            return (update + 1) / self.warmup
        decay_end = end - self.cooldown
        if self.kind == "wsd":
            if update < decay_end:
                return 1.0
            return self.min_ratio + (1 - self.min_ratio) * max(0.0, (end - update) / max(1, self.cooldown))
        if update >= decay_end:
            return self.min_ratio * max(0.0, (end - update) / max(1, self.cooldown))
        progress = (update - self.warmup) / max(1, decay_end - self.warmup)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _replanned(self, update: int, replan: Replan, rate: float) -> float:
        """The factor at `update` after `replan`; `rate` is the one the last update before it trained with."""
        at, end = replan.at, replan.after
        if replan.rule == "warmup":
            return self._planned(update, end)
        decay_end = end - self.cooldown
        if replan.rule == "cosine":
            if decay_end <= at:  # the new end falls where the cooldown would be: straight down to 0
                return rate * max(0.0, (end - update) / max(1, end - at))
            if update < decay_end:
                progress = (update - at) / (decay_end - at)
                return self.min_ratio + (rate - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            return self.min_ratio * max(0.0, (end - update) / max(1, self.cooldown))
        stable_from = at
        if replan.rule == "wsd-rewarm":
            stable_from = at + self.warmup
            if update < stable_from:
                return rate + (1 - rate) * (update - at) / max(1, self.warmup)
        decay_start = max(stable_from, decay_end)
        if update < decay_start:
            return 1.0
        return self.min_ratio + (1 - self.min_ratio) * max(0.0, (end - update) / max(1, end - decay_start))

    def replanned(self, at: int, after: int) -> Schedule:
        """This schedule with the run's length changed to `after` at update `at` (the rule chosen per the module
        docstring)."""
        if after <= at:
            raise ValueError(f"a run at update {at} cannot be re-planned to end at {after}")
        if at < self.warmup or at == 0:
            rule = "warmup"
        elif self.kind == "cosine":
            rule = "cosine"
        else:
            rule = "wsd" if self.factor(at - 1) >= 1.0 else "wsd-rewarm"
        return Schedule(self.kind, self.warmup, self.cooldown, self.min_ratio, self.end,
                        (*self.replans, Replan(at, self.planned, after, rule)))
