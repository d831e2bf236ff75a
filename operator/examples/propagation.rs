//! Config propagation time: from `kubectl apply` to the first response that reflects it, through
//! a real API server (etcd + kube-apiserver 1.20, `tollgate_testkit::kube`), the operator, and
//! a data plane in cluster mode, all on 127.0.0.1.
//!
//! ```text
//! cargo build --release -p tollgate-operator -p tollgate-dataplane --bins
//! cargo run --release -p tollgate-operator --example propagation -- [--rounds 30] [--keys 0]
//! ```
//!
//! What it does:
//! 1. Starts a cluster, installs the CRDs, starts the operator and one data plane.
//! 2. With `--keys N`: applies N VirtualKeys (each with its own Secret) with `kubectl apply -f -`
//!    in batches, and reports how long until the last one is served and until the operator has
//!    written all N first-time statuses. One model edit is measured right after the import,
//!    while those status writes are still going on.
//! 3. `--rounds` times: `kubectl apply` an edit of an LLMModel (mock provider, new
//!    `mock.reply`) and polls the data plane every 10 ms until it answers with the new reply.
//! 4. `--key-rounds` times: `kubectl apply` a new VirtualKey (and its Secret) and polls until
//!    the key gets a 200.
//!
//! Every time is measured from just before `kubectl` is started to the first response that
//! shows the change, and split into: kubectl's exit; the new head config Secret arriving on a
//! watch of our own (what the data plane's watch sees: the operator has published); the data
//! plane's "installed the published config" log line (decoded and swapped in); the operator's
//! "published config" log line, which comes only after it has also deleted the old shards.
//!
//! Binaries: `--operator-bin` and `--dataplane-bin`, default `target/release/...` (or
//! `$CARGO_TARGET_DIR/release`). Needs `scripts/kube-test-env.sh` to have built the API server.

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_crds::publish::{HEAD_HASH, LABEL};
use tollgate_testkit::Gateway;
use tollgate_testkit::kube::{KubeCluster, kube_bin_dir};

const NS: &str = "bench";
const KEY: &str = "sk-propagation-bench-key-0001";
/// Poll interval of the data plane.
const POLL: Duration = Duration::from_millis(10);

struct Args {
    rounds: usize,
    keys: usize,
    key_rounds: usize,
    batch: usize,
    timeout: Duration,
    backlog_timeout: Duration,
    operator_bin: PathBuf,
    dataplane_bin: PathBuf,
}

fn release_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release").join(name)
}

fn args() -> Args {
    let mut a = Args {
        rounds: 30,
        keys: 0,
        key_rounds: 10,
        batch: 250,
        timeout: Duration::from_secs(30),
        backlog_timeout: Duration::from_secs(600),
        operator_bin: release_bin("tollgate-operator"),
        dataplane_bin: release_bin("tollgate-dataplane"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("{flag} needs a value (try --help)"))
        };
        let mut num = || -> usize {
            let v = value();
            v.parse()
                .unwrap_or_else(|_| panic!("{v:?} is not a number"))
        };
        match flag.as_str() {
            "--rounds" => a.rounds = num(),
            "--keys" => a.keys = num(),
            "--key-rounds" => a.key_rounds = num(),
            "--batch" => a.batch = num().max(1),
            "--timeout-secs" => a.timeout = Duration::from_secs(num() as u64),
            "--backlog-timeout-secs" => a.backlog_timeout = Duration::from_secs(num() as u64),
            "--operator-bin" => a.operator_bin = value().into(),
            "--dataplane-bin" => a.dataplane_bin = value().into(),
            "-h" | "--help" => {
                println!(
                    "usage: propagation [--rounds 30] [--keys 0] [--key-rounds 10] [--batch 250] \
                     [--timeout-secs 30] [--backlog-timeout-secs 600] [--operator-bin PATH] \
                     [--dataplane-bin PATH]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown flag {other:?} (try --help)"),
        }
    }
    for b in [&a.operator_bin, &a.dataplane_bin] {
        assert!(
            b.is_file(),
            "{} is missing: cargo build --release -p tollgate-operator -p tollgate-dataplane --bins \
             (or pass --operator-bin / --dataplane-bin)",
            b.display()
        );
    }
    a
}

/// A child process whose stderr lines are kept in memory; killed on drop.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lock").clone()
    }
    fn len(&self) -> usize {
        self.lines.lock().expect("log lock").len()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    tollgate_testkit::closed_port()
}

fn start_operator(bin: &Path, kubeconfig: &Path, metrics_port: u16) -> Proc {
    let mut child = Command::new(bin)
        .args([
            "--config-namespace",
            "tollgate-system",
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().expect("log lock").push(line);
        }
    });
    Proc { child, lines }
}

/// `kubectl` against the cluster, with a discovery cache of its own.
struct Kubectl {
    program: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn new(kubeconfig: &Path) -> Self {
        let beside = kube_bin_dir().join("kubectl");
        Self {
            program: if beside.is_file() {
                beside
            } else {
                "kubectl".into()
            },
            kubeconfig: kubeconfig.to_path_buf(),
            cache: std::env::temp_dir().join(format!(
                "tollgate-propagation-kubectl-{}",
                std::process::id()
            )),
        }
    }

    /// Starts `kubectl apply -f -` with `yaml` on its stdin and returns at once.
    fn spawn_apply(&self, yaml: &str) -> Child {
        let mut child = Command::new(&self.program)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running kubectl: {e}"));
        // The edits are small: they fit in the pipe, so this does not block on kubectl.
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(yaml.as_bytes())
            .unwrap_or_else(|e| panic!("writing to kubectl: {e}"));
        drop(stdin);
        child
    }
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.cache);
    }
}

fn model_yaml(reply: &str) -> String {
    format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: demo, namespace: {NS}}}\n\
         spec: {{modelName: demo, provider: mock, mock: {{reply: '{reply}'}}}}\n"
    )
}

fn key_yaml(name: &str, key: &str, i: usize) -> String {
    let budget = if i.is_multiple_of(3) {
        ", budget: {maxUsd: 50, duration: monthly}"
    } else {
        ""
    };
    let limits = if i.is_multiple_of(5) {
        ", limits: {rpm: 600, tpm: 100000}"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key, namespace: {NS}}}\nstringData: {{key: {key}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {{name: {name}, namespace: {NS}}}\n\
         spec: {{secretRef: {{name: {name}-key}}, team: team-{:02}, models: [demo]{budget}{limits}}}\n",
        i % 50
    )
}

fn bulk_key(i: usize) -> String {
    format!("sk-bulk-{i:08}-0123456789abcdef")
}

/// One chat completion: status and reply text.
async fn chat(http: &reqwest::Client, gw: &Gateway, key: &str) -> (u16, String) {
    let r = http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match r {
        Ok(r) => {
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            let reply = v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (status, reply)
        }
        Err(_) => (0, String::new()),
    }
}

/// One measured change.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// kubectl start → first response showing the change.
    served: Duration,
    /// kubectl start → kubectl exit.
    kubectl: Option<Duration>,
    /// kubectl start → a new head Secret seen on our watch.
    head: Option<Duration>,
    /// kubectl start → the operator's "published config" line.
    published: Option<Duration>,
    /// kubectl start → the data plane's "installed the published config" line.
    installed: Option<Duration>,
}

/// The timestamp at the start of a `tracing` text line (ANSI colours stripped).
fn line_time(line: &str) -> Option<jiff::Timestamp> {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain.split_whitespace().next()?.parse().ok()
}

/// The offset from `start` of the first of `lines[from..]` containing `needle`.
fn logged_after(
    lines: &[String],
    from: usize,
    needle: &str,
    start: jiff::Timestamp,
) -> Option<Duration> {
    let t = lines
        .iter()
        .skip(from)
        .find(|l| l.contains(needle))
        .and_then(|l| line_time(l))?;
    let d = t.duration_since(start);
    Duration::try_from(d).ok().or(Some(Duration::ZERO))
}

/// When each new head config Secret arrived on a watch of `tollgate-system`.
type Heads = Arc<Mutex<Vec<Instant>>>;

/// Watches the head config Secret, as a data-plane pod does, noting when each new config
/// (a new hash) arrives.
async fn watch_heads(kubeconfig: &Path) -> Heads {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("reading the kubeconfig");
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .expect("a client config from the kubeconfig");
    let client = kube::Client::try_from(config).expect("a Kubernetes client");
    let api: kube::Api<Secret> = kube::Api::namespaced(client, "tollgate-system");
    let heads = Heads::default();
    let sink = heads.clone();
    let stream = watcher(
        api,
        watcher::Config::default().labels(&format!("{LABEL}=head")),
    );
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut last = String::new();
        while let Some(ev) = stream.next().await {
            let (Ok(watcher::Event::Apply(s)) | Ok(watcher::Event::InitApply(s))) = ev else {
                continue;
            };
            let hash = s
                .data
                .as_ref()
                .and_then(|d| d.get(HEAD_HASH))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default();
            if hash != last {
                sink.lock().expect("heads lock").push(Instant::now());
                last = hash;
            }
        }
    });
    heads
}

struct Bench<'a> {
    http: reqwest::Client,
    gw: &'a Gateway,
    op: &'a Proc,
    kubectl: &'a Kubectl,
    heads: Heads,
}

impl Bench<'_> {
    /// Applies `yaml`, then polls with `key` until `done(status, reply)`, for at most `limit`.
    async fn measure(
        &self,
        yaml: &str,
        key: &str,
        limit: Duration,
        done: impl Fn(u16, &str) -> bool,
    ) -> Option<Sample> {
        let (op_from, gw_from) = (self.op.len(), self.gw.logs().lines().count());
        let wall = jiff::Timestamp::now();
        let t0 = Instant::now();
        let mut child = self.kubectl.spawn_apply(yaml);
        let mut sample = Sample::default();
        let mut served = None;
        loop {
            if sample.kubectl.is_none()
                && let Ok(Some(status)) = child.try_wait()
            {
                sample.kubectl = Some(t0.elapsed());
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    panic!("kubectl apply failed: {err}\n{yaml}");
                }
            }
            let (status, reply) = chat(&self.http, self.gw, key).await;
            if done(status, &reply) {
                served = Some(t0.elapsed());
                break;
            }
            if t0.elapsed() > limit {
                eprintln!("  not served within {limit:?}; last answer {status} {reply:?}");
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        if sample.kubectl.is_none() {
            let _ = child.wait();
            sample.kubectl = Some(t0.elapsed());
        }
        sample.served = served?;
        sample.head = self
            .heads
            .lock()
            .expect("heads lock")
            .iter()
            .find(|t| **t >= t0)
            .map(|t| t.duration_since(t0));
        // The operator logs "published config" only after deleting the old shards: that can
        // trail the response.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            sample.published = logged_after(&self.op.lines(), op_from, "published config", wall);
            if sample.published.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Log lines are read from a pipe by another thread: they may lag a little.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            let gw_lines: Vec<String> = self.gw.logs().lines().map(str::to_string).collect();
            sample.installed =
                logged_after(&gw_lines, gw_from, "installed the published config", wall);
            if sample.installed.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(sample)
    }
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// Markdown rows: p50/p90/p99/max of each part of `samples`.
fn report(title: &str, samples: &[Sample], attempted: usize) {
    println!();
    println!(
        "### {title}: {} of {attempted} served within the limit",
        samples.len()
    );
    println!();
    println!("| from kubectl start to | n | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    type Part = fn(&Sample) -> Option<Duration>;
    let parts: [(&str, Part); 5] = [
        ("kubectl exits", |s| s.kubectl),
        ("new head Secret seen on a watch (published)", |s| s.head),
        ("data plane logs `installed`", |s| s.installed),
        ("**first response with the change**", |s| Some(s.served)),
        (
            "operator logs `published config` (after deleting old shards)",
            |s| s.published,
        ),
    ];
    for (name, f) in parts {
        let mut v: Vec<Duration> = samples.iter().filter_map(f).collect();
        v.sort();
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            v.len(),
            ms(pct(&v, 50.0)),
            ms(pct(&v, 90.0)),
            ms(pct(&v, 99.0)),
            ms(v.last().copied().unwrap_or_default())
        );
    }
}

/// The operator's Prometheus text.
async fn metrics(http: &reqwest::Client, port: u16) -> String {
    match http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The value of the first sample whose line starts with `series`.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

const STATUS_OK: &str = "tollgate_operator_status_writes_total{result=\"ok\"}";

/// The operator's counters at one moment.
struct Counters {
    reconciles: f64,
    publishes: f64,
    status_writes: f64,
}

impl Counters {
    async fn read(http: &reqwest::Client, port: u16) -> Self {
        let text = metrics(http, port).await;
        Self {
            reconciles: metric(&text, "tollgate_operator_reconciles_total{result=\"ok\"}"),
            publishes: metric(&text, "tollgate_operator_config_publishes_total"),
            status_writes: metric(&text, STATUS_OK),
        }
    }
}

fn print_operator_metrics(text: &str) {
    println!();
    println!("Operator metrics at the end:");
    for l in text.lines().filter(|l| {
        l.starts_with("tollgate_operator_")
            && !l.starts_with("tollgate_operator_reconcile_duration_seconds_bucket")
    }) {
        println!("    {l}");
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    let started = Instant::now();
    println!("Starting etcd + kube-apiserver 1.20.2 + controller manager on 127.0.0.1 ...");
    let kube = KubeCluster::start();
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tollgate/files/crds");
    kube.install_crds(&crds);
    kube.kubectl_ok(&["create", "namespace", "tollgate-system"]);
    kube.kubectl_ok(&["create", "namespace", NS]);
    kube.apply_yaml(&format!(
        "{}---\n{}",
        model_yaml("round-0"),
        key_yaml("bench", KEY, 1)
    ));
    let metrics_port = free_port();
    let op = start_operator(&a.operator_bin, kube.kubeconfig_path(), metrics_port);
    let t = Instant::now();
    while !op.lines().iter().any(|l| l.contains("published config")) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the operator published nothing in 120 s:\n{}",
            op.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Info logs only: no access log line per poll (the test kit turns those on).
    let gw = Gateway::start_cluster(
        &a.dataplane_bin.display().to_string(),
        kube.kubeconfig_path(),
        &["--log", "info"],
    );
    let http = reqwest::Client::new();
    let kubectl = Kubectl::new(kube.kubeconfig_path());
    let bench = Bench {
        http: http.clone(),
        gw: &gw,
        op: &op,
        kubectl: &kubectl,
        heads: watch_heads(kube.kubeconfig_path()).await,
    };
    let t = Instant::now();
    while chat(&http, &gw, KEY).await != (200, "round-0".to_string()) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the data plane does not serve the first config:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "Cluster, operator and data plane up in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut round = 0usize;
    if a.keys > 0 {
        // Wait for the base objects' statuses, so the counter below counts only the import.
        let base = Instant::now();
        while metric(&metrics(&http, metrics_port).await, STATUS_OK) < 2.0
            && base.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let writes_before = metric(&metrics(&http, metrics_port).await, STATUS_OK);
        let import = Instant::now();
        for (b, chunk) in (0..a.keys).collect::<Vec<_>>().chunks(a.batch).enumerate() {
            let yaml: Vec<String> = chunk
                .iter()
                .map(|&i| key_yaml(&format!("bulk-{i:05}"), &bulk_key(i), i))
                .collect();
            let out = kube.kubectl_stdin(&["apply", "-f", "-"], &yaml.join("---\n"));
            assert!(
                out.status.success(),
                "kubectl apply (batch {b}) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if b % 8 == 7 {
                println!(
                    "  {} keys applied in {:.1} s",
                    (b + 1) * a.batch,
                    import.elapsed().as_secs_f64()
                );
            }
        }
        let applied = import.elapsed();
        println!(
            "Imported {} VirtualKeys + {} Secrets with kubectl apply (batches of {}) in {:.1} s ({:.0} objects/s)",
            a.keys,
            a.keys,
            a.batch,
            applied.as_secs_f64(),
            2.0 * a.keys as f64 / applied.as_secs_f64()
        );
        // The last key imported: served once the operator has published the last batch.
        let last = bulk_key(a.keys - 1);
        let t = Instant::now();
        let mut last_served = None;
        while t.elapsed() < a.backlog_timeout {
            if chat(&http, &gw, &last).await.0 == 200 {
                last_served = Some(t.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match last_served {
            Some(d) => println!(
                "The last imported key was served {:.2} s after the import ended",
                d.as_secs_f64()
            ),
            None => println!(
                "The last imported key was NOT served within {:?}",
                a.backlog_timeout
            ),
        }
        // A model edit while the operator may still be writing first-time statuses.
        let writes_now = metric(&metrics(&http, metrics_port).await, STATUS_OK);
        round += 1;
        let reply = format!("round-{round}");
        let during = bench
            .measure(&model_yaml(&reply), KEY, a.backlog_timeout, |s, r| {
                s == 200 && r == reply
            })
            .await;
        let writes_then = metric(&metrics(&http, metrics_port).await, STATUS_OK);
        println!(
            "A model edit right after the import: first-time statuses written when it was applied: {} of {}; when it was served: {}",
            writes_now - writes_before,
            a.keys,
            writes_then - writes_before
        );
        report("model edit right after the import", during.as_slice(), 1);
        // Until every imported key has its status.
        let mut statuses_done = None;
        let mut last_print = Instant::now();
        while import.elapsed() < a.backlog_timeout + applied {
            let done = metric(&metrics(&http, metrics_port).await, STATUS_OK) - writes_before;
            if done >= a.keys as f64 {
                statuses_done = Some(import.elapsed());
                break;
            }
            if last_print.elapsed() > Duration::from_secs(15) {
                println!(
                    "  {done} of {} statuses written, {:.0} s after the import started",
                    a.keys,
                    import.elapsed().as_secs_f64()
                );
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match statuses_done {
            Some(d) => println!(
                "All {} first-time statuses written {:.1} s after the import started ({:.1} s after it ended)",
                a.keys,
                d.as_secs_f64(),
                (d.saturating_sub(applied)).as_secs_f64()
            ),
            None => println!(
                "Not all first-time statuses were written within the time limit ({:?} after the import)",
                a.backlog_timeout
            ),
        }
    }

    println!();
    println!(
        "Measuring {} model edits and {} new keys ({} keys in the cluster) ...",
        a.rounds,
        a.key_rounds,
        a.keys + 1
    );
    let before = Counters::read(&http, metrics_port).await;
    let mut edits = Vec::new();
    for _ in 0..a.rounds {
        round += 1;
        let reply = format!("round-{round}");
        if let Some(s) = bench
            .measure(&model_yaml(&reply), KEY, a.timeout, |s, r| {
                s == 200 && r == reply
            })
            .await
        {
            edits.push(s);
        }
        // Let the operator's status write for this edit settle before the next one.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut new_keys = Vec::new();
    for i in 0..a.key_rounds {
        let key = format!("sk-new-key-{i:04}-{}", std::process::id());
        let yaml = key_yaml(&format!("new-{i:04}"), &key, i);
        if let Some(s) = bench.measure(&yaml, &key, a.timeout, |s, _| s == 200).await {
            new_keys.push(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!();
    println!(
        "## Propagation: {} VirtualKeys, data plane polled every {} ms",
        a.keys + 1 + a.key_rounds,
        POLL.as_millis()
    );
    report("LLMModel edit (`mock.reply`) → served", &edits, a.rounds);
    report(
        "new VirtualKey + Secret → first 200",
        &new_keys,
        a.key_rounds,
    );
    let text = metrics(&http, metrics_port).await;
    let after = Counters::read(&http, metrics_port).await;
    println!();
    println!(
        "During the {} measured changes the operator ran {} reconciles, published {} configs and \
         wrote {} statuses ({:.1} reconciles per change).",
        a.rounds + a.key_rounds,
        after.reconciles - before.reconciles,
        after.publishes - before.publishes,
        after.status_writes - before.status_writes,
        (after.reconciles - before.reconciles) / (a.rounds + a.key_rounds).max(1) as f64
    );
    print_operator_metrics(&text);
    let installs = gw
        .logs()
        .lines()
        .filter(|l| l.contains("installed the published config"))
        .count();
    println!("Data plane installs: {installs}");
    let errors: Vec<String> = op
        .lines()
        .into_iter()
        .chain(gw.logs().lines().map(str::to_string))
        .filter(|l| l.contains("ERROR") || l.contains(" WARN "))
        .take(20)
        .collect();
    if !errors.is_empty() {
        println!("Warnings and errors logged (first 20):");
        for e in errors {
            println!("    {e}");
        }
    }
    println!("Total run time {:.0} s", started.elapsed().as_secs_f64());
}
