//! SPIFFE identities of Switchyard components.
//!
//! Every leaf certificate carries exactly one URI SAN holding one of:
//!
//! | kind     | SPIFFE ID                                      |
//! |----------|------------------------------------------------|
//! | hub      | `spiffe://<domain>/hub/<node>` (node: `u64`)   |
//! | POP      | `spiffe://<domain>/pop/<pop>`                  |
//! | gateway  | `spiffe://<domain>/pop/<pop>/gw/<instance>`    |
//! | operator | `spiffe://<domain>/op/<name>`                  |
//!
//! Parsing is strict and canonical: exactly one textual form is accepted for
//! each identity, so two certificates with "equal" identities always carry the
//! same bytes and string comparison of IDs is safe.

use std::fmt;
use std::str::FromStr;

use crate::error::{truncate_for_error, PkiError, Result};

const SCHEME: &str = "spiffe://";
/// Max length of a DNS name in text form (RFC 1035), also our domain limit.
const MAX_DOMAIN_LEN: usize = 253;
/// Max length of one DNS label / Switchyard name.
const MAX_LABEL_LEN: usize = 63;

/// The identity of a Switchyard component, as carried in its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpiffeId {
    /// A hub node: `spiffe://<domain>/hub/<node>`.
    Hub {
        /// Federation trust domain.
        domain: String,
        /// Raft node id.
        node: u64,
    },
    /// A POP agent: `spiffe://<domain>/pop/<pop>`.
    Pop {
        /// Federation trust domain.
        domain: String,
        /// POP name (DNS label).
        pop: String,
    },
    /// A gateway instance of a POP: `spiffe://<domain>/pop/<pop>/gw/<instance>`.
    Gateway {
        /// Federation trust domain.
        domain: String,
        /// POP name (DNS label).
        pop: String,
        /// Gateway instance name (DNS label).
        instance: String,
    },
    /// A human or automation operator: `spiffe://<domain>/op/<name>`.
    Operator {
        /// Federation trust domain.
        domain: String,
        /// Operator name (DNS label).
        name: String,
    },
}

impl SpiffeId {
    /// A hub identity, validating the domain.
    pub fn hub(domain: &str, node: u64) -> Result<Self> {
        validate_domain(domain)?;
        Ok(Self::Hub {
            domain: domain.to_owned(),
            node,
        })
    }

    /// A POP identity, validating domain and POP name.
    pub fn pop(domain: &str, pop: &str) -> Result<Self> {
        validate_domain(domain)?;
        validate_label("pop name", pop)?;
        Ok(Self::Pop {
            domain: domain.to_owned(),
            pop: pop.to_owned(),
        })
    }

    /// A gateway identity, validating domain, POP and instance names.
    pub fn gateway(domain: &str, pop: &str, instance: &str) -> Result<Self> {
        validate_domain(domain)?;
        validate_label("pop name", pop)?;
        validate_label("gateway instance name", instance)?;
        Ok(Self::Gateway {
            domain: domain.to_owned(),
            pop: pop.to_owned(),
            instance: instance.to_owned(),
        })
    }

    /// An operator identity, validating domain and operator name.
    pub fn operator(domain: &str, name: &str) -> Result<Self> {
        validate_domain(domain)?;
        validate_label("operator name", name)?;
        Ok(Self::Operator {
            domain: domain.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The trust domain of this identity.
    pub fn domain(&self) -> &str {
        match self {
            Self::Hub { domain, .. }
            | Self::Pop { domain, .. }
            | Self::Gateway { domain, .. }
            | Self::Operator { domain, .. } => domain,
        }
    }

    /// The POP this identity belongs to (POP agents and their gateways).
    pub fn pop_name(&self) -> Option<&str> {
        match self {
            Self::Pop { pop, .. } | Self::Gateway { pop, .. } => Some(pop),
            Self::Hub { .. } | Self::Operator { .. } => None,
        }
    }

    /// Short lowercase name of the kind: `hub`, `pop`, `gateway`, `operator`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hub { .. } => "hub",
            Self::Pop { .. } => "pop",
            Self::Gateway { .. } => "gateway",
            Self::Operator { .. } => "operator",
        }
    }

    /// Checks every field, for values built directly through the enum
    /// variants (which bypass the constructors' validation).
    pub fn validate(&self) -> Result<()> {
        validate_domain(self.domain())?;
        match self {
            Self::Hub { .. } => Ok(()),
            Self::Pop { pop, .. } => validate_label("pop name", pop),
            Self::Gateway { pop, instance, .. } => {
                validate_label("pop name", pop)?;
                validate_label("gateway instance name", instance)
            }
            Self::Operator { name, .. } => validate_label("operator name", name),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hub { domain, node } => write!(f, "{SCHEME}{domain}/hub/{node}"),
            Self::Pop { domain, pop } => write!(f, "{SCHEME}{domain}/pop/{pop}"),
            Self::Gateway {
                domain,
                pop,
                instance,
            } => write!(f, "{SCHEME}{domain}/pop/{pop}/gw/{instance}"),
            Self::Operator { domain, name } => write!(f, "{SCHEME}{domain}/op/{name}"),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason: String| PkiError::InvalidSpiffeId {
            input: truncate_for_error(s),
            reason,
        };
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("must start with \"spiffe://\"".into()))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("missing path after the trust domain".into()))?;
        validate_domain(domain).map_err(|e| invalid(e.to_string()))?;

        let segments: Vec<&str> = path.split('/').collect();
        let label = |what: &'static str, v: &str| -> Result<String> {
            validate_label(what, v).map_err(|e| invalid(e.to_string()))?;
            Ok(v.to_owned())
        };
        let domain = domain.to_owned();
        match segments.as_slice() {
            ["hub", node] => Ok(Self::Hub {
                domain,
                node: parse_node(node).map_err(invalid)?,
            }),
            ["pop", pop] => Ok(Self::Pop {
                domain,
                pop: label("pop name", pop)?,
            }),
            ["pop", pop, "gw", instance] => Ok(Self::Gateway {
                domain,
                pop: label("pop name", pop)?,
                instance: label("gateway instance name", instance)?,
            }),
            ["op", name] => Ok(Self::Operator {
                domain,
                name: label("operator name", name)?,
            }),
            _ => Err(invalid(
                "path must be /hub/<node>, /pop/<pop>, /pop/<pop>/gw/<instance> or /op/<name>"
                    .into(),
            )),
        }
    }
}

/// Parses a node id in canonical decimal form only (no sign, no leading
/// zeros), so that Display/parse is a bijection.
fn parse_node(s: &str) -> std::result::Result<u64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("hub node id must be a decimal number".into());
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err("hub node id must not have leading zeros".into());
    }
    s.parse::<u64>()
        .map_err(|_| "hub node id does not fit in 64 bits".into())
}

/// Checks a Switchyard name: lowercase `a-z`, `0-9`, `-`, 1..=63 characters,
/// no leading or trailing `-` (a DNS label, so names can appear in DNS).
pub fn validate_label(what: &'static str, s: &str) -> Result<()> {
    let err = |reason: &str| PkiError::InvalidName {
        what,
        input: truncate_for_error(s),
        reason: reason.to_owned(),
    };
    if s.is_empty() {
        return Err(err("must not be empty"));
    }
    if s.len() > MAX_LABEL_LEN {
        return Err(err("must be at most 63 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(err(
            "may contain only lowercase letters a-z, digits 0-9 and '-'",
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(err("must not start or end with '-'"));
    }
    Ok(())
}

/// Checks a trust domain: a lowercase DNS name of dot-separated labels, at
/// most 253 characters, no trailing dot.
pub fn validate_domain(s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(PkiError::InvalidName {
            what: "domain",
            input: String::new(),
            reason: "must not be empty".into(),
        });
    }
    if s.len() > MAX_DOMAIN_LEN {
        return Err(PkiError::InvalidName {
            what: "domain",
            input: truncate_for_error(s),
            reason: "must be at most 253 characters".into(),
        });
    }
    for label in s.split('.') {
        validate_label("domain", label).map_err(|e| match e {
            PkiError::InvalidName { reason, .. } => PkiError::InvalidName {
                what: "domain",
                input: truncate_for_error(s),
                reason: format!("label {:?} {reason}", truncate_for_error(label)),
            },
            other => other,
        })?;
    }
    Ok(())
}

/// Extracts the SPIFFE ID of a DER certificate: it must carry exactly one URI
/// SAN, which must parse as a [`SpiffeId`]. Other SAN types are ignored (the
/// SPIFFE X.509-SVID rule), though our CA never issues any.
///
/// This does not verify the certificate; call it on certificates that a TLS
/// verifier has already accepted.
pub fn peer_identity(cert_der: &[u8]) -> Result<SpiffeId> {
    use x509_parser::extensions::GeneralName;

    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::CertificateParse(
            "trailing bytes after the certificate".into(),
        ));
    }
    // x509-parser reports a duplicated SAN extension as an error, which we
    // want: two SAN extensions would be an ambiguity.
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::CertificateParse(format!("subject alternative name: {e}")))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => uri.parse(),
        _ => Err(PkiError::UriSanCount { found: uris.len() }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_all_kinds() {
        let cases = [
            (
                "spiffe://example.org/hub/1",
                SpiffeId::Hub {
                    domain: "example.org".into(),
                    node: 1,
                },
            ),
            (
                "spiffe://sy/pop/fra-1",
                SpiffeId::Pop {
                    domain: "sy".into(),
                    pop: "fra-1".into(),
                },
            ),
            (
                "spiffe://a.b.c/pop/fra/gw/0",
                SpiffeId::Gateway {
                    domain: "a.b.c".into(),
                    pop: "fra".into(),
                    instance: "0".into(),
                },
            ),
            (
                "spiffe://x.io/op/alice",
                SpiffeId::Operator {
                    domain: "x.io".into(),
                    name: "alice".into(),
                },
            ),
        ];
        for (s, id) in cases {
            assert_eq!(s.parse::<SpiffeId>().unwrap(), id, "{s}");
            assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn rejects_non_canonical_and_bad() {
        let bad = [
            "",
            "spiffe://",
            "spiffe://example.org",
            "spiffe://example.org/",
            "SPIFFE://example.org/hub/1",
            "spiffe://Example.org/hub/1",
            "spiffe://example.org./hub/1",
            "spiffe://.example.org/hub/1",
            "spiffe://exa_mple.org/hub/1",
            "spiffe://example.org/hub/01",
            "spiffe://example.org/hub/+1",
            "spiffe://example.org/hub/-1",
            "spiffe://example.org/hub/18446744073709551616",
            "spiffe://example.org/hub/1/",
            "spiffe://example.org/hub/",
            "spiffe://example.org/pop/-fra",
            "spiffe://example.org/pop/fra-",
            "spiffe://example.org/pop/FRA",
            "spiffe://example.org/pop/fra/gw",
            "spiffe://example.org/pop/fra/gw/",
            "spiffe://example.org/pop/fra/gw/a/b",
            "spiffe://example.org/op/a%20b",
            "spiffe://example.org/op/a?b",
            "spiffe://user@example.org/op/a",
            "spiffe://example.org:443/op/a",
            "spiffe://example.org//op/a",
            "spiffe://example.org/other/a",
        ];
        for s in bad {
            assert!(s.parse::<SpiffeId>().is_err(), "{s:?} should be rejected");
        }
        let long = "a".repeat(64);
        assert!(format!("spiffe://x/pop/{long}")
            .parse::<SpiffeId>()
            .is_err());
        assert!(format!("spiffe://x/pop/{}", &long[..63])
            .parse::<SpiffeId>()
            .is_ok());
        let long_domain = vec!["abcdefghi"; 26].join("."); // 259 chars
        assert!(format!("spiffe://{long_domain}/hub/1")
            .parse::<SpiffeId>()
            .is_err());
    }

    #[test]
    fn constructors_validate() {
        assert!(SpiffeId::pop("example.org", "Bad").is_err());
        assert!(SpiffeId::hub("", 1).is_err());
        assert!(SpiffeId::gateway("d", "p", "-i").is_err());
        assert!(SpiffeId::operator("d", "ok").is_ok());
        let raw = SpiffeId::Pop {
            domain: "d".into(),
            pop: "x/y".into(),
        };
        assert!(raw.validate().is_err());
    }

    #[test]
    fn error_message_is_clear() {
        let e = "spiffe://example.org/pop/FRA"
            .parse::<SpiffeId>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("pop name"), "{e}");
        assert!(e.contains("lowercase"), "{e}");
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
    }

    fn domain() -> impl Strategy<Value = String> {
        prop::collection::vec(label(), 1..4)
            .prop_map(|v| v.join("."))
            .prop_filter("domain too long", |d| d.len() <= 253)
    }

    fn spiffe_id() -> impl Strategy<Value = SpiffeId> {
        prop_oneof![
            (domain(), any::<u64>()).prop_map(|(domain, node)| SpiffeId::Hub { domain, node }),
            (domain(), label()).prop_map(|(domain, pop)| SpiffeId::Pop { domain, pop }),
            (domain(), label(), label()).prop_map(|(domain, pop, instance)| {
                SpiffeId::Gateway {
                    domain,
                    pop,
                    instance,
                }
            }),
            (domain(), label()).prop_map(|(domain, name)| SpiffeId::Operator { domain, name }),
        ]
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(id in spiffe_id()) {
            prop_assert!(id.validate().is_ok());
            let s = id.to_string();
            prop_assert_eq!(s.parse::<SpiffeId>().unwrap(), id);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            let _ = s.parse::<SpiffeId>();
        }

        #[test]
        fn near_miss_strings_never_panic(s in "spiffe://[a-z0-9.\\-]{0,20}/(hub|pop|op|gw)?/[a-z0-9/\\-]{0,30}") {
            if let Ok(id) = s.parse::<SpiffeId>() {
                // Whatever parses must print back to the very same text.
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn arbitrary_der_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = peer_identity(&bytes);
        }
    }
}
