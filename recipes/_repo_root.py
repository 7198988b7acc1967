"""``python recipes/<model>.py`` puts recipes/ on sys.path, not the repository root that the
``recipes`` package needs; each script imports this module first to add it."""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(1, REPO_ROOT)
