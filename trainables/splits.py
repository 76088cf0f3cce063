"""The four splits and their fixed roles.

Leakage happens when code quietly evaluates on the split it selects with, or tunes on the test
set. Each split serves exactly one role; asking a split for another role is an error, raised
where the mistake is made rather than discovered in a suspiciously good number later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = {
    "train": "fit",  # gradient steps
    "val_select": "select",  # ASHA decisions, trial ranking, gates
    "val_calib": "calibrate",  # post-hoc calibration (temperature), never selection
    "test": "report",  # the final report of the promoted model only
}


class SplitRoleError(RuntimeError):
    pass


@dataclass
class Splits:
    data: dict[str, Any]
    info: dict = field(default_factory=dict)

    def get(self, split: str, role: str):
        if split not in ROLES:
            raise SplitRoleError(f"unknown split {split!r}; splits are {', '.join(ROLES)}")
        if ROLES[split] != role:
            raise SplitRoleError(
                f"split {split!r} serves role {ROLES[split]!r}, not {role!r}: "
                f"use {next(s for s, r in ROLES.items() if r == role)!r} for {role!r}"
                if role in ROLES.values()
                else f"unknown role {role!r}; roles are {', '.join(ROLES.values())}"
            )
        if split not in self.data:
            raise SplitRoleError(f"split {split!r} was not provided (data.paths.{split})")
        return self.data[split]

    def has(self, split: str) -> bool:
        return split in self.data

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.data.items()}
