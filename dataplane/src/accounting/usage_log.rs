//! The usage log: one record per settled request (streamed, failed and abandoned ones
//! included), appended as JSON lines to `--usage-log`, and read back at start-up so that a
//! restart loses no spend: totals per key and deployment, and each key's spend in its current
//! budget period, are rebuilt from it.
//!
//! Requests hand records to a writer task over a channel (no I/O and no lock on the request
//! path); the writer appends them in batches and flushes after each batch. On shutdown the
//! channel is closed and the writer drains it before the process exits. Every record has its own
//! id, so a record read twice (a log concatenated by hand, say) is counted once.
//!
//! **Compaction** keeps the file, and what reading it back costs, bounded: when the log passes
//! `--usage-log-max-bytes`, the writer replaces it with one row per subject (key, team, model,
//! deployment, usage source) and time bucket, each the sum of the records it stands for
//! ([`UsageRecord::requests`] of them, `outcome: compacted`), and goes on appending behind
//! them. Buckets are coarser the older the records ([`bucket_of`]): a minute for the last
//! hour, an hour for the last two days, a day for the last 32 days, and one row with
//! `ts_ms: 0` for everything before. Bucket edges fall on UTC minutes, hours and days, so a
//! daily, weekly, monthly or lifetime budget, and one whose period is a whole number of the
//! bucket sizes it spans, reads back the spend it read before. The new file is written beside
//! the log, synced, and renamed over it: a crash leaves the old log or the new one, never
//! both and never neither.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::mpsc;

pub(crate) use tollgate_crds::usage::{STREAM, UsageRecord, UsageSource};

enum Msg {
    Record(UsageRecord),
    /// A request went upstream (the file writer only).
    Open(UsageRecord),
    Close(tokio::sync::oneshot::Sender<()>),
}

/// Where records go: the file writer, the Redis stream writer, or both.
#[derive(Clone, Debug, Default)]
pub(crate) struct UsageLog {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    stream: Option<mpsc::UnboundedSender<Msg>>,
    /// How often the file has been synced to disk so far (the tests read it).
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the tests"))]
    syncs: Option<Arc<AtomicU64>>,
}

/// How often the usage log's file is synced to disk while records are written: a crash of the
/// machine (not only of the process, whose writes the kernel keeps) loses at most about this
/// much of the log.
pub(crate) const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How many records the Redis stream writer keeps while Redis fails (about 300 bytes each).
pub(crate) const STREAM_BACKLOG: usize = 65_536;

/// The `outcome` of a record written when a request goes upstream, before it settles.
pub(crate) const OPEN: &str = "open";

/// The `outcome` replay gives a request whose [`OPEN`] record was never closed: the process
/// was killed while it ran. It is charged the cost the open record reserved.
pub(crate) const CRASHED: &str = "crashed";

/// The default `--usage-log-max-bytes`: the size past which the log is compacted.
pub(crate) const DEFAULT_MAX_BYTES: u64 = 64 << 20;

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

static RECORD_SEQ: AtomicU64 = AtomicU64::new(1);

impl UsageLog {
    /// A new record id: this process's id and a sequence number.
    pub(crate) fn new_id() -> String {
        Self::id_of(Self::next_seq())
    }

    /// The next record sequence number of this process (never 0).
    pub(crate) fn next_seq() -> u64 {
        RECORD_SEQ.fetch_add(1, Ordering::Relaxed)
    }

    /// The record id of sequence number `seq` (see [`UsageLog::next_seq`]).
    pub(crate) fn id_of(seq: u64) -> String {
        format!("{}-{seq}", *INSTANCE)
    }

    /// Whether records go to a file, where [`UsageLog::open_record`] is kept.
    pub(crate) fn has_file(&self) -> bool {
        self.tx.is_some()
    }

    /// Writes an [`OPEN`] record to the journal beside the file (see [`journal_path`]; not to
    /// the log, nor the stream): a request is going upstream, at the cost it reserved. The
    /// record of its settlement, with the same id, closes it; one never closed (the process
    /// was killed) is charged at start-up (see [`replay`]).
    pub(crate) fn open_record(&self, record: UsageRecord) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Open(record));
        }
    }

    /// Sends a record to the writer.
    pub(crate) fn record(&self, mut record: UsageRecord) {
        if record.id.is_empty() {
            record.id = Self::new_id();
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
    #[cfg(test)]
    fn syncs(&self) -> u64 {
        self.syncs.as_ref().map_or(0, |s| s.load(Ordering::Relaxed))
    }

    /// Whether records go anywhere.
    pub(crate) fn is_enabled(&self) -> bool {
        self.tx.is_some() || self.stream.is_some()
    }

    /// Also appends every record to the Redis stream [`STREAM`], where the operator consumes
    /// them. A batch that fails is kept and tried again, so a Redis outage delays records but
    /// doesn't lose them (while the process lives; the file, if any, has them regardless), up to
    /// [`STREAM_BACKLOG`] records: past that the oldest are dropped from the stream's backlog
    /// and counted in `tollgate_usage_stream_dropped_total`.
    pub(crate) fn with_stream(mut self, conn: redis::aio::ConnectionManager) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        tokio::spawn(async move {
            let mut pending: std::collections::VecDeque<UsageRecord> = Default::default();
            let keep = |pending: &mut std::collections::VecDeque<UsageRecord>, r| {
                if push_bounded(pending, r, STREAM_BACKLOG) {
                    metrics::counter!(crate::telemetry::USAGE_STREAM_DROPPED).increment(1);
                }
            };
            let mut closing = None;
            loop {
                if pending.is_empty() && closing.is_none() {
                    match rx.recv().await {
                        Some(Msg::Record(r)) => keep(&mut pending, r),
                        Some(Msg::Open(_)) => {}
                        Some(Msg::Close(ack)) => closing = Some(ack),
                        None => break,
                    }
                }
                while let Ok(m) = rx.try_recv() {
                    match m {
                        Msg::Record(r) => keep(&mut pending, r),
                        Msg::Open(_) => {}
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
                            metrics::counter!(crate::telemetry::REDIS_ERRORS, "op" => "usage_stream")
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
    pub(crate) async fn close(&self) {
        for tx in self.tx.iter().chain(self.stream.iter()) {
            let (ack, done) = tokio::sync::oneshot::channel();
            if tx.send(Msg::Close(ack)).is_ok() {
                let _ = done.await;
            }
        }
    }
}

/// Appends `item`, first dropping the oldest if `queue` holds `max`; returns whether it did.
fn push_bounded<T>(queue: &mut std::collections::VecDeque<T>, item: T, max: usize) -> bool {
    let full = queue.len() >= max;
    if full {
        queue.pop_front();
    }
    queue.push_back(item);
    full
}

/// Identifies this process in record and lease ids (see [`instance_id`]).
pub(crate) static INSTANCE: std::sync::LazyLock<String> = std::sync::LazyLock::new(instance_id);

/// A new id for a process: 128 random bits, in hex. Not the start time and the pid: every
/// container is pid 1, so two replicas started in the same millisecond (a Deployment's pods
/// often are) would share it, and so would their records' and leases' ids.
pub(crate) fn instance_id() -> String {
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

/// Opens the log at `path` for appending and starts its writer, which compacts the file when
/// it grows past `max_bytes` (0: never). [`UsageLog::close`] flushes it.
pub(crate) fn open(path: &Path, max_bytes: u64) -> std::io::Result<UsageLog> {
    let file = append_to(path)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let path: PathBuf = path.to_path_buf();
    // Synced by a thread of its own, once per SYNC_EVERY when something was written: off the
    // writer's thread too, so a slow disk's fsync doesn't hold up the records behind it. The
    // file it syncs is swapped when a compaction replaces the log.
    let syncs = Arc::new(AtomicU64::new(0));
    let dirty = Arc::new(AtomicBool::new(false));
    let current = Arc::new(std::sync::Mutex::new(Arc::new(file.try_clone()?)));
    let (stop_sync, tick) = std::sync::mpsc::channel::<()>();
    {
        let (syncs, dirty, path, current) =
            (syncs.clone(), dirty.clone(), path.clone(), current.clone());
        std::thread::Builder::new()
            .name("tollgate-usage-sync".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    tick.recv_timeout(SYNC_EVERY)
                {
                    if dirty.swap(false, Ordering::AcqRel) {
                        let file = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
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
    // Compacted when it passes this size; after a compaction that left it large (many
    // subjects), not before it has grown by max_bytes again.
    let mut compact_at = max_bytes;
    let mut size = file.metadata()?.len();
    let mut journal = Journal::open(journal_path(&path))?;
    // A thread of its own: blocking file I/O, off every runtime's workers.
    std::thread::Builder::new()
        .name("tollgate-usage-log".into())
        .spawn(move || {
            let mut out = std::io::BufWriter::new(file);
            let mut batch = Vec::with_capacity(256);
            let mut closing = None;
            let mut line = Vec::with_capacity(512);
            while closing.is_none() {
                let Some(first) = rx.blocking_recv() else {
                    break;
                };
                let mut next = Some(first);
                while let Some(msg) = next {
                    match msg {
                        Msg::Record(r) => batch.push(r),
                        Msg::Open(r) => journal.opened(r),
                        Msg::Close(ack) => closing = Some(ack),
                    }
                    next = if batch.len() < 4096 || closing.is_some() {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                // Opens first: a request's open record is never behind its settlement on disk.
                journal.flush();
                for r in batch.drain(..) {
                    journal.close(&r.id);
                    line.clear();
                    let written = serde_json::to_writer(&mut line, &r)
                        .map_err(std::io::Error::from)
                        .and_then(|()| {
                            line.push(b'\n');
                            out.write_all(&line)
                        });
                    match written {
                        Ok(()) => size += line.len() as u64,
                        Err(e) => {
                            tracing::error!(path = %path.display(), "usage log write failed: {e}");
                        }
                    }
                }
                if let Err(e) = out.flush() {
                    tracing::error!(path = %path.display(), "usage log flush failed: {e}");
                }
                dirty.store(true, Ordering::Release);
                let compact = max_bytes > 0 && size > compact_at;
                // Before a compaction the journal must hold only requests still in flight:
                // the compaction takes away the ids of those settled, which would then look
                // unsettled.
                let rewritten = (compact || journal.is_long()) && journal.rewrite();
                if compact && rewritten {
                    match compact_file(&mut out, &path, unix_ms()) {
                        Ok(file) => {
                            match file.try_clone() {
                                Ok(f) => {
                                    *current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(f)
                                }
                                Err(e) => tracing::error!(
                                    path = %path.display(), "usage log: no handle to sync the new file: {e}"
                                ),
                            }
                            size = file.metadata().map_or(0, |m| m.len());
                            out = std::io::BufWriter::new(file);
                        }
                        Err(e) => {
                            tracing::error!(path = %path.display(), "usage log compaction failed, appending on: {e}");
                        }
                    }
                    compact_at = size.saturating_add(max_bytes);
                }
            }
            drop(stop_sync);
            let _ = out.get_ref().sync_all();
            journal.flush();
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

/// The journal of requests in flight, beside the log at `path`: `<path>.inflight`. A request
/// that goes upstream appends an [`OPEN`] record here; the log's record of its settlement
/// (same id) closes it. Whatever is still open at start-up was cut by a killed process.
pub(crate) fn journal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".inflight");
    PathBuf::from(p)
}

/// The writer's side of the journal: appends open records, and rewrites the file with only
/// the requests still in flight once it has grown ([`Journal::is_long`]).
struct Journal {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    size: u64,
    /// Its size after the last rewrite.
    kept: u64,
    /// Requests opened and not yet settled, by id.
    in_flight: HashMap<String, UsageRecord>,
}

/// The journal is rewritten when it passes this size and at least twice what is in flight.
const JOURNAL_REWRITE: u64 = 1 << 20;

impl Journal {
    fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = append_to(&path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            out: std::io::BufWriter::new(file),
            size,
            kept: 0,
            in_flight: HashMap::new(),
        })
    }

    fn opened(&mut self, r: UsageRecord) {
        let mut line = serde_json::to_vec(&r).unwrap_or_default();
        line.push(b'\n');
        match self.out.write_all(&line) {
            Ok(()) => self.size += line.len() as u64,
            Err(e) => {
                tracing::error!(path = %self.path.display(), "usage journal write failed: {e}")
            }
        }
        self.in_flight.insert(r.id.clone(), r);
    }

    fn close(&mut self, id: &str) {
        self.in_flight.remove(id);
    }

    fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            tracing::error!(path = %self.path.display(), "usage journal flush failed: {e}");
        }
    }

    fn is_long(&self) -> bool {
        self.size > JOURNAL_REWRITE.max(2 * self.kept)
    }

    /// Replaces the file with the requests in flight (written beside it, renamed over it).
    /// Returns whether it did.
    fn rewrite(&mut self) -> bool {
        let tmp = {
            let mut p = self.path.as_os_str().to_owned();
            p.push(".tmp");
            PathBuf::from(p)
        };
        let rewritten = (|| {
            self.out.flush()?;
            let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            for r in self.in_flight.values() {
                serde_json::to_writer(&mut w, r)?;
                w.write_all(b"\n")?;
            }
            w.flush()?;
            w.get_ref().sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            append_to(&self.path)
        })();
        match rewritten {
            Ok(file) => {
                self.size = file.metadata().map_or(0, |m| m.len());
                self.kept = self.size;
                self.out = std::io::BufWriter::new(file);
                true
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), "usage journal rewrite failed: {e}");
                false
            }
        }
    }
}

fn read_if_exists(path: &Path) -> std::io::Result<Option<std::io::BufReader<std::fs::File>>> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(std::io::BufReader::new(f))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn append_to(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The start of the time bucket a record of `ts_ms` falls in when compacted at `now_ms`: its
/// minute if it is less than an hour old, its hour if less than two days, its (UTC) day if
/// less than 32 days (a month's budget period started at most 31 days ago), else 0.
pub(crate) fn bucket_of(ts_ms: u64, now_ms: u64) -> u64 {
    const MINUTE: u64 = 60_000;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    let age = now_ms.saturating_sub(ts_ms);
    let size = match age {
        a if a < HOUR => MINUTE,
        a if a < 2 * DAY => HOUR,
        a if a < 32 * DAY => DAY,
        _ => return 0,
    };
    ts_ms - ts_ms % size
}

/// Flushes and syncs `out`, writes the compacted log beside `path`, syncs it and renames it
/// over `path`. Returns the new file, open for appending.
fn compact_file(
    out: &mut std::io::BufWriter<std::fs::File>,
    path: &Path,
    now_ms: u64,
) -> std::io::Result<std::fs::File> {
    out.flush()?;
    out.get_ref().sync_all()?;
    let started = std::time::Instant::now();
    let (rows, read) = compact(std::io::BufReader::new(std::fs::File::open(path)?), now_ms)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".compacting");
    let tmp = PathBuf::from(tmp);
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for r in &rows {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        w.get_ref().sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable once the directory is synced.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    metrics::counter!(crate::telemetry::USAGE_LOG_COMPACTIONS).increment(1);
    tracing::info!(
        path = %path.display(),
        records = read,
        rows = rows.len(),
        ms = started.elapsed().as_millis() as u64,
        "usage log compacted"
    );
    append_to(path)
}

/// The record that closes an [`OPEN`] one whose request never settled.
fn closed_as_crashed(mut r: UsageRecord) -> UsageRecord {
    r.outcome = CRASHED.into();
    r.usage_source = UsageSource::Estimated;
    r
}

/// Reads a log and sums its records into one row per subject and [`bucket_of`]; records read
/// twice (by id) count once, lines that aren't records are dropped. Returns the rows and how
/// many records went into them.
pub(crate) fn compact(
    log: impl BufRead,
    now_ms: u64,
) -> std::io::Result<(Vec<UsageRecord>, usize)> {
    type Subject = (Arc<str>, Option<String>, Arc<str>, Arc<str>, u8, u64);
    let mut seen = HashSet::new();
    let mut sums: std::collections::BTreeMap<Subject, UsageRecord> = Default::default();
    let mut read = 0;
    for line in log.lines() {
        let Ok(r) = serde_json::from_str::<UsageRecord>(&line?) else {
            continue;
        };
        if !seen.insert(r.id.clone()) {
            continue;
        }
        read += 1;
        let bucket = bucket_of(r.ts_ms, now_ms);
        let source = r.usage_source as u8;
        let subject = (
            r.key.clone(),
            r.team.clone(),
            r.model.clone(),
            r.deployment.clone(),
            source,
            bucket,
        );
        let row = sums.entry(subject).or_insert_with(|| UsageRecord {
            id: String::new(),
            request_id: String::new(),
            ts_ms: bucket,
            key: r.key.clone(),
            team: r.team.clone(),
            model: r.model.clone(),
            deployment: r.deployment.clone(),
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            cost_pico: 0,
            outcome: "compacted".into(),
            usage_source: r.usage_source,
            requests: 0,
        });
        row.prompt_tokens += r.prompt_tokens;
        row.completion_tokens += r.completion_tokens;
        row.cached_tokens += r.cached_tokens;
        row.cost_pico += r.cost_pico;
        row.requests += r.requests;
    }
    // Ids of their own, unique across compactions: this process's id, the time, a number.
    let mut rows: Vec<UsageRecord> = sums.into_values().collect();
    for (n, r) in rows.iter_mut().enumerate() {
        r.id = format!("c-{}-{now_ms}-{n}", *INSTANCE);
    }
    Ok((rows, read))
}

/// What reading a log found.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// Records counted.
    pub(crate) records: usize,
    /// Lines that were not records (a torn last line after a crash, say).
    pub(crate) skipped: usize,
    /// Requests that went upstream and never settled (the process was killed): their
    /// [`OPEN`] records as [`CRASHED`] ones, counted at the cost they reserved. Write them to
    /// the log, so that they are closed there too.
    pub(crate) crashed: Vec<UsageRecord>,
}

/// Reads the log at `path` (if it exists) and its journal, and hands `each` every record to
/// count, once: the settled ones (a record read twice is skipped), then the requests that went
/// upstream and never settled, as [`CRASHED`] records.
pub(crate) fn replay(path: &Path, mut each: impl FnMut(&UsageRecord)) -> std::io::Result<Replay> {
    // A journal without a log: requests went upstream before any settled.
    let file = match read_if_exists(path)? {
        Some(f) => f,
        None => std::io::BufReader::new(std::fs::File::open("/dev/null")?),
    };
    let mut seen = HashSet::new();
    let mut out = Replay::default();
    // The requests that went upstream (the journal's open records), less those settled.
    let mut open: HashMap<String, UsageRecord> = HashMap::new();
    if let Some(journal) = read_if_exists(&journal_path(path))? {
        for line in journal.lines() {
            if let Ok(r) = serde_json::from_str::<UsageRecord>(&line?) {
                open.insert(r.id.clone(), r);
            }
        }
    }
    let mut settled = std::io::BufReader::new(file).lines();
    let mut crashed = None;
    loop {
        let r = match settled.next() {
            Some(line) => {
                let line = line?;
                match serde_json::from_str::<UsageRecord>(&line) {
                    Ok(r) => r,
                    Err(_) => {
                        out.skipped += usize::from(!line.trim().is_empty());
                        continue;
                    }
                }
            }
            // Then those that never settled, as if their records were in the log.
            None => {
                let rest = crashed.get_or_insert_with(|| {
                    let mut rest: Vec<UsageRecord> =
                        open.drain().map(|(_, r)| closed_as_crashed(r)).collect();
                    rest.sort_by(|a, b| b.id.cmp(&a.id));
                    out.crashed = rest.iter().rev().cloned().collect();
                    rest
                });
                match rest.pop() {
                    Some(r) => r,
                    None => break,
                }
            }
        };
        if !seen.insert(r.id.clone()) {
            continue;
        }
        open.remove(&r.id);
        out.records += 1;
        each(&r);
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

    fn record_at(id: usize, ts_ms: u64, key: &str, deployment: &str, cost: u64) -> UsageRecord {
        UsageRecord {
            id: format!("r{id}"),
            request_id: String::new(),
            ts_ms,
            key: key.into(),
            team: Some("t".into()),
            model: "m".into(),
            deployment: deployment.into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            cached_tokens: 1,
            cost_pico: cost,
            outcome: "success".into(),
            usage_source: if id.is_multiple_of(7) {
                UsageSource::Estimated
            } else {
                UsageSource::Reported
            },
            requests: 1,
        }
    }

    /// What replay reads from records: totals per key and deployment, and spend in the period
    /// containing `now` for each kind of budget period.
    fn read_back(records: &[UsageRecord], now_ms: u64) -> Vec<(String, u64)> {
        use tollgate_crds::config::BudgetPeriod;
        let periods = [
            BudgetPeriod::Lifetime,
            BudgetPeriod::Daily,
            BudgetPeriod::Weekly,
            BudgetPeriod::Monthly,
            BudgetPeriod::Seconds(60),
            BudgetPeriod::Seconds(1800),
            BudgetPeriod::Seconds(3600),
            BudgetPeriod::Seconds(6 * 3600),
            BudgetPeriod::Seconds(2 * 86_400),
            BudgetPeriod::Seconds(30 * 86_400),
        ];
        let mut out: std::collections::BTreeMap<String, u64> = Default::default();
        for r in records {
            for (what, n) in [
                ("requests", r.requests),
                ("prompt", r.prompt_tokens),
                ("completion", r.completion_tokens),
                ("cached", r.cached_tokens),
                ("cost", r.cost_pico),
            ] {
                *out.entry(format!("{} {what}", r.key)).or_default() += n;
                *out.entry(format!("{} {what}", r.deployment)).or_default() += n;
            }
            *out.entry(format!("{} {}", r.key, r.usage_source.as_str()))
                .or_default() += r.requests;
            for p in periods {
                if p.index(r.ts_ms / 1000) == p.index(now_ms / 1000) {
                    *out.entry(format!("{} {p:?}", r.key)).or_default() += r.cost_pico;
                    *out.entry(format!("t {p:?}")).or_default() += r.cost_pico;
                }
            }
        }
        out.into_iter().collect()
    }

    fn to_log(records: &[UsageRecord]) -> Vec<u8> {
        let mut log = Vec::new();
        for r in records {
            serde_json::to_writer(&mut log, r).unwrap();
            log.push(b'\n');
        }
        log
    }

    /// Compaction keeps every total and the spend of every budget period whose edges fall on
    /// bucket edges, for records spread over 90 days and read back at once, later the same
    /// day, and after a second compaction; a record logged twice still counts once.
    #[test]
    fn compaction_keeps_totals_and_period_spend() {
        let mut rng = fastrand::Rng::with_seed(7);
        // 2026-12-07 17:43:21.5 UTC: not on any bucket edge.
        let now = 1_796_665_401_500;
        let mut records: Vec<UsageRecord> = (0..20_000)
            .map(|i| {
                let age = match i % 4 {
                    0 => rng.u64(0..3_600_000),
                    1 => rng.u64(0..2 * 86_400_000),
                    2 => rng.u64(0..40 * 86_400_000),
                    _ => rng.u64(0..90 * 86_400_000),
                };
                let key = ["ns/a", "ns/b", "ns/c"][rng.usize(0..3)];
                let deployment = ["ns/d1", "ns/d2"][rng.usize(0..2)];
                record_at(i, now - age, key, deployment, rng.u64(1..1_000_000))
            })
            .collect();
        let want = read_back(&records, now);
        let mut log = to_log(&records);
        // The same record twice, and a torn line: counted once, and dropped.
        log.extend_from_slice(&to_log(&records[..1]));
        log.extend_from_slice(b"{\"id\":\"torn");
        let (rows, read) = compact(&log[..], now).unwrap();
        assert_eq!(read, records.len());
        // At most a row per subject (3 keys x 2 deployments x 2 sources) and bucket (60
        // minutes, 48 hours, 32 days, and the one before).
        assert!(rows.len() <= 12 * (60 + 48 + 32 + 1), "{} rows", rows.len());
        assert!(rows.iter().all(|r| r.outcome == "compacted"));
        assert_eq!(read_back(&rows, now), want);

        // Later the same day, with new records behind the rows: the same once those count.
        let later = now + 3 * 3_600_000;
        records.push(record_at(20_000, later - 10, "ns/a", "ns/d1", 5));
        let mut log = to_log(&rows);
        log.extend_from_slice(&to_log(&records[20_000..]));
        let (again, _) = compact(&log[..], later).unwrap();
        assert_eq!(read_back(&again, later), read_back(&records, later));
        let ids: HashSet<_> = again.iter().map(|r| &r.id).collect();
        assert_eq!(ids.len(), again.len(), "rows have ids of their own");
    }

    /// The writer compacts the file when it passes the size it was given, and what it leaves
    /// reads back as what was written.
    #[test]
    fn the_writer_compacts_past_its_size() {
        let dir = std::env::temp_dir().join(format!("tollgate-usage-compact-{}", instance_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("usage.jsonl");
        let now = unix_ms();
        let records: Vec<UsageRecord> = (0..2000)
            .map(|i| record_at(i, now - 1000, "ns/a", "ns/d1", 3))
            .collect();
        std::fs::write(&path, to_log(&records[..1000])).unwrap();
        let log = open(&path, 64 << 10).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for r in &records[1000..] {
            log.record(r.clone());
        }
        rt.block_on(log.close());
        let text = std::fs::read_to_string(&path).unwrap();
        let rows: Vec<UsageRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(rows.len() < 1000, "compacted: {} rows", rows.len());
        assert!(rows.iter().any(|r| r.outcome == "compacted"));
        assert_eq!(read_back(&rows, now), read_back(&records, now));
        assert!(!dir.join("usage.jsonl.compacting").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The stream's backlog keeps the newest records up to its bound.
    #[test]
    fn the_stream_backlog_is_bounded() {
        let mut q = std::collections::VecDeque::new();
        let dropped: Vec<bool> = (0..5).map(|i| push_bounded(&mut q, i, 3)).collect();
        assert_eq!(dropped, [false, false, false, true, true]);
        assert_eq!(q, [2, 3, 4]);
    }

    /// Records written are synced to disk within about [`SYNC_EVERY`], without waiting for
    /// shutdown.
    #[test]
    fn the_log_is_synced_within_a_second_of_a_write() {
        let dir = std::env::temp_dir().join(format!("tollgate-usage-sync-{}", instance_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = open(&dir.join("usage.jsonl"), DEFAULT_MAX_BYTES).unwrap();
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
            requests: 1,
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
