//! capvisor-kvm
