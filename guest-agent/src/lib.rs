//! flint-agent library: protocol, service and host client (see docs/agent-protocol.md).
