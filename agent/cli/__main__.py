"""`python -m agent.cli` runs the command line, as the `agent` command does."""

from agent.cli.main import main

raise SystemExit(main())
