"""Device profiles as data: one JSON file per device in ``profiles/``.

Owns :class:`DeviceProfile` (target, precision, lowering, runtime, providers, memory budget
and device-specific extras) and loading/listing the profiles; no code per device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from tome_export.errors import UserError

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str
    default_target: str
    precision: str
    lowering: str
    runtime: str
    providers: tuple[str, ...] = ()
    memory_budget_mb: int | None = None
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def get(self, key: str, default=None):
        """A device-specific fact from the profile (DLA cores, JetPack version, chunk limit…)."""
        return self.extra.get(key, default)

    def to_dict(self) -> dict:
        base = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        base["providers"] = list(self.providers)
        return {**base, **self.extra}


@cache
def profiles() -> dict[str, DeviceProfile]:
    found = {}
    for path in sorted(PROFILE_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        known = {k: data.pop(k) for k in list(data) if k in DeviceProfile.__dataclass_fields__}
        known["providers"] = tuple(known.get("providers", ()))
        found[known["name"]] = DeviceProfile(**known, extra=data)
    return found


def get_device(name: str) -> DeviceProfile:
    table = profiles()
    if name not in table:
        raise UserError(f"unknown device {name!r}; `tome-export devices` lists: {', '.join(table)}")
    return table[name]


__all__ = ["DeviceProfile", "get_device", "profiles"]
