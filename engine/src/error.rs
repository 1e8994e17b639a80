//! The engine's error type: every variant names the file, field or tensor it is about.

use std::path::PathBuf;

/// Errors of the engine. Loading errors always carry the path and the key or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON or TOML document did not parse or a field had the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The document at fault.
        path: PathBuf,
        /// What was wrong, naming the field.
        message: String,
    },
    /// A configuration value is missing or unsupported.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// The field at fault.
        field: String,
        /// What was wrong.
        message: String,
    },
    /// A tensor is missing from a checkpoint or has the wrong shape or dtype.
    #[error("{path}: tensor `{name}`: {message}")]
    Tensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor's key.
        name: String,
        /// What was wrong.
        message: String,
    },
    /// A GGUF file is malformed or uses an unsupported feature.
    #[error("{path}: GGUF: {message}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The tokenizer could not be loaded or failed to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A dataset record is invalid; names the file, the line (1-based) and the field.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// The 1-based line (JSONL, CSV) or record number (JSON array).
        line: usize,
        /// What was wrong, naming the field.
        message: String,
    },
    /// An argument given by the caller is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The GPU device could not be opened or a GPU operation failed (driver, NVRTC, cuBLAS).
    #[error("GPU: {0}")]
    Device(String),
    /// Training was cancelled through its cancellation token.
    #[error("cancelled")]
    Cancelled,
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A parse error on `path`.
    pub fn parse(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Parse {
            path: path.into(),
            message: message.to_string(),
        }
    }

    /// A configuration error on `field` of `path`.
    pub fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl std::fmt::Display,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// A tensor error on `name` of `path`.
    pub fn tensor(
        path: impl Into<PathBuf>,
        name: impl Into<String>,
        message: impl std::fmt::Display,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            name: name.into(),
            message: message.to_string(),
        }
    }
}
