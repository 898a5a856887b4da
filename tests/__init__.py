"""Tests of the policy engine (run with pytest from the repository root)."""
