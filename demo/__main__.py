"""``python -m demo``: the same as ``imaging-ad demo``."""

from demo.launcher import main

raise SystemExit(main())
