"""The units of a pass: how a stack or a fleet is planned, decided, applied and recorded."""
