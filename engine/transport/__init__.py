"""The engine's transports: how Envoy's ext_proc messages reach the runtime and go back.

The runtime (``engine.chain``, ``engine.store``, ``engine.policy``, ...) knows nothing of
them; only the entry points (``engine.main``) put the two together.
"""
