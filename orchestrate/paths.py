"""Where the orchestrator's files are: the repository it belongs to, and build/ under it.

CACHESTACK_ROOT names the repository where this package runs installed (compose's set-up
container, which mounts its secrets/ and build/ there); otherwise it is the checkout this
package is in.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("CACHESTACK_ROOT") or Path(__file__).resolve().parents[1])
BUILD = ROOT / "build"
