//! VMM core: the KVM virtual machine, its vCPUs, memfd-backed guest memory, kernel loading and the run loop.
