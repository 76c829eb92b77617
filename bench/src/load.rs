//! The load shape shared by both systems: N concurrent clients, each doing
//! sequential small writes with unique keys for a fixed duration, and the
//! latency statistics.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use switchyard_proto::pb::{self, admin_client::AdminClient};
use tokio::sync::Barrier;
use tonic::transport::Channel;

use crate::etcdpb::{kv_client::KvClient, PutRequest};

/// One client's connection to the system under test.
pub enum Writer {
    /// A hub operator client: a write is `PutPop` (upsert) of a new POP.
    Hub(AdminClient<Channel>),
    /// An etcd client: a write is `KV/Put` of a new key.
    Etcd(KvClient<Channel>),
}

impl Writer {
    /// One acknowledged write of `value` under the unique `key`.
    pub async fn write(&mut self, key: &str, value: &str) -> Result<(), tonic::Status> {
        match self {
            Writer::Hub(c) => {
                let pop = pb::Pop {
                    name: key.to_string(),
                    labels: Some(pb::Labels {
                        region: "bench".into(),
                        extra: HashMap::from([("v".to_string(), value.to_string())]),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                c.put_pop(pb::PutPopRequest {
                    pop: Some(pop),
                    create_only: false,
                })
                .await?;
            }
            Writer::Etcd(c) => {
                c.put(PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: value.as_bytes().to_vec(),
                    ..Default::default()
                })
                .await?;
            }
        }
        Ok(())
    }
}

/// Throughput and latency of one level (one system, one client count).
#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    /// Concurrent clients.
    pub clients: usize,
    /// Measured wall time, seconds (from release of all clients until the
    /// last one finished its last write).
    pub elapsed_s: f64,
    /// Acknowledged writes.
    pub writes: u64,
    /// Failed writes (not counted in latency or throughput).
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Acknowledged writes per second.
    pub writes_per_s: f64,
    /// Commit latency percentiles and mean, milliseconds.
    pub mean_ms: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 90th percentile latency, ms.
    pub p90_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// 99.9th percentile latency, ms.
    pub p999_ms: f64,
    /// Largest latency, ms.
    pub max_ms: f64,
}

/// Runs one level: `writers.len()` clients, each first does one untimed
/// write (dials the connection), then all start together and write
/// sequentially for `dur`. Keys are `{prefix}-{client}-{seq}`.
pub async fn run_level(
    writers: Vec<Writer>,
    prefix: &str,
    value: Arc<String>,
    dur: Duration,
) -> Result<LevelResult> {
    let clients = writers.len();
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut tasks = Vec::with_capacity(clients);
    for (i, mut w) in writers.into_iter().enumerate() {
        let barrier = barrier.clone();
        let value = value.clone();
        let prefix = format!("{prefix}-{i}");
        tasks.push(tokio::spawn(async move {
            let warm = w.write(&format!("{prefix}-w"), &value).await;
            barrier.wait().await;
            warm.map_err(|s| anyhow!("warm-up write failed: {} ({:?})", s.message(), s.code()))?;
            let deadline = Instant::now() + dur;
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 14);
            let mut errors = 0u64;
            let mut first_error = None;
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let key = format!("{prefix}-{seq}");
                seq += 1;
                let t = Instant::now();
                match w.write(&key, &value).await {
                    Ok(()) => lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32),
                    Err(s) => {
                        errors += 1;
                        first_error
                            .get_or_insert_with(|| format!("{} ({:?})", s.message(), s.code()));
                    }
                }
            }
            Ok::<_, anyhow::Error>((lat, errors, first_error))
        }));
    }
    barrier.wait().await;
    let t0 = Instant::now();
    let mut all: Vec<u32> = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (lat, e, fe) = t.await.context("a client task panicked")??;
        all.extend_from_slice(&lat);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    all.sort_unstable();
    let ms = |us: u32| us as f64 / 1000.0;
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let idx = ((p * all.len() as f64).ceil() as usize).clamp(1, all.len()) - 1;
        ms(all[idx])
    };
    let writes = all.len() as u64;
    let mean = if all.is_empty() {
        f64::NAN
    } else {
        all.iter().map(|&u| u as f64).sum::<f64>() / all.len() as f64 / 1000.0
    };
    Ok(LevelResult {
        clients,
        elapsed_s: elapsed,
        writes,
        errors,
        first_error,
        writes_per_s: writes as f64 / elapsed,
        mean_ms: mean,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        max_ms: all.last().map(|&u| ms(u)).unwrap_or(f64::NAN),
    })
}
