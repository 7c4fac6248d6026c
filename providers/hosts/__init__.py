"""The host resource engine: facts, diffs and the batched apply, one round trip each.

    report = converge(transport, resources, handlers, apply=True, become=True)

`converge` gathers the facts of every resource in one round trip, diffs locally
(`providers.hosts.diff.diff`, pure), and applies every change plus the notified handlers in one more
round trip. See docs/resources.md for the resource kinds and their attributes.
"""

from providers.hosts.engine import converge, gather_facts
from providers.hosts.model import Change, Handler, HostReport, Resource, ResourceOutcome
from providers.hosts.templates import render_template

__all__ = [
    "Change",
    "Handler",
    "HostReport",
    "Resource",
    "ResourceOutcome",
    "converge",
    "gather_facts",
    "render_template",
]
