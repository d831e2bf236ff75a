//! A real Kubernetes API server for end-to-end tests: etcd, kube-apiserver and
//! kube-controller-manager (1.20.2, built by `scripts/kube-test-env.sh`) as child processes on
//! free ports of 127.0.0.1, each cluster with its own temp dir, so tests run in parallel.
//!
//! What 1.20 has and hasn't is in `docs/testing-kubernetes.md`.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a cluster may take to become usable (about 6 s on an idle machine; the tests run
/// beside a compiler on 2 cores).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The admin's bearer token (group `system:masters`, so cluster-admin under RBAC).
const ADMIN_TOKEN: &str = "tollgate-test-admin-token";

/// etcd + kube-apiserver + kube-controller-manager, killed on drop.
///
/// The controller manager runs the garbage collector (ownerReferences), namespace deletion and
/// the service-account controllers; there is no scheduler and no kubelet, so pods never run.
pub struct KubeCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    server: String,
    kubeconfig: PathBuf,
    /// The daemons, all in the process group of `anchor`.
    procs: Vec<(&'static str, Child)>,
    /// `sleep infinity`, leader of the daemons' process group.
    anchor: Child,
    /// A shell in a group of its own that reads its stdin to the end, then kills the daemons'
    /// group and removes the temp dir: when this process ends in any way, even killed by a
    /// signal that skips `Drop` (a test runner's timeout), nothing is left behind.
    reaper: Child,
    kcm_args: Vec<String>,
}

impl KubeCluster {
    /// Starts a cluster and waits until objects can be created in the `default` namespace.
    ///
    /// Binaries come from `$TOLLGATE_KUBE_BIN` (a directory), else the cache that
    /// `scripts/kube-test-env.sh` fills; `etcd` and `openssl` from the PATH. Panics, with the
    /// tails of the daemons' logs, when the cluster is not ready in time.
    pub fn start() -> Self {
        let bin = kube_bin_dir();
        for b in ["kube-apiserver", "kube-controller-manager"] {
            assert!(
                bin.join(b).is_file(),
                "no {b} in {}: run scripts/kube-test-env.sh (it builds Kubernetes 1.20.2 once \
                 into its cache), or point TOLLGATE_KUBE_BIN at a directory that has it",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("tollgate-kube-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        let d = dir.path().to_path_buf();

        let anchor = Command::new("sleep")
            .arg("infinity")
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting sleep: {e}"));
        let reaper = Command::new("sh")
            .args([
                "-c",
                r#"cat >/dev/null; kill -s KILL -- "-$1"; sleep 1; rm -rf "$2""#,
                "tollgate-kube-reaper",
            ])
            .arg(anchor.id().to_string())
            .arg(&d)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting sh: {e}"));

        let port = crate::closed_port();
        let mut cluster = Self {
            dir,
            bin,
            server: format!("https://127.0.0.1:{port}"),
            kubeconfig: d.join("kubeconfig"),
            procs: Vec::new(),
            anchor,
            reaper,
            kcm_args: Vec::new(),
        };

        // Service-account tokens are signed with this key (1.20 requires the issuer flags).
        let sa_key = d.join("sa.key");
        let sa_pub = d.join("sa.pub");
        run_ok(
            Command::new("openssl")
                .args(["genrsa", "-out"])
                .arg(&sa_key)
                .arg("2048"),
        );
        run_ok(
            Command::new("openssl")
                .args(["rsa", "-pubout", "-in"])
                .arg(&sa_key)
                .arg("-out")
                .arg(&sa_pub),
        );
        write(
            &d.join("tokens.csv"),
            &format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n"),
        );
        // The apiserver writes a self-signed serving certificate (for 127.0.0.1, with its CA)
        // into --cert-dir at start; the kubeconfig trusts that file.
        let cert_dir = d.join("certs");
        let ca = cert_dir.join("apiserver.crt");
        write(
            &cluster.kubeconfig,
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
                 certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\n\
                 contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    \
                 namespace: default\ncurrent-context: test\n",
                cluster.server,
                ca.display()
            ),
        );

        let deadline = Instant::now() + START_TIMEOUT;
        let etcd_port = crate::closed_port();
        let peer_port = crate::closed_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        cluster.spawn(
            "etcd",
            Path::new("etcd"),
            &[
                "--name=tollgate".into(),
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=tollgate={peer_url}"),
                "--initial-cluster-state=new".into(),
                "--log-level=warn".into(),
                "--logger=zap".into(),
            ],
        );
        cluster.wait("etcd to listen", deadline, |_| {
            std::net::TcpStream::connect(("127.0.0.1", etcd_port)).is_ok()
        });

        let apiserver = cluster.bin.join("kube-apiserver");
        cluster.spawn(
            "kube-apiserver",
            &apiserver,
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                // 1.20 still has the plain-HTTP port; 0 closes it.
                "--insecure-port=0".into(),
                format!("--cert-dir={}", cert_dir.display()),
                format!("--token-auth-file={}", d.join("tokens.csv").display()),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-key-file={}", sa_pub.display()),
                format!("--service-account-signing-key-file={}", sa_key.display()),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                // A loopback address is no valid endpoint for the `kubernetes` service.
                "--endpoint-reconciler-type=none".into(),
                "--profiling=false".into(),
            ],
        );
        cluster.wait("kube-apiserver /readyz", deadline, |c| {
            c.kubectl(&["get", "--raw", "/readyz"]).status.success()
        });

        cluster.kcm_args = vec![
            format!("--kubeconfig={}", cluster.kubeconfig.display()),
            "--leader-elect=false".into(),
            "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token".into(),
            format!("--service-account-private-key-file={}", sa_key.display()),
            format!("--root-ca-file={}", ca.display()),
            "--use-service-account-credentials=false".into(),
            // Its own HTTPS port serves /healthz only (no --authentication-kubeconfig, which
            // would want a client CA from the apiserver that this one has none of).
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", crate::closed_port()),
            // 1.20 still has the plain-HTTP port; 0 closes it.
            "--port=0".into(),
            format!("--cert-dir={}", d.join("kcm-certs").display()),
            "--profiling=false".into(),
        ];
        cluster.start_controller_manager();
        // The serviceaccount controller creates `default` in every namespace; until it has,
        // pods (and some charts) can't be created there.
        cluster.wait("the default service account", deadline, |c| {
            c.kubectl(&["get", "serviceaccount", "default", "-n", "default"])
                .status
                .success()
        });
        cluster
    }

    fn start_controller_manager(&mut self) {
        let kcm = self.bin.join("kube-controller-manager");
        let args = self.kcm_args.clone();
        self.spawn("kube-controller-manager", &kcm, &args);
    }

    /// Restarts kube-controller-manager (its log goes on in the same file). Its garbage
    /// collector finds resource types that appeared after it started, such as new CRDs, only
    /// on its discovery resync every 30 s; a restarted one knows them at once.
    pub fn restart_controller_manager(&mut self) {
        if let Some(i) = self
            .procs
            .iter()
            .position(|(name, _)| *name == "kube-controller-manager")
        {
            let (_, mut child) = self.procs.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
        self.start_controller_manager();
    }

    /// Applies every manifest in `dir` (CRDs) and waits up to 60 s for the CRDs among them to be
    /// Established.
    pub fn install_crds(&self, dir: &Path) {
        let dir = dir.display().to_string();
        self.kubectl_ok(&["apply", "-f", &dir]);
        self.kubectl_ok(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "-f",
            &dir,
        ]);
    }

    fn spawn(&mut self, name: &'static str, program: &Path, args: &[String]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .unwrap_or_else(|e| panic!("creating the log of {name}: {e}"));
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .unwrap_or_else(|e| panic!("log of {name}: {e}")),
            )
            .stderr(log)
            .process_group(self.anchor.id().try_into().unwrap_or(0))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} ({e}); etcd comes from Debian's etcd-server, the rest from \
                     scripts/kube-test-env.sh",
                    program.display()
                )
            });
        self.procs.push((name, child));
    }

    /// Polls `ready` every 200 ms until `deadline`; panics with the daemons' logs if it never
    /// holds or a daemon exits.
    fn wait(&mut self, what: &str, deadline: Instant, mut ready: impl FnMut(&Self) -> bool) {
        loop {
            if ready(self) {
                return;
            }
            let exited = self
                .procs
                .iter_mut()
                .find_map(|(name, child)| Some((*name, child.try_wait().ok()??)));
            if let Some((name, status)) = exited {
                panic!(
                    "{name} exited ({status}) while waiting for {what}\n{}",
                    self.logs_tail(60)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {START_TIMEOUT:?} waiting for {what}\n{}",
                    self.logs_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The whole log (stdout and stderr) of `etcd`, `kube-apiserver` or
    /// `kube-controller-manager`.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// The last `lines` lines of every daemon's log, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for (name, _) in &self.procs {
            let log = self.log(name);
            let all: Vec<&str> = log.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out.push_str(&format!("--- {name} (last {} lines)\n", tail.len()));
            for l in tail {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// A kubeconfig file for the cluster (server, CA, admin token; namespace `default`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The admin's bearer token (cluster-admin through the group `system:masters`).
    pub fn token(&self) -> &str {
        ADMIN_TOKEN
    }

    /// PEM of the certificates that the API server's certificate chains to (the self-signed
    /// serving certificate and its CA).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("certs").join("apiserver.crt")
    }

    /// Runs kubectl (the 1.20.2 one beside the server if there is one, else the PATH's)
    /// against this cluster.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running kubectl: {e}"))
    }

    /// Runs kubectl and returns its stdout; panics with its stderr if it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` with `yaml` (one or more documents) and returns kubectl's output;
    /// panics if it fails. A kind whose CRD was just created may be unknown to the server's
    /// discovery for a moment: such an apply is retried for up to 15 s.
    pub fn apply_yaml(&self, yaml: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.kubectl_stdin(&["apply", "-f", "-"], yaml);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            let err = String::from_utf8_lossy(&out.stderr);
            let unknown_kind = err.contains("no matches for kind")
                || err.contains("the server could not find the requested resource");
            assert!(
                unknown_kind && Instant::now() < deadline,
                "kubectl apply failed: {err}\n{yaml}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Runs kubectl with `input` on its stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .kubectl_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running kubectl: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .unwrap_or_else(|e| panic!("writing to kubectl: {e}"));
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("running kubectl: {e}"))
    }

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let beside = self.bin.join("kubectl");
        let program = if beside.is_file() {
            beside
        } else {
            PathBuf::from("kubectl")
        };
        let mut cmd = Command::new(program);
        // A discovery cache of its own: ports are reused, and CRDs come and go.
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args);
        cmd
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        // The reaper is for when this process dies; here, kill the group directly, then reap
        // every child, so nothing is left behind, not even a zombie. TempDir removes the dir.
        let _ = self.reaper.kill();
        let _ = self.reaper.wait();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.anchor.id())])
            .stderr(Stdio::null())
            .status();
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.anchor.kill();
        let _ = self.anchor.wait();
    }
}

/// `$TOLLGATE_KUBE_BIN`, else `${TOLLGATE_KUBE_CACHE:-$HOME/.cache/tollgate/kube-1.20.2}/bin`
/// (where `scripts/kube-test-env.sh` puts them).
pub fn kube_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TOLLGATE_KUBE_BIN").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("TOLLGATE_KUBE_CACHE")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/tollgate/kube-1.20.2")
        });
    cache.join("bin")
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
