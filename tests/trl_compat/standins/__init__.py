"""Local stand-ins for the `trl-internal-testing` Hub repos that TRL's tests load (see hub_cache.py)."""
