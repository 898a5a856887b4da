"""The control plane: validates route chains, then serves them to engines over ADS.

One process (``bazel run //controlplane -- --definitions <engine>_definitions.json``):

* :mod:`controlplane.definitions`: the policy definitions of one built engine (the
  builder writes them next to the registry), as a validation-only registry;
* :mod:`controlplane.table`: the route table, versioned; every change is validated
  whole by :func:`engine.config.load_config` (the engine's own code) before it exists;
* :mod:`controlplane.gitops`: a watched file or directory that replaces the table;
* :mod:`controlplane.ads`: the ADS server (state of the world) and per-engine status;
* :mod:`controlplane.admin`: the admin HTTP API (submit / replace / delete a route, status);
* :mod:`controlplane.http`: the small asyncio HTTP/1.1 server the admin API runs on;
* :mod:`controlplane.main`: the command line.
"""
