//! The shim's errors, and the ttrpc status codes containerd sees for them.

use std::path::PathBuf;

use containerd_shim::protos::ttrpc;

/// Everything the shim's own code can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such container or exec in this shim.
    #[error("{0}: not found")]
    NotFound(String),
    /// A container or exec with this id exists already.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The process is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No runtime binary was found.
    #[error("no OCI runtime binary: tried {tried}")]
    RuntimeNotFound {
        /// Where the shim looked, in order.
        tried: String,
    },
    /// The runtime binary could not be started.
    #[error("cannot run the OCI runtime {}: {source}", binary.display())]
    RuntimeSpawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The runtime ran and failed; `message` is its last logged error (or its output).
    #[error("OCI runtime {verb} failed: {message}")]
    RuntimeFailed {
        /// `create`, `start`, `kill`, ...
        verb: String,
        /// The runtime's own explanation.
        message: String,
    },
    /// The runtime's output could not be understood.
    #[error("OCI runtime {verb}: unexpected output: {reason}")]
    RuntimeOutput {
        /// The verb whose output was read.
        verb: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A file or descriptor operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An error from the containerd-shim crate (mounts, options, the publisher).
    #[error(transparent)]
    Shim(#[from] containerd_shim::Error),
}

impl Error {
    /// An [`Error::Io`] saying what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// Whether a runtime error says the container is gone (runc: "does not exist",
    /// "not found"), which `delete` treats as done.
    pub fn is_runtime_not_found(&self) -> bool {
        match self {
            Error::RuntimeFailed { message, .. } => {
                let m = message.to_ascii_lowercase();
                m.contains("does not exist") || m.contains("not found")
            }
            _ => false,
        }
    }
}

/// Results of the shim's own code.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::Shim(containerd_shim::Error::NotFoundError(_)) => ttrpc::Code::NOT_FOUND,
            _ => ttrpc::Code::UNKNOWN,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_the_ones_containerd_maps_to_errdefs() {
        let status = |e: Error| match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        };
        assert_eq!(
            status(Error::NotFound("container c1".into())),
            (ttrpc::Code::NOT_FOUND, "container c1: not found".into())
        );
        assert_eq!(
            status(Error::AlreadyExists("exec e1".into())).0,
            ttrpc::Code::ALREADY_EXISTS
        );
        let failed = Error::RuntimeFailed {
            verb: "create".into(),
            message: "no such image".into(),
        };
        assert_eq!(
            status(failed),
            (
                ttrpc::Code::UNKNOWN,
                "OCI runtime create failed: no such image".into()
            )
        );
    }

    #[test]
    fn runtime_not_found_messages_are_recognised() {
        let e = |m: &str| Error::RuntimeFailed {
            verb: "delete".into(),
            message: m.into(),
        };
        assert!(e("container \"c1\" does not exist").is_runtime_not_found());
        assert!(e("c1: container Not Found").is_runtime_not_found());
        assert!(!e("permission denied").is_runtime_not_found());
    }
}
