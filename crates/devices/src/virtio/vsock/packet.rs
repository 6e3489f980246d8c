//! The virtio-vsock wire format: the 44-byte packet header, its operations and flags, and the
//! event-queue event (virtio spec 1.2, section 5.10).
//!
//! Parsed by hand rather than through the rust-vmm `virtio-vsock` crate: the header is a fixed
//! little-endian layout and the device only needs to read and write it whole.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;

/// The CID of the host, as the guest addresses it.
pub const HOST_CID: u64 = 2;

/// `type`: stream socket (the only type this device supports).
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset or refused.
pub const OP_RST: u16 = 3;
/// The sender will not send and/or receive any more (see `SHUTDOWN_*`).
pub const OP_SHUTDOWN: u16 = 4;
/// Payload.
pub const OP_RW: u16 = 5;
/// The sender's receive buffer space changed (`buf_alloc`/`fwd_cnt`).
pub const OP_CREDIT_UPDATE: u16 = 6;
/// The sender asks for an `OP_CREDIT_UPDATE`.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `OP_SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `OP_SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Event-queue event id: the transport was reset (the guest re-reads its CID and resets its
/// connections).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event`.
pub const EVENT_SIZE: usize = 4;

/// `struct virtio_vsock_hdr`, host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (`SHUTDOWN_*` for `OP_SHUTDOWN`).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header from its little-endian wire form.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header in its little-endian wire form.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Name of an operation, for logs.
pub fn op_name(op: u16) -> &'static str {
    match op {
        OP_REQUEST => "REQUEST",
        OP_RESPONSE => "RESPONSE",
        OP_RST => "RST",
        OP_SHUTDOWN => "SHUTDOWN",
        OP_RW => "RW",
        OP_CREDIT_UPDATE => "CREDIT_UPDATE",
        OP_CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_wire_form() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x40000,
            fwd_cnt: 0xffff_fff0,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }
}
