//! capvisor-vmm
