"""TRL's own tests, ported to run against grpokit offline (see README.md)."""
