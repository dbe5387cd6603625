//! capvisor-worker
