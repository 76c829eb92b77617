//! The agent's data directory: what enrolment leaves behind and what the
//! agent keeps between starts.
//!
//! ```text
//! DATA_DIR/
//!   agent.toml        POP, domain, hub addresses (written last at enrolment:
//!                     its presence means "enrolled")
//!   tls/pop.crt       the POP's certificate (PEM), replaced on renewal
//!   tls/pop.key       its private key (PEM, mode 0600)
//!   tls/ca.crt        the federation CA (PEM): the trust anchor
//!   view.lkg          last-known-good view (see `lkg`)
//!   export_seq        highest export seq the hub acknowledged (decimal)
//! ```
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync
//! of the directory), so a crash leaves either the old or the new contents.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the enrolment record in the data dir.
pub const AGENT_TOML: &str = "agent.toml";
/// Name of the acknowledged export seq file in the data dir.
pub const EXPORT_SEQ_FILE: &str = "export_seq";
/// Certificate file, under `tls/`.
pub const CERT_FILE: &str = "pop.crt";
/// Private key file, under `tls/`.
pub const KEY_FILE: &str = "pop.key";
/// CA file, under `tls/`.
pub const CA_FILE: &str = "ca.crt";

/// Errors reading or writing the data dir.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `agent.toml` does not parse.
    #[error("{path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The enrolment record (`agent.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRecord {
    /// This POP's name (from the token, as the hub answered).
    pub pop: String,
    /// Trust domain of the federation.
    pub domain: String,
    /// gRPC addresses (`host:port`) of hub nodes: enrolment and diagnostics.
    #[serde(default)]
    pub hub_grpc: Vec<String>,
    /// QUIC uplink addresses (`host:port`) of hub nodes, tried in rotation.
    #[serde(default)]
    pub hub_quic: Vec<String>,
}

/// Paths in one data dir.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data dir at `root` (no I/O).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `agent.toml`.
    pub fn record_path(&self) -> PathBuf {
        self.root.join(AGENT_TOML)
    }

    /// `tls/`.
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    /// `tls/pop.crt`.
    pub fn cert_path(&self) -> PathBuf {
        self.tls_dir().join(CERT_FILE)
    }

    /// `tls/pop.key`.
    pub fn key_path(&self) -> PathBuf {
        self.tls_dir().join(KEY_FILE)
    }

    /// `tls/ca.crt`.
    pub fn ca_path(&self) -> PathBuf {
        self.tls_dir().join(CA_FILE)
    }

    /// `export_seq`.
    pub fn export_seq_path(&self) -> PathBuf {
        self.root.join(EXPORT_SEQ_FILE)
    }

    /// Creates the directory and `tls/` (0700) and checks that files can be
    /// written there, so that enrolment never spends a token it cannot
    /// record.
    pub fn prepare(&self) -> Result<(), ConfigError> {
        let tls = self.tls_dir();
        std::fs::create_dir_all(&tls).map_err(io_err(&tls))?;
        set_mode(&tls, 0o700)?;
        let probe = self.root.join(".write-test");
        write_atomic(&probe, b"ok", 0o600)?;
        std::fs::remove_file(&probe).map_err(io_err(&probe))?;
        Ok(())
    }

    /// Whether enrolment finished here (`agent.toml` exists).
    pub fn is_enrolled(&self) -> bool {
        self.record_path().exists()
    }

    /// Reads `agent.toml`.
    pub fn load_record(&self) -> Result<AgentRecord, ConfigError> {
        let path = self.record_path();
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path,
            reason: e.to_string(),
        })
    }

    /// Writes `agent.toml`.
    pub fn store_record(&self, record: &AgentRecord) -> Result<(), ConfigError> {
        let path = self.record_path();
        let text = toml::to_string(record).map_err(|e| ConfigError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let text = format!("# Written by `switchyard agent` at enrolment.\n{text}");
        write_atomic(&path, text.as_bytes(), 0o644)
    }

    /// Reads the certificate, key and CA PEMs.
    pub fn load_identity(&self) -> Result<Identity, ConfigError> {
        let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(io_err(&p));
        Ok(Identity {
            cert_pem: read(self.cert_path())?,
            key_pem: read(self.key_path())?,
            ca_pem: read(self.ca_path())?,
        })
    }

    /// Writes the CA, the key (0600) and the certificate.
    pub fn store_identity(&self, id: &Identity) -> Result<(), ConfigError> {
        let tls = self.tls_dir();
        std::fs::create_dir_all(&tls).map_err(io_err(&tls))?;
        write_atomic(&self.ca_path(), id.ca_pem.as_bytes(), 0o644)?;
        // Key, then certificate: a crash in between leaves a pair that does
        // not match, which fails the next handshake loudly (and renewal
        // only writes once the new certificate is in hand).
        write_atomic(&self.key_path(), id.key_pem.as_bytes(), 0o600)?;
        write_atomic(&self.cert_path(), id.cert_pem.as_bytes(), 0o644)
    }

    /// The acknowledged export seq (0 when the file is missing or invalid:
    /// the next session then sends the whole set, above the hub's seq).
    pub fn load_export_seq(&self) -> u64 {
        let path = self.export_seq_path();
        match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse().unwrap_or_else(|_| {
                tracing::warn!(file = %path.display(), "export seq file is invalid; starting from 0");
                0
            }),
            Err(_) => 0,
        }
    }

    /// Persists the acknowledged export seq.
    pub fn store_export_seq(&self, seq: u64) -> Result<(), ConfigError> {
        write_atomic(
            &self.export_seq_path(),
            format!("{seq}\n").as_bytes(),
            0o644,
        )
    }
}

/// The POP's TLS identity.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// The POP certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The federation CA, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// Writes `bytes` to `path` atomically with `mode`: temporary file in the
/// same directory, fsync, rename over `path`, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ConfigError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            // The mode applies from creation: a key is never world-readable,
            // not even for a moment.
            opts.mode(mode);
        }
        let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
        set_mode(&tmp, mode)?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all().map_err(io_err(dir))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<(), ConfigError> {
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn export_seq_round_trips_and_defaults_to_zero() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        assert_eq!(d.load_export_seq(), 0);
        d.store_export_seq(42).unwrap();
        assert_eq!(d.load_export_seq(), 42);
        d.store_export_seq(43).unwrap();
        assert_eq!(d.load_export_seq(), 43);
        std::fs::write(d.export_seq_path(), "garbage").unwrap();
        assert_eq!(d.load_export_seq(), 0);
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![EXPORT_SEQ_FILE.to_string()]);
    }

    #[test]
    fn record_and_identity_round_trip_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path().join("agent"));
        std::fs::create_dir_all(d.root()).unwrap();
        d.prepare().unwrap();
        assert!(!d.is_enrolled());
        let rec = AgentRecord {
            pop: "north-1".into(),
            domain: "example.org".into(),
            hub_grpc: vec!["127.0.0.1:7400".into()],
            hub_quic: vec!["127.0.0.1:7402".into()],
        };
        d.store_record(&rec).unwrap();
        assert!(d.is_enrolled());
        assert_eq!(d.load_record().unwrap(), rec);
        let id = Identity {
            cert_pem: "cert".into(),
            key_pem: "key".into(),
            ca_pem: "ca".into(),
        };
        d.store_identity(&id).unwrap();
        assert_eq!(d.load_identity().unwrap(), id);
        assert!(!format!("{id:?}").contains("key\""));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(d.key_path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn invalid_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        std::fs::write(d.record_path(), "pop = 3").unwrap();
        assert!(matches!(d.load_record(), Err(ConfigError::Invalid { .. })));
    }
}
