"""The run directory's config.json: every option as used, the resolved environment, the schedule, the run
card, and the earlier records of a run resumed with other options (`history`: never lost)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: this module is read by torch-free code too
    from droppos.environment import Environment
    from droppos.loop import Schedule
    from droppos.recipes import TrainingConfig

CONFIG_NAME = "config.json"


def config_record(config: "TrainingConfig", environment: "Environment", schedule: "Schedule") -> dict[str, Any]:
    """config.json's content: the sectioned options (recipes.to_record), `environment` (every `auto` resolved),
    the schedule and the run card."""
    from droppos import recipes
    from droppos.environment import run_card

    record = recipes.to_record(config)
    record["environment"] = environment.record()
    record["schedule"] = schedule.record()
    record["run_card"] = run_card(environment.world_size, config.data.path)
    return record


def write_config(out: Path, record: dict[str, Any]) -> None:
    """Write OUT/config.json; an earlier record of other options moves into its `history`."""
    from droppos import UserError
    from droppos.files import read_json_input, write_json_atomic

    path = Path(out) / CONFIG_NAME
    history: list = []
    if path.exists():
        try:
            previous = read_json_input(path, "config.json", max_bytes=64 << 20)
        except UserError:  # unreadable, damaged or planted: started anew (the checkpoint holds the run's record)
            previous = None
        if isinstance(previous, dict):
            history = list(previous.pop("history", []) or [])
            if _without_card(previous) != _without_card(record):
                history.append(previous)
    write_json_atomic(path, dict(record, history=history), indent=2)


def _without_card(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("run_card", "history")}
