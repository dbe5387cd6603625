//! capvisor-broker
