//! capvisor-guest-init
