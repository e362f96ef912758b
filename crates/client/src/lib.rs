//! Native client library (connect, identify, resume, reconnect) and CLI. Built with the single-node gateway.
