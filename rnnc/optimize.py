"""Graph -> Graph: rewrite rules run to a fixpoint (placeholder until the rule table lands)."""

from __future__ import annotations

from .graph import Graph


def optimize(g: Graph) -> Graph:
    return g
