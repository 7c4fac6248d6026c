"""The pass: fetch a revision, validate it, run its units in dependency order."""
