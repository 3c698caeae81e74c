"""``python -m medmamba`` is the ``medmamba`` command."""

from __future__ import annotations

import sys

from medmamba.cli import main

sys.exit(main())
