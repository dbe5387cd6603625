//! capvisor-client
