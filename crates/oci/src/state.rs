//! Per-container runtime state (in progress).
