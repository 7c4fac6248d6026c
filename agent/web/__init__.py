"""The read-only web page: overview, units, activity, live over server-sent events."""
