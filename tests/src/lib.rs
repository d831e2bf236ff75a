//! Test harness for end-to-end tests: the real `tollgate-dataplane` binary as a child process,
//! and mock upstreams that are real HTTP servers on 127.0.0.1 with scripted behaviour and
//! counters. Every test gets its own processes, ports and files, so tests run in parallel.
//!
//! The e2e tests live beside the binary they drive (`dataplane/tests/`), so cargo builds the
//! binary first and hands its path over as `CARGO_BIN_EXE_*`.

#![expect(
    clippy::unwrap_used,
    reason = "test harness: a failed set-up should panic loudly"
)]

pub mod kube;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tollgate_crds::config::MockConfig;
use tollgate_dataplane::api::request::Endpoint;
use tollgate_dataplane::upstream::mock::Mock;

/// Where a gateway's config comes from.
#[derive(Clone, Debug)]
enum Source {
    Manifests(PathBuf),
    Cluster(PathBuf),
}

/// A running `tollgate-operator` process, logging to memory.
pub struct Operator {
    bin: String,
    kubeconfig: PathBuf,
    extra_args: Vec<String>,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Operator {
    /// Starts `bin` against the cluster of `kubeconfig`, publishing to `tollgate-system`.
    pub fn start(bin: &str, kubeconfig: &Path) -> Self {
        Self::start_with(bin, kubeconfig, &[])
    }

    /// Like [`Self::start`], with extra flags.
    pub fn start_with(bin: &str, kubeconfig: &Path, extra_args: &[&str]) -> Self {
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let (child, logs) = Self::spawn(bin, kubeconfig, &extra_args);
        Self {
            bin: bin.to_string(),
            kubeconfig: kubeconfig.to_path_buf(),
            extra_args,
            child,
            logs,
        }
    }

    fn spawn(
        bin: &str,
        kubeconfig: &Path,
        extra_args: &[String],
    ) -> (Child, Arc<Mutex<Vec<String>>>) {
        let mut child = Command::new(bin)
            .args([
                "--config-namespace",
                "tollgate-system",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(extra_args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,tollgate_operator=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        (child, logs)
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again (after [`Self::kill`]); the log starts afresh.
    pub fn start_again(&mut self) {
        let (child, logs) = Self::spawn(&self.bin, &self.kubeconfig, &self.extra_args);
        self.child = child;
        self.logs = logs;
    }

    /// Everything it logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.logs().contains(needle))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// User plus system CPU time, in ms, from a procfs `stat` file: `/proc/PID/stat` for a process,
/// `/proc/thread-self/stat` for the calling thread.
pub fn cpu_ms(stat_path: &str) -> u64 {
    let stat = std::fs::read_to_string(stat_path).unwrap();
    // The fields after the command (which may hold spaces) start after its parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // Clock ticks: 100 per second on Linux (USER_HZ).
    ticks * 10
}

/// A running `tollgate-dataplane` process serving manifests from its own temp dir.
pub struct Gateway {
    bin: String,
    /// Where the config comes from: `--manifests DIR`, or `--kubernetes` and a kubeconfig.
    source: Source,
    extra_args: Vec<String>,
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    logs: Arc<Mutex<Vec<String>>>,
}

/// A Secret `name` holding `key`, and a VirtualKey `name` that uses it; `spec_extra` is
/// appended to the key's flow-style spec (`, limits: {rpm: 3}`). Starts with `---`.
pub fn key_manifest(name: &str, key: &str, spec_extra: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\nstringData: {{key: {key}}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {{name: {name}}}\nspec: {{secretRef: {{name: {name}}}{spec_extra}}}\n"
    )
}

/// An LLMModel `name` whose flow-style spec is `spec` (`modelName: m, provider: mock`). Starts
/// with `---`.
pub fn model_manifest(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: {name}}}\nspec: {{{spec}}}\n"
    )
}

/// A chat completion request for `model`: one user message, `hi`.
pub fn chat_request(model: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

impl Gateway {
    /// Starts `bin` on a free port with `manifests` (multi-document YAML) and extra flags. The
    /// manifests are re-read every 100 ms. `{dir}` in a flag stands for the manifest directory.
    pub fn start(bin: &str, manifests: &str, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gateway.yaml"), manifests).unwrap();
        let source = Source::Manifests(dir.path().to_path_buf());
        Self::start_in(bin, dir, source, extra_args)
    }

    /// Starts `bin` in cluster mode (`--kubernetes`, config from the operator's Secrets in
    /// `tollgate-system`) against the cluster of `kubeconfig`.
    pub fn start_cluster(bin: &str, kubeconfig: &Path, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(
            bin,
            dir,
            Source::Cluster(kubeconfig.to_path_buf()),
            extra_args,
        )
    }

    /// Starts `bin` on `source`; `{dir}` in `extra_args` stands for `dir`.
    fn start_in(bin: &str, dir: tempfile::TempDir, source: Source, extra_args: &[&str]) -> Self {
        let extra_args: Vec<String> = extra_args
            .iter()
            .map(|a| a.replace("{dir}", &dir.path().display().to_string()))
            .collect();
        let (child, addr, logs) = Self::spawn(bin, &source, &extra_args);
        Self {
            bin: bin.to_string(),
            source,
            extra_args,
            child,
            addr,
            dir,
            logs,
        }
    }

    fn spawn(
        bin: &str,
        source: &Source,
        extra_args: &[String],
    ) -> (Child, SocketAddr, Arc<Mutex<Vec<String>>>) {
        let mut cmd = Command::new(bin);
        match source {
            Source::Manifests(dir) => {
                cmd.arg("--manifests").arg(dir);
            }
            Source::Cluster(kubeconfig) => {
                cmd.args(["--kubernetes", "--config-namespace", "tollgate-system"])
                    .env("KUBECONFIG", kubeconfig);
            }
        }
        let mut child = cmd
            .args([
                "--listen",
                "127.0.0.1:0",
                "--reload-interval",
                "100ms",
                "--worker-threads",
                "2",
            ])
            .args(extra_args)
            .env(
                "RUST_LOG",
                "info,tollgate_dataplane=debug,tollgate::access=debug",
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let addr = addr.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "gateway did not start; its log:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        (child, addr, logs)
    }

    /// Sends SIGTERM and waits (up to 10 s) for the process to exit; returns whether it exited
    /// cleanly. (A second SIGTERM cuts the gateway's shutdown short: after sending one yourself,
    /// use [`Gateway::wait_exit`].)
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits up to `timeout` for the process to exit, without signalling it; returns whether it
    /// exited cleanly (false if it is still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the process (SIGKILL): a crash, with nothing flushed or settled.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM and starts it again on the same manifests and flags (on a
    /// new port). The log starts afresh.
    pub fn restart(&mut self) {
        assert!(
            self.terminate(),
            "gateway did not exit cleanly on SIGTERM:\n{}",
            self.logs()
        );
        self.start_again();
    }

    /// Starts the process again after [`Self::kill`] or [`Self::terminate`] (on a new port).
    pub fn start_again(&mut self) {
        let (child, addr, logs) = Self::spawn(&self.bin, &self.source, &self.extra_args);
        self.child = child;
        self.addr = addr;
        self.logs = logs;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User plus system CPU time the process has used so far, in ms (from procfs).
    pub fn cpu_ms(&self) -> u64 {
        cpu_ms(&format!("/proc/{}/stat", self.pid()))
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let get = async { reqwest::get(self.url("/metrics")).await?.text().await };
        get.await.unwrap_or_else(|e| panic!("GET /metrics: {e}"))
    }

    /// The value of the first `/metrics` line that starts with `series` (a name, or a name and
    /// labels), as written.
    pub async fn metric(&self, series: &str) -> Option<String> {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(series))
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
    }

    /// POSTs `body` to `/v1/chat/completions` with `key` as the bearer token (30 s timeout).
    pub async fn chat(&self, key: &str, body: &serde_json::Value) -> reqwest::Response {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a client")
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /v1/chat/completions: {e}"))
    }

    /// The manifest directory.
    pub fn manifest_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the manifests (the gateway reloads them).
    pub fn write_manifests(&self, manifests: &str) {
        // Write then rename, so the gateway never reads a half-written file.
        let tmp = self.dir.path().join(".gateway.yaml.tmp");
        std::fs::write(&tmp, manifests).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("gateway.yaml")).unwrap();
    }

    /// Everything the gateway logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.logs().contains(needle))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Like [`wait_until`], for async tests: sleeps without blocking the test's runtime (which
/// drives the test's own HTTP connections).
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Rate windows are calendar minutes: a test counting within one must not start in its last
/// seconds. Waits for the next minute when fewer than ten are left.
pub async fn avoid_minute_boundary() {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if secs % 60 > 50 {
        tokio::time::sleep(Duration::from_secs(61 - secs % 60)).await;
    }
}

/// Path of a workspace binary when the caller has no `CARGO_BIN_EXE_*` for it.
pub fn workspace_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug").join(name)
}

/// What a mock upstream does with every request.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Answers like an OpenAI-compatible server, from the mock provider's code.
    Ok(MockConfig),
    /// Answers every request with this status and body.
    Status(u16, &'static str),
    /// Answers 200 with a body that isn't JSON.
    Garbage,
    /// Streams one content event and the usage event at once, then stalls for a minute before
    /// `[DONE]`: a stream whose client leaves after its usage was reported.
    UsageThenStall {
        /// Reported prompt tokens.
        prompt: u64,
        /// Reported completion tokens.
        completion: u64,
    },
    /// Answers the first `n` requests with `status` (and `retry-after`, if set), then like `Ok`.
    FailFirst {
        /// Requests that fail.
        n: usize,
        /// Their status.
        status: u16,
        /// Their `retry-after`, seconds.
        retry_after: Option<u64>,
        /// What the rest get.
        then: MockConfig,
    },
    /// Accepts the connection, reads the request and closes the socket without answering.
    Reset,
    /// Streams `chunks` content events, then breaks the connection mid-stream.
    DieMidStream {
        /// Events sent before dying.
        chunks: usize,
    },
    /// Streams `chunks` SSE events `delay` apart, noting whether the client stayed to the end.
    SlowStream {
        /// Events to send.
        chunks: usize,
        /// Delay between them.
        delay: Duration,
    },
}

/// Counters of a mock upstream.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests received.
    pub requests: AtomicUsize,
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Streams whose body was dropped before the end (the peer went away).
    pub streams_cancelled: AtomicUsize,
    /// Streams sent to the end.
    pub streams_completed: AtomicUsize,
    /// The last request's body.
    pub last_body: Mutex<Option<Bytes>>,
    /// The last request's `Authorization` header.
    pub last_auth: Mutex<Option<String>>,
    /// The last request's path.
    pub last_path: Mutex<Option<String>>,
    /// `GET /metrics` requests received (not counted in `requests`).
    pub metrics_scrapes: AtomicUsize,
    /// `GET .../models` health probes received (not counted in `requests`).
    pub probes: AtomicUsize,
}

impl Stats {
    /// Requests received.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The last request body as JSON.
    pub fn last_json(&self) -> serde_json::Value {
        let body = self.last_body.lock().unwrap().clone().unwrap_or_default();
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)
    }
}

/// A mock upstream: a real HTTP server on 127.0.0.1, on its own thread and runtime.
pub struct MockUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub stats: Arc<Stats>,
    behavior: Arc<Mutex<Behavior>>,
    metrics: Arc<Mutex<Option<String>>>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

struct StreamGuard {
    stats: Arc<Stats>,
    done: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let c = if self.done {
            &self.stats.streams_completed
        } else {
            &self.stats.streams_cancelled
        };
        c.fetch_add(1, Ordering::SeqCst);
    }
}

impl MockUpstream {
    /// Starts a server with `behavior`.
    pub fn start(behavior: Behavior) -> Self {
        let stats = Arc::new(Stats::default());
        let behavior = Arc::new(Mutex::new(behavior));
        let metrics = Arc::new(Mutex::new(None::<String>));
        let (addr_tx, addr_rx) = mpsc::channel();
        let (shutdown, mut shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let (st, bh, mt) = (stats.clone(), behavior.clone(), metrics.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let (st2, bh2) = (st.clone(), bh.clone());
                let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
                    let (st, bh, mt) = (st2.clone(), bh2.clone(), mt.clone());
                    async move { respond(&bh, &mt, &st, req).await }
                });
                // Connections go to axum, except while the behavior is `Reset`: then the
                // socket is read and dropped with no answer.
                loop {
                    let (mut sock, _) = tokio::select! {
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                        _ = &mut shutdown_rx => return,
                    };
                    st.connections.fetch_add(1, Ordering::SeqCst);
                    let reset = matches!(*behavior_of(&bh), Behavior::Reset);
                    if reset {
                        let st = st.clone();
                        tokio::spawn(async move {
                            use tokio::io::AsyncReadExt;
                            let mut buf = [0u8; 4096];
                            let _ = sock.read(&mut buf).await;
                            st.requests.fetch_add(1, Ordering::SeqCst);
                            // Linger 0: the close is a TCP reset, as a crashed server's.
                            #[expect(deprecated, reason = "linger 0 never blocks on drop")]
                            let _ = sock.set_linger(Some(Duration::ZERO));
                        });
                        continue;
                    }
                    let svc = app.clone();
                    tokio::spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(sock);
                        let svc = hyper_util::service::TowerToHyperService::new(svc);
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(io, svc)
                        .await;
                    });
                }
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Self {
            addr,
            stats,
            behavior,
            metrics,
            _shutdown: shutdown,
        }
    }

    /// Changes what the server does from the next request on.
    pub fn set_behavior(&self, b: Behavior) {
        *self.behavior.lock().unwrap() = b;
    }

    /// Serves `text` at `GET /metrics` (Prometheus text, e.g. vLLM's queue gauges).
    pub fn set_metrics(&self, text: &str) {
        *self.metrics.lock().unwrap() = Some(text.to_string());
    }

    /// Base URL for an LLMModel's `url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

fn behavior_of(b: &Mutex<Behavior>) -> std::sync::MutexGuard<'_, Behavior> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

async fn respond(
    behavior: &Mutex<Behavior>,
    metrics: &Mutex<Option<String>>,
    stats: &Arc<Stats>,
    req: axum::extract::Request,
) -> Response {
    use http_body_util_shim::collect;
    if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
        stats.metrics_scrapes.fetch_add(1, Ordering::SeqCst);
        return match metrics.lock().unwrap().clone() {
            Some(text) => text.into_response(),
            None => http::StatusCode::NOT_FOUND.into_response(),
        };
    }
    let behavior = &behavior_of(behavior).clone();
    if req.method() == http::Method::GET && req.uri().path().ends_with("/models") {
        // A health probe: the model list, or the failure the behavior stands for.
        stats.probes.fetch_add(1, Ordering::SeqCst);
        return match behavior {
            Behavior::Status(code, body) => (
                http::StatusCode::from_u16(*code).unwrap(),
                [("content-type", "application/json")],
                *body,
            )
                .into_response(),
            _ => (
                [("content-type", "application/json")],
                r#"{"object":"list","data":[]}"#,
            )
                .into_response(),
        };
    }
    let seen = stats.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    *stats.last_auth.lock().unwrap() = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    *stats.last_path.lock().unwrap() = Some(path.clone());
    let body = collect(req.into_body()).await;
    *stats.last_body.lock().unwrap() = Some(body.clone());
    match behavior {
        Behavior::Ok(cfg) => {
            let endpoint = match path.as_str() {
                "/v1/completions" => Endpoint::Completions,
                "/v1/embeddings" => Endpoint::Embeddings,
                _ => Endpoint::ChatCompletions,
            };
            tollgate_dataplane::upstream::mock::serve(&Mock::new(cfg), endpoint, body).await
        }
        Behavior::FailFirst {
            n,
            status,
            retry_after,
            then,
        } => {
            if seen < *n {
                let mut r = (
                    http::StatusCode::from_u16(*status).unwrap(),
                    [("content-type", "application/json")],
                    r#"{"error":{"message":"failing on purpose","type":"server_error"}}"#,
                )
                    .into_response();
                if let Some(s) = retry_after {
                    r.headers_mut()
                        .insert("retry-after", http::HeaderValue::from(*s));
                }
                return r;
            }
            tollgate_dataplane::upstream::mock::serve(
                &Mock::new(then),
                Endpoint::ChatCompletions,
                body,
            )
            .await
        }
        Behavior::Status(code, body) => {
            let status = http::StatusCode::from_u16(*code).unwrap();
            (status, [("content-type", "application/json")], *body).into_response()
        }
        Behavior::Garbage => (http::StatusCode::OK, "<html>definitely not json").into_response(),
        // Handled at accept time; a connection already open when the behavior changed is
        // simply closed.
        Behavior::Reset => {
            let stream = futures_util::stream::once(async {
                Err::<Bytes, _>(std::io::Error::other("reset"))
            });
            Body::from_stream(stream).into_response()
        }
        Behavior::DieMidStream { chunks } => {
            let chunks = *chunks;
            // The events go out first (headers included); the connection breaks a moment later.
            let stream = futures_util::stream::unfold(0usize, move |i| async move {
                if i > chunks {
                    return None;
                }
                if i == chunks {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Some((Err(std::io::Error::other("upstream died")), i + 1));
                }
                Some((
                    Ok(Bytes::from(format!(
                        "data: {{\"id\":\"d\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n"
                    ))),
                    i + 1,
                ))
            });
            (
                [("content-type", "text/event-stream")],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Behavior::UsageThenStall { prompt, completion } => {
            let head = Bytes::from(format!(
                "data: {{\"id\":\"u\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"hi\"}}}}]}}\n\n\
                 data: {{\"id\":\"u\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion},\"total_tokens\":{}}}}}\n\n",
                prompt + completion
            ));
            let guard = StreamGuard {
                stats: stats.clone(),
                done: false,
            };
            let stream = futures_util::stream::unfold((0u8, guard), move |(i, mut guard)| {
                let head = head.clone();
                async move {
                    match i {
                        0 => Some((Ok::<_, std::convert::Infallible>(head), (1, guard))),
                        1 => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            guard.done = true;
                            Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), (2, guard)))
                        }
                        _ => None,
                    }
                }
            });
            (
                [("content-type", "text/event-stream")],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Behavior::SlowStream { chunks, delay } => {
            let guard = StreamGuard {
                stats: stats.clone(),
                done: false,
            };
            let (chunks, delay) = (*chunks, *delay);
            let stream = futures_util::stream::unfold(
                (0usize, guard),
                move |(i, mut guard)| async move {
                    if i > chunks {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(delay).await;
                    }
                    let ev = if i == chunks {
                        guard.done = true;
                        Bytes::from_static(b"data: [DONE]\n\n")
                    } else {
                        Bytes::from(format!(
                            "data: {{\"id\":\"s\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n"
                        ))
                    };
                    Some((Ok::<_, std::convert::Infallible>(ev), (i + 1, guard)))
                },
            );
            (
                [("content-type", "text/event-stream")],
                Body::from_stream(stream),
            )
                .into_response()
        }
    }
}

mod http_body_util_shim {
    use axum::body::Body;
    use bytes::Bytes;

    pub async fn collect(body: Body) -> Bytes {
        axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default()
    }
}

/// A closed port on 127.0.0.1 (bound, then released), for connection-refused tests.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A real `redis-server` on a free port of 127.0.0.1, without persistence (a restart loses its
/// data, as a Redis without a volume would).
pub struct Redis {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
}

impl Redis {
    /// Starts `redis-server` (from the PATH) and waits until it answers.
    pub fn start() -> Self {
        let mut r = Self {
            child: None,
            port: closed_port(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting redis-server (apt-get install redis-server): {e}")
            });
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(10), || {
                use std::io::{Read, Write};
                let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    return false;
                };
                let mut buf = [0u8; 7];
                s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
            }),
            "redis-server did not answer on port {port}"
        );
    }

    /// `redis://127.0.0.1:port/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (its data is gone).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
