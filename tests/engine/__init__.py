"""Unit tests of the engine package, one module per engine module."""
