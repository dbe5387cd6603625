//! capvisor-supervisor
