"""The control plane: validates route chains, then serves them to engines over ADS.

One process (``bazel run //controlplane -- --definitions <engine>_definitions.json``):

* :mod:`controlplane.definitions`: the policy definitions of one built engine (the
  builder writes them next to the registry), as a validation-only registry;
* :mod:`controlplane.table`: the route table, versioned; every change is validated
  whole by :func:`engine.config.load_config` (the engine's own code) before it exists;
* :mod:`controlplane.writer`: every change to the table, one at a time, validated in a
  worker thread;
* :mod:`controlplane.gitops`: a watched file or directory that replaces the table, once
  settled (:mod:`engine.settle`);
* :mod:`controlplane.ads`: the ADS server (state of the world) and per-engine status;
* :mod:`controlplane.admin`: the admin HTTP API (submit / replace / delete a route,
  status) on aiohttp's server: Host allow list, limits, TLS, audit log;
* :mod:`controlplane.auth`: the admin API's bearer tokens (names, roles, reload);
* :mod:`controlplane.main`: the command line.
"""
