"""Envoy Policy Engine: an Envoy ext_proc service that runs per-route policy chains."""
