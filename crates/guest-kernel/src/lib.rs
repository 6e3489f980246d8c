//! Guest kernels: Debian kernel packages fetched into the cache, their module dependencies, and busybox initramfs images built from them.
