"""The package version and the versions of what it runs on (for reports and saved files)."""
from __future__ import annotations

import platform
from typing import Dict

__all__ = ["__version__", "versions"]

__version__ = "0.1.0"


def versions() -> Dict[str, str]:
    """Versions of tp_eigendamage, torch, Torch-Pruning, timm and Python."""
    import timm
    import torch
    import torch_pruning

    return {"tp_eigendamage": __version__, "torch": torch.__version__,
            "torch_pruning": torch_pruning.__version__, "timm": timm.__version__,
            "python": platform.python_version()}
