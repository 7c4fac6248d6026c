"""The host resource engine: facts, diffs and the batched apply, one round trip each."""
