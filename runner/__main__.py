"""`python -m runner`: the command-line entry point."""

from runner.cli import main

raise SystemExit(main())
