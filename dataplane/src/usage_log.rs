//! The usage log: one record per settled request (streamed, failed and abandoned ones
//! included), appended as JSON lines to `--usage-log`, and read back at start-up so that a
//! restart loses no spend: totals per key and deployment, and each key's spend in its current
//! budget period, are rebuilt from it.
//!
//! Requests hand records to a writer task over a channel (no I/O and no lock on the request
//! path); the writer appends them in batches and flushes after each batch. On shutdown the
//! channel is closed and the writer drains it before the process exits. Every record has its own
//! id, so a record read twice (a log concatenated by hand, say) is counted once.

use crate::accounting::Ledger;
use crate::limits::{Registry, Scope, period_index};
use crate::snapshot::Snapshot;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::mpsc;
use tollgate_crds::config::Picodollars;

pub use tollgate_crds::usage::{STREAM, UsageRecord};

enum Msg {
    Record(UsageRecord),
    Close(tokio::sync::oneshot::Sender<()>),
}

/// Where records go: the file writer, the Redis stream writer, or both.
#[derive(Clone, Debug, Default)]
pub struct UsageLog {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    stream: Option<mpsc::UnboundedSender<Msg>>,
    /// How often the file has been synced to disk so far.
    syncs: Option<Arc<AtomicU64>>,
}

/// How often the usage log's file is synced to disk while records are written: a crash of the
/// machine (not only of the process, whose writes the kernel keeps) loses at most about this
/// much of the log.
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

static RECORD_SEQ: AtomicU64 = AtomicU64::new(0);

impl UsageLog {
    /// Sends a record to the writer.
    pub fn record(&self, mut record: UsageRecord) {
        if record.id.is_empty() {
            record.id = format!(
                "{}-{}",
                *INSTANCE,
                RECORD_SEQ.fetch_add(1, Ordering::Relaxed)
            );
        }
        // The writers stop only when closed, at shutdown, after the server has stopped.
        match (&self.tx, &self.stream) {
            (Some(file), Some(stream)) => {
                let _ = stream.send(Msg::Record(record.clone()));
                let _ = file.send(Msg::Record(record));
            }
            (Some(tx), None) | (None, Some(tx)) => {
                let _ = tx.send(Msg::Record(record));
            }
            (None, None) => {}
        }
    }

    /// How many times the file has been synced to disk (every [`SYNC_EVERY`] while records
    /// are written).
    pub fn syncs(&self) -> u64 {
        self.syncs.as_ref().map_or(0, |s| s.load(Ordering::Relaxed))
    }

    /// Whether records go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some() || self.stream.is_some()
    }

    /// Also appends every record to the Redis stream [`STREAM`], where the operator consumes
    /// them. A batch that fails is kept and tried again, so a Redis outage delays records but
    /// doesn't lose them (while the process lives; the file, if any, has them regardless).
    pub fn with_stream(mut self, conn: redis::aio::ConnectionManager) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        tokio::spawn(async move {
            let mut pending: Vec<UsageRecord> = Vec::new();
            let mut closing = None;
            loop {
                if pending.is_empty() && closing.is_none() {
                    match rx.recv().await {
                        Some(Msg::Record(r)) => pending.push(r),
                        Some(Msg::Close(ack)) => closing = Some(ack),
                        None => break,
                    }
                }
                while let Ok(m) = rx.try_recv() {
                    match m {
                        Msg::Record(r) => pending.push(r),
                        Msg::Close(ack) => closing = Some(ack),
                    }
                }
                if !pending.is_empty() {
                    let mut pipe = redis::pipe();
                    for r in pending.iter().take(1000) {
                        let json = serde_json::to_string(r).unwrap_or_default();
                        pipe.cmd("XADD")
                            .arg(STREAM)
                            .arg("*")
                            .arg("id")
                            .arg(&r.id)
                            .arg("record")
                            .arg(json)
                            .ignore();
                    }
                    let n = pending.len().min(1000);
                    let mut c = conn.clone();
                    match pipe.query_async::<()>(&mut c).await {
                        Ok(()) => {
                            pending.drain(..n);
                        }
                        Err(e) => {
                            metrics::counter!(crate::metrics::REDIS_ERRORS, "op" => "usage_stream")
                                .increment(1);
                            tracing::debug!("usage stream append failed, retrying: {e}");
                            if closing.is_some() {
                                tracing::warn!(
                                    records = pending.len(),
                                    "shutting down with usage records not yet in the Redis stream"
                                );
                                pending.clear();
                            } else {
                                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            }
                        }
                    }
                }
                if pending.is_empty()
                    && let Some(ack) = closing.take()
                {
                    let _ = ack.send(());
                    break;
                }
            }
        });
        self.stream = Some(tx);
        self
    }

    /// Writes out everything sent so far, syncs the file, and stops the writer.
    pub async fn close(&self) {
        for tx in self.tx.iter().chain(self.stream.iter()) {
            let (ack, done) = tokio::sync::oneshot::channel();
            if tx.send(Msg::Close(ack)).is_ok() {
                let _ = done.await;
            }
        }
    }
}

/// Identifies this process in record and lease ids (see [`instance_id`]).
pub static INSTANCE: std::sync::LazyLock<String> = std::sync::LazyLock::new(instance_id);

/// A new id for a process: 128 random bits, in hex. Not the start time and the pid: every
/// container is pid 1, so two replicas started in the same millisecond (a Deployment's pods
/// often are) would share it, and so would their records' and leases' ids.
pub fn instance_id() -> String {
    let mut raw = [0u8; 16];
    if getrandom::fill(&mut raw).is_err() {
        // No randomness from the OS (never seen on Linux): the clock's nanoseconds, the pid and
        // a stack address, which differ between processes started together far more often
        // than the pid alone.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let here = &raw as *const _ as usize as u128;
        let mixed = nanos ^ (u128::from(std::process::id()) << 64) ^ here.rotate_left(32);
        raw = mixed.to_le_bytes();
        tracing::warn!("no randomness from the OS: record and lease ids from the clock");
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the log at `path` for appending and starts its writer. [`UsageLog::close`] flushes it.
pub fn open(path: &Path) -> std::io::Result<UsageLog> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let path: PathBuf = path.to_path_buf();
    // Synced by a thread of its own, once per SYNC_EVERY when something was written: off the
    // writer's thread too, so a slow disk's fsync doesn't hold up the records behind it.
    let syncs = Arc::new(AtomicU64::new(0));
    let dirty = Arc::new(AtomicBool::new(false));
    let (stop_sync, tick) = std::sync::mpsc::channel::<()>();
    {
        let file = file.try_clone()?;
        let (syncs, dirty, path) = (syncs.clone(), dirty.clone(), path.clone());
        std::thread::Builder::new()
            .name("tollgate-usage-sync".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    tick.recv_timeout(SYNC_EVERY)
                {
                    if dirty.swap(false, Ordering::AcqRel) {
                        match file.sync_data() {
                            Ok(()) => {
                                syncs.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::error!(path = %path.display(), "usage log sync failed: {e}");
                            }
                        }
                    }
                }
            })?;
    }
    // A thread of its own: blocking file I/O, off every runtime's workers.
    std::thread::Builder::new()
        .name("tollgate-usage-log".into())
        .spawn(move || {
            let mut out = std::io::BufWriter::new(file);
            let mut batch = Vec::with_capacity(256);
            let mut closing = None;
            while closing.is_none() {
                let Some(first) = rx.blocking_recv() else {
                    break;
                };
                let mut next = Some(first);
                while let Some(msg) = next {
                    match msg {
                        Msg::Record(r) => batch.push(r),
                        Msg::Close(ack) => closing = Some(ack),
                    }
                    next = if batch.len() < 4096 || closing.is_some() {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                for r in batch.drain(..) {
                    let written = serde_json::to_writer(&mut out, &r)
                        .map_err(std::io::Error::from)
                        .and_then(|()| out.write_all(b"\n"));
                    if let Err(e) = written {
                        tracing::error!(path = %path.display(), "usage log write failed: {e}");
                    }
                }
                if let Err(e) = out.flush() {
                    tracing::error!(path = %path.display(), "usage log flush failed: {e}");
                }
                dirty.store(true, Ordering::Release);
            }
            drop(stop_sync);
            let _ = out.get_ref().sync_all();
            if let Some(ack) = closing {
                let _ = ack.send(());
            }
        })?;
    Ok(UsageLog {
        tx: Some(tx),
        stream: None,
        syncs: Some(syncs),
    })
}

/// What reading a log found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Records counted.
    pub records: usize,
    /// Lines that were not records (a torn last line after a crash, say).
    pub skipped: usize,
}

/// Reads the log at `path` (if it exists) into the usage counters, and seeds each limited key's
/// budget with its spend in the current period.
pub fn replay(
    path: &Path,
    snapshot: &Snapshot,
    ledger: &Ledger,
    registry: &Registry,
    now: u64,
) -> std::io::Result<Replay> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Replay::default()),
        Err(e) => return Err(e),
    };
    let periods: HashMap<&str, _> = snapshot
        .keys
        .values()
        .filter_map(|k| {
            k.config
                .budget
                .as_ref()
                .map(|b| (k.config.id.as_str(), b.period))
        })
        .collect();
    let team_periods: HashMap<&str, _> = snapshot
        .keys
        .values()
        .filter_map(|k| {
            let team = k.config.team.as_deref()?;
            let b = k.team_limits.as_ref()?.rules().budget.as_ref()?;
            Some((team, b.period))
        })
        .collect();
    let mut seen = HashSet::new();
    let mut period_spend: HashMap<&str, u64> = HashMap::new();
    let mut team_spend: HashMap<&str, u64> = HashMap::new();
    let mut out = Replay::default();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        let Ok(r) = serde_json::from_str::<UsageRecord>(&line) else {
            out.skipped += usize::from(!line.trim().is_empty());
            continue;
        };
        if !seen.insert(r.id.clone()) {
            continue;
        }
        out.records += 1;
        let cost = Picodollars(r.cost_pico);
        ledger.key(&r.key).add(Some(r.usage()), cost);
        ledger
            .deployment(&r.model, &r.deployment)
            .add(Some(r.usage()), cost);
        if let Some((id, p)) = periods.get_key_value(&*r.key)
            && period_index(*p, r.ts_ms / 1000) == period_index(*p, now)
        {
            *period_spend.entry(id).or_default() += r.cost_pico;
        }
        if let Some((team, p)) = r
            .team
            .as_deref()
            .and_then(|t| team_periods.get_key_value(t))
            && period_index(*p, r.ts_ms / 1000) == period_index(*p, now)
        {
            *team_spend.entry(team).or_default() += r.cost_pico;
        }
    }
    for (team, spend) in team_spend {
        registry.seed_spend(
            Scope::Team,
            team,
            team_periods[team],
            Picodollars(spend),
            now,
        );
    }
    for (key, spend) in period_spend {
        registry.seed_spend(Scope::Key, key, periods[key], Picodollars(spend), now);
    }
    Ok(out)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// Two processes started in the same millisecond with the same pid (every container is
    /// pid 1) get different ids: the time and the pid would give both the same.
    #[test]
    fn instance_ids_differ_between_processes_started_together() {
        let ids: HashSet<String> = (0..1000).map(|_| instance_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(
            ids.iter()
                .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        );
    }

    /// Records written are synced to disk within about [`SYNC_EVERY`], without waiting for
    /// shutdown.
    #[test]
    fn the_log_is_synced_within_a_second_of_a_write() {
        let dir = std::env::temp_dir().join(format!("tollgate-usage-sync-{}", instance_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = open(&dir.join("usage.jsonl")).unwrap();
        let record = |id: &str| UsageRecord {
            id: id.into(),
            request_id: String::new(),
            ts_ms: 1,
            key: "ns/k".into(),
            team: None,
            model: "m".into(),
            deployment: "ns/m".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_tokens: 0,
            cost_pico: 1,
            outcome: "success".into(),
            usage_source: Default::default(),
        };
        std::thread::sleep(SYNC_EVERY + std::time::Duration::from_millis(200));
        assert_eq!(log.syncs(), 0, "nothing written, nothing to sync");
        log.record(record("a"));
        let deadline = std::time::Instant::now() + 3 * SYNC_EVERY;
        while log.syncs() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(log.syncs(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
