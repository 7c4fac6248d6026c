"""The command line: `agent ...` subcommands, the quickstart and the views they print."""
