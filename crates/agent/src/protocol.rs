//! The host↔agent protocol: newline-delimited JSON, one request then one response.

use serde::{Deserialize, Serialize};

/// vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Version of this protocol; sent in every [`Response::Pong`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the agent reads.
pub const MAX_LINE: usize = 64 * 1024;

/// What the host asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Are you there? Answered with [`Response::Pong`].
    Ping,
    /// Become this fork child: reseed entropy, set hostname and MACs.
    Identity {
        /// New hostname.
        hostname: String,
        /// Fresh randomness (at least 32 bytes) for the kernel's entropy pool.
        seed: Vec<u8>,
        /// New MAC per NIC (eth0, eth1, ...), as `aa:bb:cc:dd:ee:ff`.
        macs: Vec<String>,
    },
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong {
        /// Protocol version.
        version: u32,
        /// Current hostname.
        hostname: String,
    },
    /// The request was carried out.
    Ok,
    /// The request failed or was not understood.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Parses one request line; malformed input is an error message, never a panic.
pub fn parse_request(line: &str) -> Result<Request, String> {
    if line.len() > MAX_LINE {
        return Err(format!(
            "request of {} bytes exceeds {MAX_LINE}",
            line.len()
        ));
    }
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// One JSON line for `value`.
pub fn to_line<T: Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string(value).expect("protocol types serialize");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json_lines() {
        let r = Request::Identity {
            hostname: "fork-1".into(),
            seed: vec![1, 2, 3],
            macs: vec!["02:00:00:00:00:01".into()],
        };
        let line = to_line(&r);
        assert!(line.ends_with('\n'));
        assert!(line.contains("\"op\":\"identity\""));
        assert_eq!(parse_request(&line).unwrap(), r);
        assert_eq!(parse_request("{\"op\":\"ping\"}").unwrap(), Request::Ping);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "",
            "{",
            "null",
            "{\"op\":\"format_disk\"}",
            "\u{0}\u{1}",
            "[1,2]",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
        assert!(parse_request(&"x".repeat(MAX_LINE + 1)).is_err());
    }

    #[test]
    fn responses_serialize_with_a_status_tag() {
        let s = to_line(&Response::Error {
            message: "no".into(),
        });
        assert!(s.contains("\"status\":\"error\""));
        let back: Response = serde_json::from_str(s.trim()).unwrap();
        assert_eq!(
            back,
            Response::Error {
                message: "no".into()
            }
        );
    }
}
