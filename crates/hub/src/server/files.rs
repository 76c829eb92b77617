//! What a hub node keeps in its data dir besides the Raft store, and the
//! operator credential file.
//!
//! Layout of `DATA`:
//! - `node.toml`: node id, domain, addresses (written once the node is set up)
//! - `tls/ca.pem`, `tls/node.pem`, `tls/node.key` (0600)
//! - `raft.redb`: Raft log, vote, snapshots

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::StartError;

/// The node's identity and addresses, as recorded in `node.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Raft node id (>= 1).
    pub node_id: u64,
    /// Federation trust domain.
    pub domain: String,
    /// Bound gRPC address.
    pub listen: String,
    /// Bound HTTP address.
    pub http: String,
    /// Address other nodes dial.
    pub advertise: String,
    /// Bound QUIC uplink address (absent in records written before the
    /// uplink existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
}

/// Paths in one node's data dir.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    dir: PathBuf,
}

fn dir_err(dir: &Path, e: impl std::fmt::Display) -> StartError {
    StartError::DataDir {
        dir: dir.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes `data` to `path` atomically (temp file, fsync, rename) with `mode`.
pub fn write_private(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

impl NodeFiles {
    /// Files under `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// The Raft store.
    pub fn raft_db(&self) -> PathBuf {
        self.dir.join("raft.redb")
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("node.toml")
    }

    /// The node record, if the node was set up before.
    pub fn load_record(&self) -> Result<Option<NodeRecord>, StartError> {
        match fs::read_to_string(self.record_path()) {
            Ok(text) => toml::from_str(&text)
                .map(Some)
                .map_err(|e| dir_err(&self.dir, format!("node.toml: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(dir_err(&self.dir, e)),
        }
    }

    /// Records the node (last step of setting it up).
    pub fn save_record(&self, r: &NodeRecord) -> Result<(), StartError> {
        let text = toml::to_string(r).map_err(|e| dir_err(&self.dir, e))?;
        write_private(&self.record_path(), text.as_bytes(), 0o644)
            .map_err(|e| dir_err(&self.dir, e))
    }

    /// Stores the CA certificate and this node's certificate and key.
    pub fn write_tls(&self, ca: &str, cert: &str, key: &str) -> Result<(), StartError> {
        let tls = self.dir.join("tls");
        fs::create_dir_all(&tls).map_err(|e| dir_err(&self.dir, e))?;
        write_private(&tls.join("ca.pem"), ca.as_bytes(), 0o644)
            .map_err(|e| dir_err(&self.dir, e))?;
        write_private(&tls.join("node.pem"), cert.as_bytes(), 0o644)
            .map_err(|e| dir_err(&self.dir, e))?;
        write_private(&tls.join("node.key"), key.as_bytes(), 0o600)
            .map_err(|e| dir_err(&self.dir, e))
    }

    /// Reads (CA, certificate, key) PEMs.
    pub fn read_tls(&self) -> Result<(String, String, String), StartError> {
        let tls = self.dir.join("tls");
        let read = |n: &str| {
            fs::read_to_string(tls.join(n)).map_err(|e| dir_err(&self.dir, format!("tls/{n}: {e}")))
        };
        Ok((read("ca.pem")?, read("node.pem")?, read("node.key")?))
    }
}

/// The operator credential file (`admin.toml`) every CLI command reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminConfig {
    /// gRPC addresses of hub nodes; the CLI tries them in order.
    pub hubs: Vec<String>,
    /// Federation trust domain.
    pub domain: String,
    /// The federation CA certificate (PEM).
    pub ca_pem: String,
    /// The operator certificate (PEM).
    pub cert_pem: String,
    /// The operator key (PEM). The file is written 0600.
    pub key_pem: String,
}

impl AdminConfig {
    /// Writes the file with mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
        }
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        write_private(path, text.as_bytes(), 0o600).map_err(|e| e.to_string())
    }

    /// Reads the file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}
