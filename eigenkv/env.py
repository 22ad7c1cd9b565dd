"""Reading boolean environment variables the way Hugging Face and Triton do."""

from __future__ import annotations

import os


def env_flag(name: str) -> bool:
    """True when ``name`` is set to anything but empty, 0, false, no or off (any case)."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")
