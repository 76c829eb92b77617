//! Error types of the PKI crate.

/// Result alias used throughout the crate.
pub type Result<T, E = PkiError> = std::result::Result<T, E>;

/// Everything that can go wrong in the PKI crate. Messages say what failed
/// and, where it helps, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A string is not a valid Switchyard SPIFFE ID.
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId {
        /// The offending input (truncated if long).
        input: String,
        /// Why it was refused.
        reason: String,
    },

    /// A name (domain, POP, gateway, operator) is not DNS-label safe.
    #[error("invalid {what} {input:?}: {reason}")]
    InvalidName {
        /// Which kind of name was checked ("domain", "pop name", ...).
        what: &'static str,
        /// The offending input (truncated if long).
        input: String,
        /// Why it was refused.
        reason: String,
    },

    /// A certificate does not carry exactly one URI SAN.
    #[error(
        "certificate must carry exactly one URI SAN (its SPIFFE ID), found {found}; \
         it was not issued by a Switchyard CA"
    )]
    UriSanCount {
        /// How many URI SANs were found.
        found: usize,
    },

    /// DER/PEM certificate data could not be parsed.
    #[error("cannot parse certificate: {0}")]
    CertificateParse(String),

    /// PEM input is malformed or holds nothing of the expected kind.
    #[error("cannot read {what} from PEM: {reason}")]
    Pem {
        /// What was expected ("certificate", "private key", ...).
        what: &'static str,
        /// Why it failed.
        reason: String,
    },

    /// The peer's verified identity is not the one we expected.
    #[error("peer is {found}, but {expected} was expected; check the address you connect to")]
    UnexpectedPeer {
        /// What was expected.
        expected: String,
        /// The identity the peer's certificate carries.
        found: String,
    },

    /// The peer presented no certificate where one is required.
    #[error("peer presented no certificate; it must authenticate with a certificate issued by the federation CA")]
    NoPeerCertificate,

    /// Certificate, key or CSR generation in rcgen failed.
    #[error("{what} failed: {source}")]
    Rcgen {
        /// The operation that failed.
        what: &'static str,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },

    /// The supplied CA certificate/key pair is unusable.
    #[error("invalid CA: {0}")]
    InvalidCa(String),

    /// A CSR was refused by [`crate::CertificateAuthority::sign_csr`].
    #[error("certificate signing request refused: {0}")]
    CsrRejected(String),

    /// An identity outside the CA's trust domain was to be certified.
    #[error("identity {id} is outside this CA's trust domain {domain:?}")]
    WrongDomain {
        /// The identity asked for.
        id: String,
        /// The CA's trust domain.
        domain: String,
    },

    /// A validity period is unusable (zero, or too large to represent).
    #[error("invalid validity period: {0}")]
    InvalidValidity(String),

    /// A join token is malformed.
    #[error("invalid join token: {0}")]
    Token(#[from] TokenError),

    /// The operating system random number generator failed.
    #[error("the system random number generator failed; cannot generate secrets")]
    Rng,

    /// rustls refused a configuration (bad key, unsupported protocol, ...).
    #[error("TLS configuration error: {0}")]
    Tls(#[from] rustls::Error),

    /// The client-certificate verifier could not be built (e.g. empty CA store).
    #[error("cannot build client certificate verifier: {0}")]
    VerifierBuild(#[from] rustls::server::VerifierBuilderError),
}

/// Why a join token string was refused. Tokens look like
/// `K10<64 hex chars>::<6 chars>.<32 chars>`; ask the hub operator for a fresh
/// one if yours does not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Input longer than any valid token.
    #[error(
        "input is {len} bytes, longer than any join token ({max}); check you pasted only the token"
    )]
    TooLong {
        /// Input length in bytes.
        len: usize,
        /// Maximum accepted length.
        max: usize,
    },
    /// Token does not start with `K10`.
    #[error("token must start with \"K10\" (secure token format)")]
    WrongPrefix,
    /// No `::` separating the CA hash from the credentials.
    #[error("token is missing the \"::\" between the CA hash and the credentials")]
    MissingSeparator,
    /// No `.` separating the token id from the secret.
    #[error("token is missing the \".\" between the token id and the secret")]
    MissingDot,
    /// CA hash is not 64 characters.
    #[error("CA hash must be 64 hex characters (sha256), got {0}")]
    HashLength(usize),
    /// CA hash is not hexadecimal.
    #[error("CA hash must be hexadecimal")]
    HashNotHex,
    /// Token id has the wrong length.
    #[error("token id must be {expected} characters, got {got}")]
    IdLength {
        /// Required length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// Secret has the wrong length.
    #[error("token secret must be {expected} characters, got {got}")]
    SecretLength {
        /// Required length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// Id or secret uses characters outside lowercase a-z and 0-9.
    #[error("token {0} may contain only lowercase letters a-z and digits 0-9")]
    BadCharset(&'static str),
    /// A CA fingerprint given to [`crate::JoinToken::generate`] is not a sha256 hex string.
    #[error("CA fingerprint must be 64 hex characters (sha256 of the CA certificate DER)")]
    BadFingerprint,
}

/// Shortens attacker-controlled input before it goes into an error message,
/// so a huge input cannot bloat logs.
pub(crate) fn truncate_for_error(s: &str) -> String {
    const MAX: usize = 96;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
