//! Errors and exit codes. Scripts can rely on the code:
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | other failure |
//! | 2 | bad usage (flags, arguments) |
//! | 3 | not found (no such volume or node) |
//! | 4 | already exists |
//! | 5 | invalid argument (bad size, name, settings) |
//! | 6 | cluster unreachable or unavailable |
//! | 7 | not possible in the cluster's current state (not initialized, placement impossible) |
//! | 8 | unauthenticated: no credentials, or an unknown, revoked or expired token |
//! | 9 | permission denied: the credentials do not allow this |
//! | 10 | verification failed: the audit log's hash chain is broken on some node |
//! | 11 | `basalt status`: the cluster needs attention (the findings say what) |

use std::fmt;

/// A CLI failure: message plus exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// Message.
    pub message: String,
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl CliError {
    /// Exit 1.
    pub fn other(m: impl Into<String>) -> Self {
        Self { code: 1, message: m.into() }
    }
    /// Exit 2.
    pub fn usage(m: impl Into<String>) -> Self {
        Self { code: 2, message: m.into() }
    }
    /// Exit 3.
    pub fn not_found(m: impl Into<String>) -> Self {
        Self { code: 3, message: m.into() }
    }
    /// Exit 5.
    pub fn invalid(m: impl Into<String>) -> Self {
        Self { code: 5, message: m.into() }
    }
    /// Exit 6.
    pub fn unreachable(m: impl Into<String>) -> Self {
        Self { code: 6, message: m.into() }
    }
    /// Exit 11: `basalt status` found something that needs attention (already printed).
    pub fn unhealthy() -> Self {
        Self { code: 11, message: String::new() }
    }
    /// Exit 8.
    pub fn unauthenticated(m: impl Into<String>) -> Self {
        Self { code: 8, message: m.into() }
    }

    /// Maps a gRPC status from the cluster.
    pub fn from_status(s: &tonic::Status) -> Self {
        let code = match s.code() {
            tonic::Code::NotFound => 3,
            tonic::Code::AlreadyExists => 4,
            tonic::Code::InvalidArgument => 5,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => 6,
            tonic::Code::FailedPrecondition => 7,
            tonic::Code::Unauthenticated => 8,
            tonic::Code::PermissionDenied => 9,
            _ => 1,
        };
        Self { code, message: s.message().to_string() }
    }
}
