//! capvisor-gateway
