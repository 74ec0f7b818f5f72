//! What kind of failure an error is, and the one mapping from that to an HTTP status.
//!
//! Every error type of flintd (the VM layer's, the services', the infrastructure's) says what kind of failure it
//! is through [`Classify`]; the edges that answer callers (the API, the front end for exposed ports, the E2B
//! endpoint) turn a kind into a status with [`Kind::status`] and nothing else, so one error is one status
//! wherever it surfaces (`tests::the_api_and_the_front_end_agree`).

/// The kinds of failure a caller is told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The request is wrong (a bad id, a limit, a malformed body): nothing was started. 400.
    Invalid,
    /// The caller is not allowed (a missing or wrong token or key). 401.
    Unauthorized,
    /// No such VM, session, template, snapshot or route. 404.
    NotFound,
    /// It exists but is in the wrong state, or the name is taken. 409.
    Conflict,
    /// More than a limit allows in one request (a body, a file). 413.
    TooLarge,
    /// A quota of flintd's configuration would be exceeded: nothing was started. 429.
    Quota,
    /// flintd's own fault (its database, a file it owns). 500.
    Internal,
    /// The guest or its VMM failed the operation (the VM is failed, the agent did not answer). 502.
    Guest,
    /// Something flintd depends on is not available now (the bucket, the host's network setup): retry later.
    /// 503.
    Unavailable,
}

impl Kind {
    /// The HTTP status of this kind: the one mapping every edge uses.
    pub fn status(self) -> u16 {
        match self {
            Kind::Invalid => 400,
            Kind::Unauthorized => 401,
            Kind::NotFound => 404,
            Kind::Conflict => 409,
            Kind::TooLarge => 413,
            Kind::Quota => 429,
            Kind::Internal => 500,
            Kind::Guest => 502,
            Kind::Unavailable => 503,
        }
    }

    /// The reason phrase of [`Kind::status`].
    pub fn reason(self) -> &'static str {
        match self {
            Kind::Invalid => "Bad Request",
            Kind::Unauthorized => "Unauthorized",
            Kind::NotFound => "Not Found",
            Kind::Conflict => "Conflict",
            Kind::TooLarge => "Payload Too Large",
            Kind::Quota => "Too Many Requests",
            Kind::Internal => "Internal Server Error",
            Kind::Guest => "Bad Gateway",
            Kind::Unavailable => "Service Unavailable",
        }
    }

    pub const ALL: [Kind; 9] = [
        Kind::Invalid,
        Kind::Unauthorized,
        Kind::NotFound,
        Kind::Conflict,
        Kind::TooLarge,
        Kind::Quota,
        Kind::Internal,
        Kind::Guest,
        Kind::Unavailable,
    ];
}

/// An error that knows what kind of failure it is.
pub trait Classify: std::error::Error + Send + Sync + 'static {
    fn kind(&self) -> Kind;
}

impl Classify for flint_snapshot_store::StoreError {
    fn kind(&self) -> Kind {
        use flint_snapshot_store::StoreError as E;
        match self {
            E::InvalidInput(_) => Kind::Invalid,
            E::Exists { .. } | E::Busy(_) => Kind::Conflict,
            E::NotFound { .. } | E::NoImage { .. } => Kind::NotFound,
            E::Unavailable(_) | E::NoRemote => Kind::Unavailable,
            _ => Kind::Internal,
        }
    }
}

impl Classify for crate::db::DbError {
    fn kind(&self) -> Kind {
        Kind::Internal
    }
}

impl Classify for flint_vmm_api::config::ConfigError {
    fn kind(&self) -> Kind {
        Kind::Invalid
    }
}

/// The store's error with its whole chain of causes in one sentence (what callers are shown).
pub fn store_message(e: &flint_snapshot_store::StoreError) -> String {
    flint_snapshot_store::error_chain(e)
}

/// A refusal as the edges send it: a kind (its status) and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: Kind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: Kind, message: impl Into<String>) -> Refusal {
        Refusal { kind, message: message.into() }
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }
}

impl<E: Classify> From<E> for Refusal {
    fn from(e: E) -> Refusal {
        Refusal { kind: e.kind(), message: e.to_string() }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_status() {
        let mut seen: Vec<u16> = Kind::ALL.iter().map(|k| k.status()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), Kind::ALL.len());
        assert!(Kind::ALL.iter().all(|k| (400..600).contains(&k.status()) && !k.reason().is_empty()));
    }
}
