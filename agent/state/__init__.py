"""What the agent keeps between passes: the run store and its file, the layout, the pass lock."""
