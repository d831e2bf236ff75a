//! The Helm chart (`charts/tollgate`) against a real Kubernetes API server (see
//! `tollgate_testkit::kube`): rendered and linted by a real `helm` (`scripts/helm.sh` installs
//! one), every object of both modes validated by the server (`kubectl apply --dry-run=server`),
//! installed and then upgraded to cluster mode by Helm itself, the RBAC checked verb by verb
//! with `kubectl auth can-i --as`, and finally the real operator and data plane run with the
//! flags, environment and service-account tokens the chart gives their pods: a model and a
//! VirtualKey applied with kubectl are served, so the roles are not only plausible but enough.
//!
//! Needs `scripts/kube-test-env.sh` (the API server), `scripts/helm.sh` (helm, found through
//! `$TOLLGATE_HELM`, its cache, or the PATH) and the data-plane binary built
//! (`cargo nextest run --workspace` builds it).

#![expect(clippy::unwrap_used, reason = "tests")]

use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tollgate_testkit::kube::KubeCluster;
use tollgate_testkit::{closed_port, workspace_bin};

const OPERATOR: &str = env!("CARGO_BIN_EXE_tollgate-operator");
/// Where the release goes, as in docs/helm.md.
const NS: &str = "tollgate-system";
const RELEASE: &str = "tollgate";
/// The Helm version `scripts/helm.sh` installs (for finding its cache).
const HELM_VERSION: &str = "3.17.2";

fn chart_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/tollgate")
        .display()
        .to_string()
}

/// `$TOLLGATE_HELM`, else the binary `scripts/helm.sh` caches, else `helm` from the PATH.
fn helm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_HELM").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("TOLLGATE_HELM_CACHE")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(format!(".cache/tollgate/helm-{HELM_VERSION}"))
        })
        .join("bin/helm");
    if cache.is_file() {
        return cache;
    }
    let on_path = Command::new("helm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        on_path,
        "no helm: run scripts/helm.sh (it installs one into its cache), or point TOLLGATE_HELM \
         at a helm binary"
    );
    PathBuf::from("helm")
}

/// A directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("tollgate-chart-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// helm, with its caches and config in `scratch` (nothing of the user's is read or written),
/// talking to `kube`.
struct Helm<'a> {
    bin: PathBuf,
    scratch: &'a Scratch,
    kubeconfig: PathBuf,
}

impl Helm<'_> {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.scratch.path("helm/cache"))
            .env("HELM_CONFIG_HOME", self.scratch.path("helm/config"))
            .env("HELM_DATA_HOME", self.scratch.path("helm/data"))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bin.display()))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "helm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `helm template` of the chart as release `release` in `ns`, CRDs included (as Argo CD
    /// renders it).
    fn template(&self, release: &str, ns: &str, set: &[&str]) -> String {
        let chart = chart_dir();
        let mut args = vec!["template", release, &chart, "-n", ns, "--include-crds"];
        for s in set {
            args.extend(["--set", s]);
        }
        self.ok(&args)
    }
}

/// `kubectl apply --dry-run=server` of `yaml`: the names of the objects the server accepted.
fn dry_run(kube: &KubeCluster, yaml: &str) -> BTreeSet<String> {
    let out = kube.kubectl_stdin(
        &["apply", "--dry-run=server", "-o", "name", "-f", "-"],
        yaml,
    );
    assert!(
        out.status.success(),
        "the API server rejected the rendered chart: {}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const CRDS: [&str; 3] = [
    "customresourcedefinition.apiextensions.k8s.io/llmmodels.tollgate.dev",
    "customresourcedefinition.apiextensions.k8s.io/routepolicies.tollgate.dev",
    "customresourcedefinition.apiextensions.k8s.io/virtualkeys.tollgate.dev",
];

const KSERVE_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: inferenceservices.serving.kserve.io}
spec:
  group: serving.kserve.io
  scope: Namespaced
  names: {kind: InferenceService, listKind: InferenceServiceList, plural: inferenceservices, singular: inferenceservice}
  versions:
  - name: v1beta1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
";

fn get_json(kube: &KubeCluster, args: &[&str]) -> Value {
    let mut a = vec!["get"];
    a.extend(args);
    a.extend(["-o", "json"]);
    serde_json::from_str(&kube.kubectl_ok(&a)).unwrap()
}

/// `kubectl auth can-i` as `who` (impersonated with the admin's token).
fn can_i(kube: &KubeCluster, who: &str, args: &[&str]) -> bool {
    let mut a = vec!["auth", "can-i"];
    a.extend(args);
    a.extend(["--as", who]);
    let out = kube.kubectl(&a);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl {}: {answer} {}",
        a.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

fn sa(ns: &str, name: &str) -> String {
    format!("system:serviceaccount:{ns}:{name}")
}

/// Asserts every `(args, allowed)` for `who`, reporting all mismatches at once.
fn assert_rbac(kube: &KubeCluster, who: &str, cases: &[(&[&str], bool)]) {
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(args, allowed)| can_i(kube, who, args) != *allowed)
        .map(|(args, allowed)| {
            format!(
                "{who} {} {}",
                if *allowed { "can't" } else { "can" },
                args.join(" ")
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "RBAC is not as intended:\n{}",
        wrong.join("\n")
    );
}

/// A kubeconfig that authenticates as service account `ns/name` with the token the
/// controller manager minted for it (1.20: a `kubernetes.io/service-account-token` Secret), as
/// a pod running under that account would.
fn service_account_kubeconfig(
    kube: &KubeCluster,
    scratch: &Scratch,
    ns: &str,
    name: &str,
) -> PathBuf {
    let t = Instant::now();
    let secret = loop {
        let out = kube.kubectl(&[
            "get",
            "serviceaccount",
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.secrets[0].name}",
        ]);
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !s.is_empty() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no token Secret for service account {ns}/{name}\n{}",
            kube.logs_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let s: Secret = serde_json::from_value(get_json(kube, &["secret", &secret, "-n", ns])).unwrap();
    let token = String::from_utf8(s.data.unwrap()["token"].0.clone()).unwrap();
    let path = scratch.path(&format!("{name}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\n    \
             namespace: {ns}\ncurrent-context: test\n",
            kube.server(),
            kube.ca_path().display()
        ),
    )
    .unwrap();
    path
}

/// The one container of a Deployment the chart rendered, as the API server stored it.
fn container(kube: &KubeCluster, deployment: &str) -> Value {
    let d = get_json(kube, &["deployment", deployment, "-n", NS]);
    let containers = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "{d}");
    containers[0].clone()
}

fn args_of(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// Replaces the value after `flag` (so that the process listens on a free loopback port
/// instead of the pod's port).
fn replace_value(args: &mut [String], flag: &str, value: &str) {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1] = value.to_string();
}

/// The container's environment as its pod would see it: plain values, and the pod's name for
/// `fieldRef: metadata.name`.
fn env_of(c: &Value, pod_name: &str) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for e in c["env"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let name = e["name"].as_str().unwrap().to_string();
        if let Some(v) = e["value"].as_str() {
            env.push((name, v.to_string()));
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            env.push((name, pod_name.to_string()));
        } else {
            panic!("an env var this test can't provide: {e}");
        }
    }
    env
}

fn probe_path(c: &Value, probe: &str) -> String {
    c[probe]["httpGet"]["path"].as_str().unwrap().to_string()
}

/// The YAML between `<<'YAML'` and `YAML` in the install notes, unindented.
fn notes_example(notes: &str) -> String {
    let mut lines = notes.lines().skip_while(|l| !l.ends_with("<<'YAML'"));
    assert!(lines.next().is_some(), "no example in the notes:\n{notes}");
    let yaml: Vec<&str> = lines
        .take_while(|l| l.trim() != "YAML")
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect();
    assert!(!yaml.is_empty(), "empty example in the notes:\n{notes}");
    yaml.join("\n") + "\n"
}

/// A binary run as its pod would run it; killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(
        bin: &str,
        args: &[String],
        env: &[(String, String)],
        kubeconfig: &Path,
        log: PathBuf,
    ) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        Self { child, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 40 lines of its log, for failure messages.
    fn tail(&self) -> String {
        let log = self.logs();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get_status(url: &str) -> Option<u16> {
    reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Waits until `url` answers 200.
async fn wait_ok(url: &str, limit: Duration, logs: impl Fn() -> String) {
    let t = Instant::now();
    while get_status(url).await != Some(200) {
        assert!(
            t.elapsed() < limit,
            "{url} not 200 within {limit:?}; log:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` until it gives `Some`.
fn wait_for<T>(
    what: &str,
    limit: Duration,
    logs: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < limit,
            "{what}: not within {limit:?}; operator log:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn chart_lints_and_rejects_an_unknown_mode() {
    let scratch = Scratch::new();
    let helm = Helm {
        bin: helm_bin(),
        scratch: &scratch,
        kubeconfig: scratch.path("no-cluster"),
    };
    let chart = chart_dir();
    for set in [
        &[][..],
        &["--set", "mode=cluster"],
        &[
            "--set",
            "mode=cluster",
            "--set",
            "redis.url=redis://redis:6379/0",
            "--set",
            "operator.watchNamespace=team-a",
        ],
    ] {
        let mut args = vec!["lint", "--strict", &chart];
        args.extend(set);
        let out = helm.ok(&args);
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
    let out = helm.run(&["template", RELEASE, &chart, "--set", "mode=clustr"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"mode must be "standalone" or "cluster", not "clustr""#),
        "{err}"
    );
}

#[tokio::test]
async fn chart_installs_in_both_modes_with_rbac_that_suffices() {
    let helm_bin = helm_bin();
    let dataplane = workspace_bin("tollgate-dataplane");
    assert!(
        dataplane.exists(),
        "{} is missing: build it first (cargo build -p tollgate-dataplane)",
        dataplane.display()
    );
    let dataplane = dataplane.display().to_string();
    let kube = KubeCluster::start();
    let scratch = Scratch::new();
    let helm = Helm {
        bin: helm_bin,
        scratch: &scratch,
        kubeconfig: kube.kubeconfig_path().to_path_buf(),
    };
    for ns in [NS, "team-a", "team-b", "scoped-system"] {
        kube.kubectl_ok(&["create", "namespace", ns]);
    }
    // KServe's API, as far as discovery goes (a schemaless stand-in for its CRD): so that
    // `kubectl auth can-i` can name the resource, and the operator finds and watches it.
    kube.apply_yaml(KSERVE_CRD);
    kube.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/inferenceservices.serving.kserve.io",
    ]);

    // --- Every rendered object of both modes is valid for the API server. ----------------
    let standalone = dry_run(&kube, &helm.template(RELEASE, NS, &[]));
    let mut want = names(&[
        "secret/tollgate-manifests",
        "service/tollgate",
        "deployment.apps/tollgate",
    ]);
    want.extend(names(&CRDS));
    assert_eq!(
        standalone, want,
        "standalone mode renders only the data plane"
    );

    let rendered = helm.template(
        RELEASE,
        NS,
        &[
            "mode=cluster",
            "redis.url=redis://:secret@redis.tollgate-system:6379/0",
        ],
    );
    // Both containers get the URL, from the Secret (never as a plain value).
    assert_eq!(
        rendered.matches("- name: TOLLGATE_REDIS_URL\n").count(),
        2,
        "{rendered}"
    );
    assert!(!rendered.contains("redis://"), "{rendered}");
    let cluster = dry_run(&kube, &rendered);
    let mut want = names(&[
        "serviceaccount/tollgate-dataplane",
        "serviceaccount/tollgate-operator",
        "secret/tollgate-redis",
        "clusterrole.rbac.authorization.k8s.io/tollgate-operator",
        "clusterrolebinding.rbac.authorization.k8s.io/tollgate-operator",
        "role.rbac.authorization.k8s.io/tollgate-operator",
        "rolebinding.rbac.authorization.k8s.io/tollgate-operator",
        "role.rbac.authorization.k8s.io/tollgate-dataplane",
        "rolebinding.rbac.authorization.k8s.io/tollgate-dataplane",
        "service/tollgate",
        "deployment.apps/tollgate",
        "deployment.apps/tollgate-operator",
    ]);
    want.extend(names(&CRDS));
    assert_eq!(
        cluster, want,
        "cluster mode: the operator, RBAC, no manifests Secret"
    );

    // --- A real `helm install` (standalone, the default), then the upgrade to cluster mode. --
    let chart = chart_dir();
    let notes = helm.ok(&["install", RELEASE, &chart, "-n", NS]);
    assert!(notes.contains("(standalone mode)"), "{notes}");
    // Helm installed the CRDs from crds/ before the templates.
    kube.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/llmmodels.tollgate.dev",
        "crd/virtualkeys.tollgate.dev",
        "crd/routepolicies.tollgate.dev",
    ]);
    let args = args_of(&container(&kube, RELEASE));
    assert!(args.contains(&"--manifests".to_string()), "{args:?}");
    // After SIGTERM: 5 s still accepting, then the grace period (60 s) less those 5 s and 5 s
    // for the flush after in-flight requests.
    for (flag, value) in [("--shutdown-delay", "5s"), ("--shutdown-timeout", "50s")] {
        assert!(
            args.windows(2).any(|w| w[0] == flag && w[1] == value),
            "{flag} {value} not in {args:?}"
        );
    }
    // The data plane's selector is the same in both modes, so the upgrade changes the
    // Deployment in place (a selector change would make Helm fail here).
    let notes = helm.ok(&[
        "upgrade",
        RELEASE,
        &chart,
        "-n",
        NS,
        "--set",
        "mode=cluster",
    ]);
    assert!(notes.contains("in cluster mode"), "{notes}");
    // The model and key the install notes tell users to create, applied below as they say.
    let example = notes_example(&notes);
    let dp = container(&kube, RELEASE);
    let mut dp_args = args_of(&dp);
    assert!(
        dp_args.starts_with(&[
            "--kubernetes".into(),
            "--config-namespace".into(),
            NS.into(),
        ]),
        "{dp_args:?}"
    );
    let gone = kube.kubectl(&["get", "secret", "tollgate-manifests", "-n", NS]);
    assert!(!gone.status.success(), "the manifests Secret is left over");
    let op = container(&kube, "tollgate-operator");
    let operator = get_json(&kube, &["deployment", "tollgate-operator", "-n", NS]);
    assert_eq!(operator["spec"]["replicas"], 2);
    let sc = &op["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(sc["runAsNonRoot"], true, "{sc}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{sc}");

    // --- RBAC, verb by verb. ---------------------------------------------------------------
    let operator_sa = sa(NS, "tollgate-operator");
    assert_rbac(
        &kube,
        &operator_sa,
        &[
            (
                &["watch", "llmmodels.tollgate.dev", "--all-namespaces"],
                true,
            ),
            (
                &["list", "virtualkeys.tollgate.dev", "--all-namespaces"],
                true,
            ),
            (
                &["watch", "routepolicies.tollgate.dev", "-n", "team-a"],
                true,
            ),
            (
                &[
                    "patch",
                    "virtualkeys.tollgate.dev",
                    "--subresource=status",
                    "-n",
                    "team-a",
                ],
                true,
            ),
            (
                &[
                    "update",
                    "llmmodels.tollgate.dev",
                    "--subresource=status",
                    "-n",
                    "team-b",
                ],
                true,
            ),
            (
                &[
                    "patch",
                    "routepolicies.tollgate.dev",
                    "--subresource=status",
                    "-n",
                    "team-a",
                ],
                true,
            ),
            // The spec is the user's.
            (&["update", "llmmodels.tollgate.dev", "-n", "team-a"], false),
            (
                &["delete", "virtualkeys.tollgate.dev", "-n", "team-a"],
                false,
            ),
            // Secrets: read and watch anywhere, create (generated keys) anywhere...
            (&["watch", "secrets", "--all-namespaces"], true),
            (&["get", "secrets", "-n", "team-a"], true),
            (&["create", "secrets", "-n", "team-a"], true),
            // ...but change or delete them only in its own namespace (the published config).
            (&["update", "secrets", "-n", "team-a"], false),
            (&["patch", "secrets", "-n", "team-a"], false),
            (&["delete", "secrets", "-n", "team-a"], false),
            (&["patch", "secrets", "-n", NS], true),
            (&["delete", "secrets", "-n", NS], true),
            // The leader-election Lease in its own namespace only.
            (&["get", "leases.coordination.k8s.io", "-n", NS], true),
            (&["create", "leases.coordination.k8s.io", "-n", NS], true),
            (&["update", "leases.coordination.k8s.io", "-n", NS], true),
            (
                &["update", "leases.coordination.k8s.io", "-n", "team-a"],
                false,
            ),
            (&["create", "events.events.k8s.io", "-n", "team-a"], true),
            (&["patch", "events", "-n", "team-b"], true),
            (&["watch", "services", "--all-namespaces"], true),
            (
                &[
                    "watch",
                    "endpointslices.discovery.k8s.io",
                    "--all-namespaces",
                ],
                true,
            ),
            (
                &[
                    "list",
                    "inferenceservices.serving.kserve.io",
                    "-n",
                    "team-a",
                ],
                true,
            ),
            (&["list", "pods", "-n", "team-a"], false),
            (&["create", "deployments.apps", "-n", NS], false),
        ],
    );
    let dataplane_sa = sa(NS, "tollgate-dataplane");
    assert_rbac(
        &kube,
        &dataplane_sa,
        &[
            (&["list", "secrets", "-n", NS], true),
            (&["watch", "secrets", "-n", NS], true),
            (&["get", "secrets", "-n", NS], true),
            (&["list", "secrets", "-n", "team-a"], false),
            (&["get", "secrets", "-n", "team-a"], false),
            (&["list", "secrets", "--all-namespaces"], false),
            (&["create", "secrets", "-n", NS], false),
            (&["update", "secrets", "-n", NS], false),
            (
                &["list", "llmmodels.tollgate.dev", "--all-namespaces"],
                false,
            ),
            (&["update", "leases.coordination.k8s.io", "-n", NS], false),
        ],
    );

    // --- operator.watchNamespace: the ClusterRole bound in that namespace only. ------------
    let scoped = helm.template(
        "scoped",
        "scoped-system",
        &["mode=cluster", "operator.watchNamespace=team-a"],
    );
    kube.apply_yaml(&scoped);
    let scoped_sa = sa("scoped-system", "scoped-tollgate-operator");
    assert_rbac(
        &kube,
        &scoped_sa,
        &[
            (&["watch", "llmmodels.tollgate.dev", "-n", "team-a"], true),
            (&["create", "secrets", "-n", "team-a"], true),
            (&["watch", "llmmodels.tollgate.dev", "-n", "team-b"], false),
            (&["list", "secrets", "-n", "team-b"], false),
            (
                &["watch", "llmmodels.tollgate.dev", "--all-namespaces"],
                false,
            ),
            (
                &[
                    "update",
                    "leases.coordination.k8s.io",
                    "-n",
                    "scoped-system",
                ],
                true,
            ),
            (&["create", "secrets", "-n", "scoped-system"], true),
        ],
    );

    // --- The real binaries, run as the chart runs them. -----------------------------------
    // Flags and environment from the Deployments the API server stored, the token of the
    // chart's service accounts; only the listening ports move to free loopback ones.
    let pod_name = "tollgate-operator-5c7d9-x2x7q";
    let op_kubeconfig = service_account_kubeconfig(&kube, &scratch, NS, "tollgate-operator");
    let mut op_args = args_of(&op);
    let metrics = format!("127.0.0.1:{}", closed_port());
    replace_value(&mut op_args, "--metrics-addr", &metrics);
    let operator = Proc::start(
        OPERATOR,
        &op_args,
        &env_of(&op, pod_name),
        &op_kubeconfig,
        scratch.path("operator.log"),
    );
    let op_logs = || operator.tail();
    // Its probes, as the kubelet would call them: ready once every watch has synced, which
    // needs list and watch on everything it reads.
    for probe in ["livenessProbe", "readinessProbe"] {
        let url = format!("http://{metrics}{}", probe_path(&op, probe));
        wait_ok(&url, Duration::from_secs(60), op_logs).await;
    }

    let out = kube.kubectl_stdin(&["apply", "-n", "team-a", "-f", "-"], &example);
    assert!(
        out.status.success(),
        "the notes' example doesn't apply: {}\n{example}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A generated key Secret in the user's namespace (create there)...
    let key = wait_for(
        "the generated key Secret",
        Duration::from_secs(60),
        op_logs,
        || {
            let out = kube.kubectl(&["get", "secret", "app-key", "-n", "team-a", "-o", "json"]);
            let s: Secret = serde_json::from_slice(&out.stdout).ok()?;
            String::from_utf8(s.data?.get("key")?.0.clone()).ok()
        },
    );
    // ...the config published in the release namespace...
    wait_for(
        "the published config",
        Duration::from_secs(60),
        op_logs,
        || {
            kube.kubectl(&["get", "secret", "tollgate-config", "-n", NS])
                .status
                .success()
                .then_some(())
        },
    );
    // ...the Lease held under the pod's name (POD_NAME from the downward API)...
    let lease = get_json(&kube, &["lease", "tollgate-operator", "-n", NS]);
    assert_eq!(lease["spec"]["holderIdentity"], pod_name, "{lease}");
    // ...and status written on the objects.
    for kind in ["virtualkey/app", "llmmodel/demo"] {
        wait_for(
            &format!("{kind} Ready=True"),
            Duration::from_secs(60),
            op_logs,
            || {
                let v = get_json(&kube, &[kind, "-n", "team-a"]);
                v["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    .then_some(())
            },
        );
    }

    let dp_kubeconfig = service_account_kubeconfig(&kube, &scratch, NS, "tollgate-dataplane");
    let listen = format!("127.0.0.1:{}", closed_port());
    replace_value(&mut dp_args, "--listen", &listen);
    let gateway = Proc::start(
        &dataplane,
        &dp_args,
        &env_of(&dp, "tollgate-6b8f4-p9q2w"),
        &dp_kubeconfig,
        scratch.path("dataplane.log"),
    );
    let dp_logs = || gateway.tail();
    for probe in ["livenessProbe", "readinessProbe"] {
        let url = format!("http://{listen}{}", probe_path(&dp, probe));
        wait_ok(&url, Duration::from_secs(60), dp_logs).await;
    }
    let t = Instant::now();
    let reply = loop {
        let r = reqwest::Client::new()
            .post(format!("http://{listen}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if status == 200 {
            break body;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not served: {status} {body}\ndata plane log:\n{}",
            gateway.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The mock provider's default reply.
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "Hello from Tollgate's mock model!"
    );

    // Nothing either of them did was refused.
    for (name, log) in [
        ("operator", operator.logs()),
        ("data plane", gateway.logs()),
    ] {
        let refused: Vec<&str> = log
            .lines()
            .filter(|l| l.to_lowercase().contains("forbidden"))
            .take(5)
            .collect();
        assert!(
            refused.is_empty(),
            "the {name} was refused something:\n{}",
            refused.join("\n")
        );
    }
}
