"""
Shared pytest setup.

Until roller is installed into the test virtualenv (C{pip install -e .}),
make the checkout importable.  pytest-twisted needs nothing here: its plugin
registers itself and runs the default reactor for C{pytest_twisted} tests.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
