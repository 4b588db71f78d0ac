"""Damage done to a saved checkpoint folder, for the tests that check it is refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def edit_json(filename: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    """A corruption that applies ``change`` to the JSON file ``filename`` of a checkpoint folder."""

    def corrupt(folder: Path) -> None:
        path = folder / filename
        content = json.loads(path.read_text())
        change(content)
        path.write_text(json.dumps(content))

    return corrupt
