//! Fork and snapshot: capture a running VM's complete state, share its memory copy-on-write, and restore children and persisted templates.
