"""Access control: API keys, per-key limits and quotas, and usage accounting.

See docs/access-control.md for what operators and clients see.
"""
