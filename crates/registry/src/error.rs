//! Errors of the state directory, IDs and names.

use std::path::PathBuf;

/// What can go wrong with a VM's home or the registry of VMs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem or socket operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A state file is not valid JSON of the expected shape.
    #[error("state file {} is corrupt", path.display())]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A state file was written by a forkvm with another schema.
    #[error("state file {} has schema version {found}; this forkvm reads version {}", path.display(), crate::SCHEMA_VERSION)]
    Schema {
        /// The state file.
        path: PathBuf,
        /// Its schema version.
        found: u32,
    },
    /// No VM has that name, ID or ID prefix.
    #[error("no VM is named {0:?} or has an ID starting with it")]
    NotFound(String),
    /// An ID prefix matches more than one VM.
    #[error("{query:?} is ambiguous: it starts the IDs of {}", matches.join(", "))]
    Ambiguous {
        /// What was asked for.
        query: String,
        /// The IDs it matches.
        matches: Vec<String>,
    },
    /// Not a VM ID (32 lowercase hex digits).
    #[error("invalid VM ID {0:?}: an ID is 32 lowercase hex digits")]
    InvalidId(String),
    /// A name that cannot be used.
    #[error("invalid VM name {0:?}: use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit, not 32 hex digits")]
    InvalidName(String),
    /// A name another VM already has.
    #[error("the name {name:?} is already used by VM {id}")]
    NameInUse {
        /// The name.
        name: String,
        /// The VM that has it.
        id: String,
    },
}

impl Error {
    /// A mapper from an I/O error to [`Error::Io`] saying what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
