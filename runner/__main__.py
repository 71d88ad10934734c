"""`python -m runner`: the command-line entry point."""

import gc

# Start-up allocates about a million objects and frees almost none: cyclic GC
# passes during the imports are wasted time on the critical path. The guard
# freezes what was imported and turns GC back on at the fork (runner.guard).
gc.disable()

import sys  # noqa: E402

if sys.argv[1:2] == ["worker-stage"]:
    # Internal: the flow stage after the worker's exec into an env or a container. It
    # skips the CLI and its settings model: this interpreter's imports are on the
    # critical path a second time (runner.stage).
    from runner.stage import main as stage_main

    raise SystemExit(stage_main(sys.argv[2]))

from runner.cli import main  # noqa: E402

raise SystemExit(main())
