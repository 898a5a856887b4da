"""The engine's transports: how Envoy's ext_proc messages reach the runtime and go back.

* :mod:`engine.transport.server`: the listeners of one engine process (gRPC ext_proc +
  health, the HTTP transport beside), drain and shutdown, SO_REUSEPORT workers.
* :mod:`engine.transport.grpc_service`: the gRPC ``ExternalProcessor`` servicer, one
  ``Process`` stream per HTTP request.
* :mod:`engine.transport.http_server` and :mod:`engine.transport.http_service`: Envoy's HTTP
  transport (``http_service``), one POST per phase.
* :mod:`engine.transport.stream`: the stream machine both share (message -> snapshot ->
  chain -> reply).
* :mod:`engine.transport.messages`: reading Envoy's messages and building replies.
* :mod:`engine.transport.testing`: message builders and a gRPC client for tests.

The runtime (``engine.chain``, ``engine.store``, ``engine.policy``, ...) never imports this
package (tests/engine/test_layout.py); only the entry points (``engine.main``) put the two
together.
"""
