"""Change management: what may apply, and when (docs/policy.md).

- `apply`: the apply mode of a unit (`auto`, `approve-destroy`, `approve`) within the
  host's ceiling;
- `rules`: CEL rules over the redacted plan JSON (deny, hold, warn);
- `windows`: when applies are allowed (weekdays and times, or cron expressions);
- `gate`: what the three add to a plan's decision (`agent.units.decide.decide(gate=...)`).

Only `gate` and `check` know the rest of the agent; the first three take plain values,
so that the config readers (agent/config) can use them without an import cycle.
"""
