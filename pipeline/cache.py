"""Where derived, rebuildable data lives (emulator roots, sensitivity tables): $CNN_DEPLOY_CACHE or .cache/."""

import os
from pathlib import Path


def cache_base() -> Path:
    return Path(os.environ.get("CNN_DEPLOY_CACHE") or Path(__file__).resolve().parents[1] / ".cache")
