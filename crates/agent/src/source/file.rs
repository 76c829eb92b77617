//! The TOML file source, reloaded on change without restart.
//!
//! A tokio task polls the file every `poll_interval` (default 1 s): it
//! compares the file's modification time, size and inode with the last seen
//! ones, and when they differ it reads the file and compares the SHA-256 of
//! its contents with the last parsed contents. Every [`FULL_CHECK_EVERY`]
//! polls it reads and hashes the file even when the metadata look unchanged,
//! to catch a same-size rewrite within the file system's timestamp
//! granularity. New contents are acted on only once two consecutive polls
//! read the same bytes, so a file caught half-written (an in-place rewrite
//! is briefly empty, and an empty file is valid: "export nothing") is never
//! applied; a change therefore takes one to two poll intervals. Polling instead of inotify keeps it portable and works the
//! same for editors that rewrite in place and for those (and ConfigMap
//! mounts) that rename a new file over the old one; the cost is one `stat`
//! per poll and a change delay of at most one poll interval.
//!
//! New contents that fail to parse or validate are logged once (at `error`,
//! with file, line and field) and otherwise ignored: the last good services
//! stay in effect until the file is fixed. A file that disappears is logged
//! once (at `warn`) and also keeps the last good services.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::{parse_services, SourceError, MAX_FILE_LEN};
use super::{LocalServices, ServiceSource};

/// Default time between two polls of the services file (1 s).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Every this many polls the file is read and hashed even when its metadata
/// look unchanged.
pub const FULL_CHECK_EVERY: u32 = 10;

/// Services read from a TOML file (schema: `docs/services-file.md`).
///
/// Dropping it stops the polling task.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    rx: watch::Receiver<LocalServices>,
    task: JoinHandle<()>,
}

impl FileSource {
    /// Loads `path` (which must be valid: a broken file at start is an
    /// error, not an empty set) and starts polling it every `poll_interval`.
    /// Must be called within a tokio runtime.
    pub async fn start(
        path: impl Into<PathBuf>,
        poll_interval: Duration,
    ) -> Result<Self, SourceError> {
        let path = path.into();
        let (contents, meta) = read(&path).await?;
        let services = parse_bytes(&path, &contents)?;
        tracing::info!(
            file = %path.display(),
            services = services.services.len(),
            "loaded services file"
        );
        let (tx, rx) = watch::channel(services);
        let mut poller = Poller {
            path: path.clone(),
            meta,
            hash: hash(&contents),
            pending: None,
            polls: 0,
            read_failed: false,
        };
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll_interval.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; the file was just read
            loop {
                tick.tick().await;
                if let Some(services) = poller.poll().await {
                    tx.send_if_modified(|cur| {
                        if *cur == services {
                            false
                        } else {
                            *cur = services;
                            true
                        }
                    });
                }
                if tx.is_closed() {
                    break;
                }
            }
        });
        Ok(Self { path, rx, task })
    }

    /// The file being watched.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ServiceSource for FileSource {
    fn snapshot(&self) -> LocalServices {
        self.rx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<LocalServices> {
        self.rx.clone()
    }
}

/// Metadata compared between polls: modification time, size, inode.
type Meta = (Option<SystemTime>, u64, u64);

struct Poller {
    path: PathBuf,
    meta: Meta,
    /// SHA-256 of the contents last parsed (valid or not).
    hash: [u8; 32],
    /// SHA-256 of new contents seen once, waiting to be seen unchanged on
    /// the next poll before they are parsed.
    pending: Option<[u8; 32]>,
    polls: u32,
    read_failed: bool,
}

impl Poller {
    /// One poll: `Some(services)` when the file changed and is valid.
    async fn poll(&mut self) -> Option<LocalServices> {
        self.polls = self.polls.wrapping_add(1);
        let full = self.polls.is_multiple_of(FULL_CHECK_EVERY);
        match tokio::fs::metadata(&self.path).await {
            Ok(m)
                if !full
                    && !self.read_failed
                    && self.pending.is_none()
                    && meta_of(&m) == self.meta =>
            {
                return None
            }
            Ok(_) => {}
            Err(e) => {
                self.read_failed(SourceError::Read {
                    file: self.path.clone(),
                    source: e,
                });
                return None;
            }
        }
        let (contents, meta) = match read(&self.path).await {
            Ok(r) => r,
            Err(e) => {
                self.read_failed(e);
                return None;
            }
        };
        if self.read_failed {
            tracing::info!(file = %self.path.display(), "services file readable again");
            self.read_failed = false;
        }
        self.meta = meta;
        let h = hash(&contents);
        if h == self.hash {
            self.pending = None;
            return None;
        }
        if self.pending != Some(h) {
            // Settle: a writer may be half-way through (an in-place rewrite
            // is briefly empty, and an empty file is valid). Act only on
            // contents seen unchanged by two consecutive polls.
            self.pending = Some(h);
            return None;
        }
        self.pending = None;
        self.hash = h;
        match parse_bytes(&self.path, &contents) {
            Ok(services) => {
                tracing::info!(
                    file = %self.path.display(),
                    services = services.services.len(),
                    "reloaded services file"
                );
                Some(services)
            }
            Err(e) => {
                tracing::error!(
                    file = %self.path.display(),
                    error = %e,
                    "services file is invalid; keeping the last good services"
                );
                None
            }
        }
    }

    fn read_failed(&mut self, e: SourceError) {
        if !self.read_failed {
            tracing::warn!(
                file = %self.path.display(),
                error = %e,
                "services file unreadable; keeping the last good services"
            );
            self.read_failed = true;
        }
    }
}

fn meta_of(m: &std::fs::Metadata) -> Meta {
    use std::os::unix::fs::MetadataExt;
    (m.modified().ok(), m.len(), m.ino())
}

/// Parses file contents, which must be UTF-8.
fn parse_bytes(path: &Path, contents: &[u8]) -> Result<LocalServices, SourceError> {
    match std::str::from_utf8(contents) {
        Ok(text) => parse_services(path, text),
        Err(e) => {
            let valid = contents.get(..e.valid_up_to()).unwrap_or_default();
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            Err(SourceError::Syntax {
                file: path.to_path_buf(),
                line,
                column: 0,
                message: format!("not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
                text: String::new(),
            })
        }
    }
}

fn hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Reads the file with its size checked first (on the blocking pool).
async fn read(path: &Path) -> Result<(Vec<u8>, Meta), SourceError> {
    let p = path.to_path_buf();
    let r = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, Meta), SourceError> {
        use std::io::Read;
        let read_err = |source| SourceError::Read {
            file: p.clone(),
            source,
        };
        let f = std::fs::File::open(&p).map_err(read_err)?;
        let m = f.metadata().map_err(read_err)?;
        if m.len() > MAX_FILE_LEN {
            return Err(SourceError::TooLarge {
                file: p.clone(),
                len: m.len(),
                limit: MAX_FILE_LEN,
            });
        }
        let mut buf = Vec::with_capacity(m.len() as usize);
        f.take(MAX_FILE_LEN + 1)
            .read_to_end(&mut buf)
            .map_err(read_err)?;
        if buf.len() as u64 > MAX_FILE_LEN {
            return Err(SourceError::TooLarge {
                file: p.clone(),
                len: buf.len() as u64,
                limit: MAX_FILE_LEN,
            });
        }
        Ok((buf, meta_of(&m)))
    })
    .await;
    match r {
        Ok(r) => r,
        Err(e) => Err(SourceError::Read {
            file: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::source::ServiceType;

    const ONE: &str = "[[services]]\nnamespace = \"a\"\nname = \"x\"\nports = [{ port = 80 }]\n";
    const TWO: &str = "[[services]]\nnamespace = \"a\"\nname = \"x\"\nports = [{ port = 80 }]\n\
                       [[services]]\nnamespace = \"a\"\nname = \"y\"\ntype = \"Headless\"\n";

    /// Waits (bounded, generously) until the receiver shows `want` services.
    async fn wait_for(rx: &mut watch::Receiver<LocalServices>, want: usize) {
        tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|s| s.services.len() == want),
        )
        .await
        .expect("no reload")
        .expect("source closed");
    }

    #[tokio::test]
    async fn reloads_and_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        std::fs::write(&path, ONE).unwrap();
        let src = FileSource::start(&path, Duration::from_millis(10))
            .await
            .unwrap();
        assert_eq!(src.snapshot().services.len(), 1);
        let mut rx = src.subscribe();

        std::fs::write(&path, TWO).unwrap();
        wait_for(&mut rx, 2).await;
        assert_eq!(
            src.snapshot().get("a", "y").unwrap().service_type,
            ServiceType::Headless
        );

        // An invalid file keeps the last good services.
        std::fs::write(&path, "[[services]]\nnamespace = \"BAD\"\n").unwrap();
        // Removing the file also keeps them.
        // (Give the poller some polls to see the invalid contents first.)
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(src.snapshot().services.len(), 2);
        std::fs::remove_file(&path).unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(src.snapshot().services.len(), 2);

        // A fixed file (written by rename, as editors do) is picked up.
        let tmp = dir.path().join("new.toml");
        std::fs::write(&tmp, ONE).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        wait_for(&mut rx, 1).await;
    }

    #[tokio::test]
    async fn invalid_file_at_start_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        assert!(matches!(
            FileSource::start(&path, DEFAULT_POLL_INTERVAL).await,
            Err(SourceError::Read { .. })
        ));
        std::fs::write(
            &path,
            "[[services]]\nnamespace = \"a\"\nname = \"-x\"\nports = [{ port = 1 }]\n",
        )
        .unwrap();
        let err = FileSource::start(&path, DEFAULT_POLL_INTERVAL)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("services.toml"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("services[0].name"), "{msg}");
    }

    #[tokio::test]
    async fn non_utf8_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        std::fs::write(&path, b"# ok\n\xff\n").unwrap();
        let err = FileSource::start(&path, DEFAULT_POLL_INTERVAL)
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::Syntax { line: 2, .. }), "{err}");
    }

    #[tokio::test]
    async fn contents_apply_only_after_settling() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        std::fs::write(&path, ONE).unwrap();
        let (contents, meta) = read(&path).await.unwrap();
        let mut p = Poller {
            path: path.clone(),
            meta,
            hash: hash(&contents),
            pending: None,
            polls: 0,
            read_failed: false,
        };
        assert!(p.poll().await.is_none());
        // Caught half-written (empty) by one poll, then complete.
        std::fs::write(&path, "").unwrap();
        assert!(p.poll().await.is_none());
        std::fs::write(&path, TWO).unwrap();
        assert!(p.poll().await.is_none());
        let s = p.poll().await.expect("settled contents are applied");
        assert_eq!(s.services.len(), 2);
        assert!(p.poll().await.is_none());
        // Back to the old contents: applied after settling too.
        std::fs::write(&path, ONE).unwrap();
        assert!(p.poll().await.is_none());
        assert_eq!(p.poll().await.unwrap().services.len(), 1);
        // Invalid contents are never applied, and not re-parsed every poll.
        std::fs::write(&path, "nonsense").unwrap();
        for _ in 0..2 * FULL_CHECK_EVERY {
            assert!(p.poll().await.is_none());
        }
    }

    #[tokio::test]
    async fn oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_FILE_LEN + 1).unwrap();
        assert!(matches!(
            FileSource::start(&path, DEFAULT_POLL_INTERVAL).await,
            Err(SourceError::TooLarge { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_file_sends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        std::fs::write(&path, ONE).unwrap();
        let src = FileSource::start(&path, Duration::from_millis(100))
            .await
            .unwrap();
        let rx = src.subscribe();
        // Many polls (including full re-reads) of an unchanged file.
        for _ in 0..3 * FULL_CHECK_EVERY {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!rx.has_changed().unwrap());
    }
}
