#!/usr/bin/env python3
"""Regenerate .github/workflows/portvlm.yml from matrix.yaml (thin shell over portvlm.ci).

    python ci/workflow.py            # rewrite the workflow
    python ci/workflow.py --check    # exit 1 when the checked-in workflow is stale
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from portvlm.ci import main  # noqa: E402

if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main(sys.argv[1:]))
