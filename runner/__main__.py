"""`python -m runner`: the command-line entry point."""

import gc

# Start-up allocates about a million objects and frees almost none: cyclic GC
# passes during the imports are wasted time on the critical path. The guard
# freezes what was imported and turns GC back on at the fork (runner.guard).
gc.disable()

from runner.cli import main  # noqa: E402

raise SystemExit(main())
