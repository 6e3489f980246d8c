//! Fork and snapshot plumbing that does not depend on KVM: the versioned, checksummed
//! state-file format, atomic file writes, and passing a state blob plus file
//! descriptors (guest memory) to a child process over a Unix socket.
//!
//! The VMM core (`forkvm-vmm`) defines *what* a VM's state is and how to capture and
//! restore it; this crate defines how that state is framed, validated and moved.
//! Fork = save → share memory → restore: one code path serves fork and templates.

pub mod format;
pub mod transfer;

pub use format::{
    decode, encode, open_regular, read_state_file, FormatError, OpenRegularError, CRC,
    FORMAT_VERSION, MAX_PAYLOAD,
};
pub use transfer::{recv_blob, send_blob, TransferError};
