//! Join tokens, in the k3s "secure token" shape:
//!
//! ```text
//! K10<sha256 of the CA certificate DER, 64 hex>::<id, 6 chars>.<secret, 32 chars>
//! ```
//!
//! The CA hash lets a joining agent pin the federation CA before it sends
//! the secret ([`crate::ca_pinned_client_config`]). The id names the token in
//! the hub's store; the hub keeps only [`JoinToken::secret_sha256`] and checks
//! a presented token with [`JoinToken::verify_secret`].

use std::fmt;
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{PkiError, Result, TokenError};

const PREFIX: &str = "K10";
const ID_LEN: usize = 6;
const SECRET_LEN: usize = 32;
const HASH_HEX_LEN: usize = 64;
/// Length of every valid token.
pub const TOKEN_LEN: usize = PREFIX.len() + HASH_HEX_LEN + 2 + ID_LEN + 1 + SECRET_LEN;
/// Inputs longer than this are refused before any other parsing, so the error
/// for a slightly wrong token can still say what is wrong with it.
const MAX_INPUT_LEN: usize = 256;
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A parsed join token. `Debug` redacts the secret; `Display` prints the
/// whole token (that is what an operator hands to a POP), so never log it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    ca_hash: [u8; 32],
    id: String,
    secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_hash", &hex::encode(self.ca_hash))
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}{}::{}.{}",
            hex::encode(self.ca_hash),
            self.id,
            self.secret
        )
    }
}

impl JoinToken {
    /// Generates a token for the CA with fingerprint `ca_fingerprint` (hex
    /// sha256 of its DER, see [`crate::CertificateAuthority::fingerprint`]),
    /// with a random id and a 32-character secret from the OS RNG
    /// (36^32 ≈ 2^165 possibilities).
    pub fn generate(ca_fingerprint: &str) -> Result<Self> {
        let ca_hash = decode_hash(ca_fingerprint).map_err(|_| TokenError::BadFingerprint)?;
        let rng = SystemRandom::new();
        Ok(Self {
            ca_hash,
            id: random_alnum(&rng, ID_LEN)?,
            secret: random_alnum(&rng, SECRET_LEN)?,
        })
    }

    /// Parses a token. Surrounding whitespace (a trailing newline from a
    /// file, say) is ignored; the CA hash may be upper- or lowercase hex.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(Self::parse_inner(s)?)
    }

    fn parse_inner(s: &str) -> std::result::Result<Self, TokenError> {
        if s.len() > MAX_INPUT_LEN {
            return Err(TokenError::TooLong {
                len: s.len(),
                max: MAX_INPUT_LEN,
            });
        }
        let s = s.trim();
        let rest = s.strip_prefix(PREFIX).ok_or(TokenError::WrongPrefix)?;
        let (hash, creds) = rest.split_once("::").ok_or(TokenError::MissingSeparator)?;
        let ca_hash = decode_hash(hash)?;
        let (id, secret) = creds.split_once('.').ok_or(TokenError::MissingDot)?;
        check_part("id", id, ID_LEN)?;
        check_part("secret", secret, SECRET_LEN)?;
        Ok(Self {
            ca_hash,
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The token id (public: it names the token in lists and logs).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pinned CA fingerprint, lowercase hex.
    pub fn ca_fingerprint(&self) -> String {
        hex::encode(self.ca_hash)
    }

    /// The secret itself. Send it only over a connection whose CA was pinned
    /// with [`crate::ca_pinned_client_config`]; never log it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Lowercase hex sha256 of the secret: what the hub stores instead of the
    /// secret.
    pub fn secret_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }

    /// Checks this token's secret against a stored [`Self::secret_sha256`]
    /// in constant time (so timing reveals nothing about the stored hash).
    /// A malformed stored hash never matches.
    pub fn verify_secret(&self, stored_hash: &str) -> bool {
        let Ok(stored) = decode_hash(stored_hash) else {
            return false;
        };
        let ours: [u8; 32] = Sha256::digest(self.secret.as_bytes()).into();
        ours.ct_eq(&stored).into()
    }

    /// Whether `ca_cert_der` is the CA this token pins.
    pub fn ca_matches(&self, ca_cert_der: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(ca_cert_der).into();
        digest == self.ca_hash
    }
}

impl FromStr for JoinToken {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

fn decode_hash(s: &str) -> std::result::Result<[u8; 32], TokenError> {
    if s.len() != HASH_HEX_LEN {
        return Err(TokenError::HashLength(s.len()));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| TokenError::HashNotHex)?;
    Ok(out)
}

fn check_part(what: &'static str, s: &str, len: usize) -> std::result::Result<(), TokenError> {
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(TokenError::BadCharset(what));
    }
    if s.len() != len {
        return Err(match what {
            "id" => TokenError::IdLength {
                expected: len,
                got: s.len(),
            },
            _ => TokenError::SecretLength {
                expected: len,
                got: s.len(),
            },
        });
    }
    Ok(())
}

/// `len` uniformly random characters of [`ALPHABET`]. Bytes >= 252 (7 * 36)
/// are dropped so the modulo does not bias the distribution.
fn random_alnum(rng: &SystemRandom, len: usize) -> Result<String> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.fill(&mut buf).map_err(|_| PkiError::Rng)?;
        for &b in &buf {
            if out.len() == len {
                break;
            }
            if usize::from(b) < ALPHABET.len() * 7 {
                out.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn generate_shape() {
        let t = JoinToken::generate(FP).unwrap();
        let s = t.to_string();
        assert_eq!(s.len(), TOKEN_LEN);
        assert!(s.starts_with(&format!("K10{FP}::")));
        assert_eq!(t.id().len(), 6);
        assert_eq!(t.secret().len(), 32);
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_ne!(JoinToken::generate(FP).unwrap(), t);
    }

    #[test]
    fn debug_redacts_secret() {
        let t = JoinToken::generate(FP).unwrap();
        let d = format!("{t:?}");
        assert!(!d.contains(t.secret()), "{d}");
        assert!(d.contains("redacted"));
        assert!(d.contains(t.id()));
    }

    #[test]
    fn verify_secret_and_ca() {
        let t = JoinToken::generate(FP).unwrap();
        let stored = t.secret_sha256();
        assert!(t.verify_secret(&stored));
        let other = JoinToken::generate(FP).unwrap();
        assert!(!other.verify_secret(&stored));
        assert!(!t.verify_secret("zz"));
        assert!(!t.verify_secret(""));

        let ca = crate::CertificateAuthority::generate("example.org").unwrap();
        let t = JoinToken::generate(&ca.fingerprint()).unwrap();
        assert!(t.ca_matches(ca.cert_der()));
        let other_ca = crate::CertificateAuthority::generate("example.org").unwrap();
        assert!(!t.ca_matches(other_ca.cert_der()));
    }

    #[test]
    fn parse_errors_are_specific() {
        let good = format!("K10{FP}::abc123.{}", "s".repeat(32));
        assert!(JoinToken::parse(&good).is_ok());
        assert!(JoinToken::parse(&format!("{good}\n")).is_ok());

        let cases: Vec<(String, TokenError)> = vec![
            (good.replacen("K10", "K11", 1), TokenError::WrongPrefix),
            (good.replace("::", ":"), TokenError::MissingSeparator),
            (good.replace('.', "-"), TokenError::MissingDot),
            (
                format!("K10{}::abc123.{}", &FP[1..], "s".repeat(32)),
                TokenError::HashLength(63),
            ),
            (
                format!("K10{}g::abc123.{}", &FP[1..], "s".repeat(32)),
                TokenError::HashNotHex,
            ),
            (
                format!("K10{FP}::abc12.{}", "s".repeat(32)),
                TokenError::IdLength {
                    expected: 6,
                    got: 5,
                },
            ),
            (
                format!("K10{FP}::abc123.{}", "s".repeat(31)),
                TokenError::SecretLength {
                    expected: 32,
                    got: 31,
                },
            ),
            (
                format!("K10{FP}::ABC123.{}", "s".repeat(32)),
                TokenError::BadCharset("id"),
            ),
            (
                format!("K10{FP}::abc123.{}!", "s".repeat(31)),
                TokenError::BadCharset("secret"),
            ),
            (
                "x".repeat(1000),
                TokenError::TooLong {
                    len: 1000,
                    max: MAX_INPUT_LEN,
                },
            ),
        ];
        for (input, want) in cases {
            match JoinToken::parse(&input) {
                Err(PkiError::Token(got)) => assert_eq!(got, want, "{input}"),
                other => panic!("{input}: expected {want:?}, got {other:?}"),
            }
        }
        // Messages tell the user what is wrong.
        let msg = JoinToken::parse("K11").unwrap_err().to_string();
        assert!(msg.contains("K10"), "{msg}");
    }

    #[test]
    fn generate_rejects_bad_fingerprint() {
        assert!(JoinToken::generate("abc").is_err());
        assert!(JoinToken::generate(&"g".repeat(64)).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(hash in "[0-9a-f]{64}", id in "[a-z0-9]{6}", secret in "[a-z0-9]{32}") {
            let s = format!("K10{hash}::{id}.{secret}");
            let t = JoinToken::parse(&s).unwrap();
            prop_assert_eq!(t.to_string(), s);
            prop_assert_eq!(t.id(), id.as_str());
            prop_assert!(t.verify_secret(&t.secret_sha256()));
        }

        #[test]
        fn generated_round_trip(hash in "[0-9a-f]{64}") {
            let t = JoinToken::generate(&hash).unwrap();
            prop_assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        }

        #[test]
        fn arbitrary_input_never_panics(s in ".{0,400}") {
            let _ = JoinToken::parse(&s);
        }

        #[test]
        fn near_miss_input_never_panics(s in "K10[0-9a-fA-F:.]{0,70}[:.]{0,3}[a-z0-9.]{0,40}") {
            let _ = JoinToken::parse(&s);
        }
    }
}
