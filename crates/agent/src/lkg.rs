//! The last-known-good (LKG) decision table on disk.
//!
//! Every decision table (`PopView`) the agent accepts is written to one file,
//! `view.lkg`, in the agent's data dir, so that a POP keeps serving with the
//! last table it got when no hub is reachable, also right after its own
//! restart (design section 5, static stability).
//!
//! # File format (version 1)
//!
//! All integers are big-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 8  | magic `SWYDLKG\n` |
//! | 8  | 4  | format version (`u32`, currently 1) |
//! | 12 | 8  | epoch of the view (`u64`, equal to `PopView.epoch`) |
//! | 20 | 8  | body length in bytes (`u64`) |
//! | 28 | 32 | SHA-256 over bytes 0..28 (the header fields above) followed by the body |
//! | 60 | n  | body: the prost encoding of `switchyard.v1.PopView` |
//!
//! The checksum is SHA-256 rather than CRC32C: `sha2` is already a workspace
//! dependency (no new crate), its cost is negligible for a file written at
//! most a few times per second and well under a few MiB, and it catches
//! every corruption pattern with certainty for practical purposes (CRC32C
//! leaves a 2^-32 chance per random corruption and is not designed against
//! multi-burst errors). The checksum covers the header fields too, and the
//! decoded view's epoch must equal the header's, so no single changed byte
//! anywhere in the file can go unnoticed.
//!
//! # Writing
//!
//! [`Lkg::store`] writes `view.lkg.tmp` (created fresh, mode 0600), fsyncs
//! it, renames it over `view.lkg` and fsyncs the directory, so after a crash
//! the file is either the old complete table or the new complete table. A
//! leftover `view.lkg.tmp` from a crash is never read and is replaced by the
//! next store. Stores are serialized by a mutex inside [`Lkg`]; one agent
//! process owns a data dir.
//!
//! # Reading
//!
//! [`Lkg::load`] returns `Ok(None)` when there is no file, the view when the
//! file is complete and verified, and an error otherwise. A file that is
//! truncated, corrupt, of another format version or too large is refused as
//! a whole: nothing of it is used. The caller then keeps serving what it has
//! in memory (or nothing, right after a start) and waits for the hub; the
//! next accepted view overwrites the bad file.
//!
//! # Fencing
//!
//! [`Lkg::store`] refuses a view whose epoch is lower than the epoch already
//! stored (the one in memory from an earlier store, or else the one in a
//! valid file on disk), so a stale push can never replace a newer table.
//! An equal epoch is accepted (the epoch is the Raft index of the last input
//! that changed the view, so an equal epoch means the same content).
//!
//! The file work is plain blocking code so tests stay simple; the async
//! wrappers [`Lkg::load_async`] and [`Lkg::store_async`] run it on tokio's
//! blocking pool.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prost::Message;
use sha2::{Digest, Sha256};
use switchyard_proto::pb::PopView;

/// File name of the last-known-good view inside the data dir.
pub const FILE_NAME: &str = "view.lkg";
/// File name of the temporary file written before the rename.
pub const TEMP_FILE_NAME: &str = "view.lkg.tmp";
/// Magic bytes at the start of the file.
pub const MAGIC: [u8; 8] = *b"SWYDLKG\n";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header in bytes (magic, version, epoch, length, SHA-256).
pub const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 32;
/// Largest file accepted on load and produced on store, in bytes (64 MiB).
/// Checked against the file's size before anything is allocated.
pub const MAX_FILE_LEN: u64 = 64 * 1024 * 1024;

/// Why the last-known-good file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LkgError {
    /// A file system operation failed.
    #[error("last-known-good view {path}: cannot {op}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What was being done (`open`, `read`, `write`, `fsync`, ...).
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The file (or the view to store) is larger than [`MAX_FILE_LEN`].
    #[error("last-known-good view {path}: {len} bytes is over the {limit}-byte limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length, or the length it would have, in bytes.
        len: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The file is shorter than its header says.
    #[error("last-known-good view {path}: truncated ({len} bytes, expected {expected})")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its actual length in bytes.
        len: u64,
        /// The length the header announces (or the header length itself).
        expected: u64,
    },
    /// The file is longer than its header says.
    #[error("last-known-good view {path}: {extra} unexpected trailing bytes")]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// Number of bytes after the announced body.
        extra: u64,
    },
    /// The file does not start with [`MAGIC`]: not a last-known-good file.
    #[error("last-known-good view {path}: bad magic (not a Switchyard view file)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The file was written in a format version this build does not read.
    #[error(
        "last-known-good view {path}: format version {found} is not supported (this build reads {supported})"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The SHA-256 over header and body does not match.
    #[error("last-known-good view {path}: checksum mismatch (file is corrupt)")]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
    },
    /// The body is not a valid `PopView` encoding.
    #[error("last-known-good view {path}: body does not decode: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The prost error.
        source: prost::DecodeError,
    },
    /// The header's epoch differs from the decoded view's epoch.
    #[error(
        "last-known-good view {path}: header epoch {header} differs from the view's epoch {body}"
    )]
    EpochMismatch {
        /// The file.
        path: PathBuf,
        /// Epoch in the header.
        header: u64,
        /// Epoch in the decoded view.
        body: u64,
    },
    /// Fencing: the view to store is older than the one already stored.
    #[error("refusing to store view epoch {offered}: epoch {stored} is already stored (epochs never go down)")]
    StaleEpoch {
        /// The epoch already stored.
        stored: u64,
        /// The epoch of the refused view.
        offered: u64,
    },
    /// The blocking task running the file work panicked or was cancelled.
    #[error("last-known-good view task failed: {0}")]
    Task(String),
}

/// Handle on the last-known-good file of one data dir. Cheap to clone; clones
/// share the fence and the write lock.
#[derive(Debug, Clone)]
pub struct Lkg {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Highest epoch stored (or found valid on disk); `None` until known.
    /// The mutex also serializes stores.
    stored: Mutex<Option<u64>>,
}

impl Lkg {
    /// A handle on `dir/view.lkg`. Does no I/O: the directory is created on
    /// the first store, and the fence is read from disk on the first store.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: dir.into(),
                stored: Mutex::new(None),
            }),
        }
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Path of the view file.
    pub fn path(&self) -> PathBuf {
        self.inner.dir.join(FILE_NAME)
    }

    /// Reads and verifies `dir/view.lkg`.
    ///
    /// `Ok(None)`: no file. `Err`: the file exists but is unreadable,
    /// truncated, corrupt, of another version or too large; nothing of it is
    /// used, and the caller keeps what it has.
    pub fn load(dir: &Path) -> Result<Option<PopView>, LkgError> {
        read_file(&dir.join(FILE_NAME))
    }

    /// [`Lkg::load`] on tokio's blocking pool.
    pub async fn load_async(dir: PathBuf) -> Result<Option<PopView>, LkgError> {
        tokio::task::spawn_blocking(move || Self::load(&dir))
            .await
            .map_err(|e| LkgError::Task(e.to_string()))?
    }

    /// The highest epoch stored through this handle, or found valid on disk
    /// by a store; `None` before the first store.
    pub fn stored_epoch(&self) -> Option<u64> {
        *self.lock()
    }

    /// Persists `view` atomically as the new last-known-good.
    ///
    /// Refuses ([`LkgError::StaleEpoch`]) a view whose epoch is lower than
    /// the stored one; on the first call the stored epoch is read from the
    /// file on disk (a missing or invalid file sets no fence, and an invalid
    /// file is replaced). On any error the previous file is left in place.
    pub fn store(&self, view: &PopView) -> Result<(), LkgError> {
        let mut stored = self.lock();
        if stored.is_none() {
            match Self::load(&self.inner.dir) {
                Ok(Some(old)) => *stored = Some(old.epoch),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "replacing an invalid last-known-good view file");
                }
            }
        }
        if let Some(s) = *stored {
            if view.epoch < s {
                return Err(LkgError::StaleEpoch {
                    stored: s,
                    offered: view.epoch,
                });
            }
        }
        write_file(&self.inner.dir, view)?;
        *stored = Some(view.epoch);
        Ok(())
    }

    /// [`Lkg::store`] on tokio's blocking pool.
    pub async fn store_async(&self, view: std::sync::Arc<PopView>) -> Result<(), LkgError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.store(&view))
            .await
            .map_err(|e| LkgError::Task(e.to_string()))?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        // A panic while holding the lock cannot leave the fence wrong: it is
        // only updated after a complete write.
        self.inner
            .stored
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Encodes `view` into the complete file contents (header and body).
pub fn encode(view: &PopView) -> Vec<u8> {
    let body = view.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&view.epoch.to_be_bytes());
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    let sum = checksum(&out, &body);
    out.extend_from_slice(&sum);
    out.extend_from_slice(&body);
    out
}

/// Verifies and decodes complete file contents; `path` only names the file
/// in errors.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<PopView, LkgError> {
    let p = || path.to_path_buf();
    let len = bytes.len() as u64;
    if len > MAX_FILE_LEN {
        return Err(LkgError::TooLarge {
            path: p(),
            len,
            limit: MAX_FILE_LEN,
        });
    }
    // The magic is checked on whatever prefix exists, so a foreign short file
    // says "bad magic" rather than "truncated".
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(LkgError::BadMagic { path: p() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(LkgError::Truncated {
            path: p(),
            len,
            expected: HEADER_LEN as u64,
        });
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    let version = u32::from_be_bytes(field(header, 8));
    if version != FORMAT_VERSION {
        return Err(LkgError::UnsupportedVersion {
            path: p(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let epoch = u64::from_be_bytes(field(header, 12));
    let body_len = u64::from_be_bytes(field(header, 20));
    let expected = (HEADER_LEN as u64).saturating_add(body_len);
    if len < expected {
        return Err(LkgError::Truncated {
            path: p(),
            len,
            expected,
        });
    }
    if len > expected {
        return Err(LkgError::TrailingData {
            path: p(),
            extra: len - expected,
        });
    }
    let sum: [u8; 32] = field(header, 28);
    if checksum(&header[..28], body) != sum {
        return Err(LkgError::ChecksumMismatch { path: p() });
    }
    let view = PopView::decode(body).map_err(|source| LkgError::Decode { path: p(), source })?;
    if view.epoch != epoch {
        return Err(LkgError::EpochMismatch {
            path: p(),
            header: epoch,
            body: view.epoch,
        });
    }
    Ok(view)
}

fn field<const N: usize>(header: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&header[at..at + N]);
    out
}

fn checksum(header_fields: &[u8], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(header_fields);
    h.update(body);
    h.finalize().into()
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> LkgError {
    let path = path.to_path_buf();
    move |source| LkgError::Io { path, op, source }
}

/// Reads and verifies one view file; `Ok(None)` when it does not exist.
pub fn read_file(path: &Path) -> Result<Option<PopView>, LkgError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "open")(e)),
    };
    let size = file.metadata().map_err(io_err(path, "stat"))?.len();
    if size > MAX_FILE_LEN {
        return Err(LkgError::TooLarge {
            path: path.to_path_buf(),
            len: size,
            limit: MAX_FILE_LEN,
        });
    }
    // `size` is bounded above; `take` also bounds a file that grows meanwhile.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path, "read"))?;
    decode(path, &bytes).map(Some)
}

/// Writes `view` to `dir/view.lkg` atomically: fresh temp file (0600),
/// fsync, rename, fsync of the directory. Does no epoch check (see
/// [`Lkg::store`]).
pub fn write_file(dir: &Path, view: &PopView) -> Result<(), LkgError> {
    let bytes = encode(view);
    let path = dir.join(FILE_NAME);
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(LkgError::TooLarge {
            path,
            len: bytes.len() as u64,
            limit: MAX_FILE_LEN,
        });
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir, "create directory"))?;
    let tmp = dir.join(TEMP_FILE_NAME);
    // Remove a leftover from a crash so the new file gets our mode.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp, "remove stale temp file")(e)),
    }
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(&bytes).map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err(&path, "rename temp file onto"))
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

#[cfg(test)]
// `..Default::default()` on every message keeps the tests compiling when
// fields are added to the protobuf messages.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_update)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use switchyard_proto::pb::{Endpoint, ServiceKey, ServiceView, Target, Tier};

    fn view(epoch: u64) -> PopView {
        PopView {
            pop: "pop-a".into(),
            epoch,
            services: vec![ServiceView {
                service: Some(ServiceKey {
                    namespace: "shop".into(),
                    name: "cart".into(),
                    ..Default::default()
                }),
                vip: "10.200.0.1".into(),
                ports: vec![80, 443],
                tiers: vec![Tier {
                    targets: vec![Target {
                        pop: "pop-b".into(),
                        weight: 1,
                        endpoints: vec![Endpoint {
                            address: "10.1.0.7".into(),
                            port: 8080,
                            ready: true,
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                dns_ttl_s: 5,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Lkg::load(dir.path()).unwrap(), None);
        // Also when the directory itself does not exist.
        assert_eq!(Lkg::load(&dir.path().join("nope")).unwrap(), None);
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let lkg = Lkg::new(dir.path().join("data"));
        lkg.store(&view(7)).unwrap();
        assert_eq!(Lkg::load(lkg.dir()).unwrap(), Some(view(7)));
        lkg.store(&view(9)).unwrap();
        assert_eq!(Lkg::load(lkg.dir()).unwrap(), Some(view(9)));
        assert_eq!(lkg.stored_epoch(), Some(9));
        // Equal epoch is accepted.
        lkg.store(&view(9)).unwrap();
        // The empty view also round-trips.
        let empty = PopView::default();
        assert_eq!(decode(Path::new("x"), &encode(&empty)).unwrap(), empty);
    }

    #[test]
    fn file_mode_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let lkg = Lkg::new(dir.path());
        lkg.store(&view(1)).unwrap();
        let mode = fs::metadata(lkg.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupt_byte_anywhere_is_refused() {
        let bytes = encode(&view(3));
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                let r = decode(Path::new("view.lkg"), &bad);
                assert!(r.is_err(), "flip {flip:#x} at byte {i} was accepted");
            }
        }
    }

    #[test]
    fn corrupt_file_on_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lkg = Lkg::new(dir.path());
        lkg.store(&view(3)).unwrap();
        let mut bytes = fs::read(lkg.path()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(lkg.path(), &bytes).unwrap();
        assert!(matches!(
            Lkg::load(dir.path()),
            Err(LkgError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn every_truncation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = encode(&view(5));
        let path = dir.path().join(FILE_NAME);
        for n in 0..bytes.len() {
            fs::write(&path, &bytes[..n]).unwrap();
            let r = Lkg::load(dir.path());
            assert!(r.is_err(), "prefix of {n} bytes was accepted: {r:?}");
        }
        fs::write(&path, &bytes).unwrap();
        assert_eq!(Lkg::load(dir.path()).unwrap(), Some(view(5)));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&view(5));
        bytes.push(0);
        assert!(matches!(
            decode(Path::new("x"), &bytes),
            Err(LkgError::TrailingData { extra: 1, .. })
        ));
    }

    #[test]
    fn wrong_magic_and_version_are_refused() {
        let bytes = encode(&view(5));
        let mut bad = bytes.clone();
        bad[..8].copy_from_slice(b"NOTAVIEW");
        assert!(matches!(
            decode(Path::new("x"), &bad),
            Err(LkgError::BadMagic { .. })
        ));
        let mut bad = bytes.clone();
        bad[8..12].copy_from_slice(&2u32.to_be_bytes());
        assert!(matches!(
            decode(Path::new("x"), &bad),
            Err(LkgError::UnsupportedVersion { found: 2, .. })
        ));
        // A header announcing more than the limit is refused as truncated
        // without any allocation of that size.
        let mut bad = bytes;
        bad[20..28].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            decode(Path::new("x"), &bad),
            Err(LkgError::Truncated { .. })
        ));
    }

    #[test]
    fn oversized_file_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let f = fs::File::create(&path).unwrap();
        f.set_len(MAX_FILE_LEN + 1).unwrap(); // sparse: no real disk use
        assert!(matches!(
            Lkg::load(dir.path()),
            Err(LkgError::TooLarge { .. })
        ));
    }

    #[test]
    fn lower_epoch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lkg = Lkg::new(dir.path());
        lkg.store(&view(10)).unwrap();
        let err = lkg.store(&view(9)).unwrap_err();
        assert!(matches!(
            err,
            LkgError::StaleEpoch {
                stored: 10,
                offered: 9
            }
        ));
        assert!(err.to_string().contains("epoch 10 is already stored"));
        assert_eq!(Lkg::load(dir.path()).unwrap(), Some(view(10)));

        // A new handle (agent restart) reads the fence from disk.
        let again = Lkg::new(dir.path());
        assert!(matches!(
            again.store(&view(4)),
            Err(LkgError::StaleEpoch { stored: 10, .. })
        ));
        again.store(&view(11)).unwrap();
    }

    #[test]
    fn invalid_file_is_replaced_by_next_store() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"garbage").unwrap();
        let lkg = Lkg::new(dir.path());
        assert!(Lkg::load(dir.path()).is_err());
        lkg.store(&view(2)).unwrap();
        assert_eq!(Lkg::load(dir.path()).unwrap(), Some(view(2)));
    }

    #[test]
    fn leftover_temp_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let lkg = Lkg::new(dir.path());
        lkg.store(&view(4)).unwrap();
        // Crash mid-store of epoch 5: a half-written temp file is left behind.
        let half = encode(&view(5));
        let tmp = dir.path().join(TEMP_FILE_NAME);
        fs::write(&tmp, &half[..half.len() / 2]).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(Lkg::load(dir.path()).unwrap(), Some(view(4)));
        // After the "restart", the next store replaces the leftover cleanly.
        let again = Lkg::new(dir.path());
        again.store(&view(5)).unwrap();
        assert_eq!(Lkg::load(dir.path()).unwrap(), Some(view(5)));
        assert!(!tmp.exists());
        let mode = fs::metadata(again.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn async_wrappers() {
        let dir = tempfile::tempdir().unwrap();
        let lkg = Lkg::new(dir.path());
        lkg.store_async(view(6).into()).await.unwrap();
        assert_eq!(
            Lkg::load_async(dir.path().to_path_buf()).await.unwrap(),
            Some(view(6))
        );
        assert!(lkg.store_async(view(1).into()).await.is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_view_round_trips(epoch: u64, pop in "[a-z]{0,12}", ports in proptest::collection::vec(0u32..70000, 0..8)) {
            let v = PopView {
                pop,
                epoch,
                services: vec![ServiceView { ports, ..Default::default() }],
                ..Default::default()
            };
            proptest::prop_assert_eq!(decode(Path::new("x"), &encode(&v)).unwrap(), v);
        }
    }
}
