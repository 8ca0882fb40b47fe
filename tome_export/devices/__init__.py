"""Device profiles: the table of devices, one JSON file per device in ``profiles/``.

A profile picks the default target, precision and lowering for a device and records its
facts (memory budget in MiB, DLA cores, TensorRT version…). ``profiles()`` reads the folder
once; it is the only place devices are declared. ``memory_budget_mib`` is the one memory
unit (MiB, 2**20 bytes); profiles written with the older ``memory_budget_mb`` are read as MiB.
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
    memory_budget_mib: int | None = None  # weights + working memory the device grants one model, in MiB
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def memory_budget_bytes(self) -> int | None:
        """The memory budget in bytes (None: no budget)."""
        return int(self.memory_budget_mib * 2**20) if self.memory_budget_mib else None

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
        if "memory_budget_mb" in data:  # the field's older name; always meant MiB
            data.setdefault("memory_budget_mib", data.pop("memory_budget_mb"))
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
