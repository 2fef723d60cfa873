"""The CAR rewriter: context-aware rewriting of training queries and synthetic queries."""
