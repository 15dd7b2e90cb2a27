"""Stand-in for ManiSkill2_real2sim's package root: where its data/ folder is."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent.resolve()
ASSET_DIR = Path(os.environ.get("MS2_REAL2SIM_ASSET_DIR", PACKAGE_DIR.parent / "data"))
