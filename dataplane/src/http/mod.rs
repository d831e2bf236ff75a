//! HTTP serving: the listener, hyper's HTTP/1.1 and h2c servers, per-connection bounds and
//! shutdown, request ids and the routes. Nothing here knows about LLMs beyond which paths go to
//! the gateway.

pub(crate) mod connections;
pub(crate) mod server;
