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
use std::fmt::Write as _;
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
/// The Helm 4 version `scripts/helm.sh 4` installs.
const HELM4_VERSION: &str = "4.2.3";
/// The test API server's version: what `helm template` renders for (PodDisruptionBudget and
/// HorizontalPodAutoscaler versions depend on it).
const KUBE_VERSION: &str = "1.20.2";

fn chart_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/tollgate")
        .display()
        .to_string()
}

/// `$ENV` if set, else `bin/helm` in `scripts/helm.sh`'s cache for `version` (`$CACHE_ENV`,
/// else `~/.cache/tollgate/helm-VERSION`), whether or not it is there.
fn helm_from(env: &str, cache_env: &str, version: &str) -> (PathBuf, bool) {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return (PathBuf::from(p), true);
    }
    let cache = std::env::var_os(cache_env)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(format!(".cache/tollgate/helm-{version}"))
        })
        .join("bin/helm");
    let there = cache.is_file();
    (cache, there)
}

/// `$TOLLGATE_HELM`, else the binary `scripts/helm.sh` caches, else `helm` from the PATH.
fn helm_bin() -> PathBuf {
    let (helm, there) = helm_from("TOLLGATE_HELM", "TOLLGATE_HELM_CACHE", HELM_VERSION);
    if there {
        return helm;
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

/// Helm 4 (`scripts/helm.sh 4`): `$TOLLGATE_HELM4`, else its cache.
fn helm4_bin() -> PathBuf {
    let (helm, there) = helm_from("TOLLGATE_HELM4", "TOLLGATE_HELM4_CACHE", HELM4_VERSION);
    assert!(
        there,
        "no helm 4: run scripts/helm.sh 4, or point TOLLGATE_HELM4 at a helm 4 binary"
    );
    helm
}

/// `kubernetes-validate` (PyPI): `$TOLLGATE_KUBERNETES_VALIDATE`, else the repo's `.venv`
/// (scripts/test.sh installs it there).
fn kubernetes_validate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_KUBERNETES_VALIDATE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/kubernetes-validate");
    assert!(
        venv.is_file(),
        "no kubernetes-validate: run scripts/test.sh (it installs it into .venv), or point \
         TOLLGATE_KUBERNETES_VALIDATE at one"
    );
    venv
}

/// Value sets every check runs on: name, values file.
const VALUE_SETS: &[(&str, &str)] = &[
    ("defaults", "{}\n"),
    (
        "cluster mode, bundled Redis",
        "mode: cluster\nredis: {bundled: {enabled: true}}\nreplicaCount: 3\n",
    ),
    (
        "cluster mode, external Redis from a Secret, one watched namespace",
        "mode: cluster\nredis: {existingSecret: my-redis, existingSecretKey: url}\n\
         operator: {watchNamespace: team-a, admin: {existingSecret: tollgate-admin}}\n",
    ),
    (
        "monitoring and network policies",
        "mode: cluster\nredis: {url: \"redis://redis:6379/0\"}\n\
         metrics: {serviceMonitor: {enabled: true, labels: {release: prometheus}}, prometheusRule: {enabled: true}}\n\
         networkPolicy:\n  enabled: true\n  restrictEgress: true\n\
         \x20 ingressFrom: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ingress-nginx}}}]\n\
         \x20 metricsFrom: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]\n\
         \x20 extraEgress: [{ports: [{port: 443, protocol: TCP}]}]\n",
    ),
    (
        "autoscaling on CPU and on requests in flight",
        "redis: {url: \"redis://redis:6379/0\"}\nautoscaling:\n  enabled: true\n  maxReplicas: 20\n\
         \x20 metrics:\n    - type: Pods\n      pods:\n        metric: {name: tollgate_in_flight_requests}\n\
         \x20       target: {type: AverageValue, averageValue: \"32\"}\n\
         podDisruptionBudget: {minAvailable: 1}\n",
    ),
];

/// The values files of [`VALUE_SETS`], written into `scratch`.
fn value_files(scratch: &Scratch) -> Vec<(&'static str, String)> {
    VALUE_SETS
        .iter()
        .enumerate()
        .map(|(i, (name, yaml))| {
            let path = scratch.path(&format!("values-{i}.yaml"));
            std::fs::write(&path, yaml).unwrap();
            (*name, path.display().to_string())
        })
        .collect()
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
        let mut args = vec![
            "template",
            release,
            &chart,
            "-n",
            ns,
            "--include-crds",
            "--kube-version",
            KUBE_VERSION,
        ];
        for s in set {
            args.extend(["--set", s]);
        }
        self.ok(&args)
    }

    /// `helm template` with a values file, for Kubernetes `kube_version`.
    fn template_values(&self, release: &str, ns: &str, values: &str, kube_version: &str) -> String {
        let chart = chart_dir();
        self.ok(&[
            "template",
            release,
            &chart,
            "-n",
            ns,
            "-f",
            values,
            "--kube-version",
            kube_version,
        ])
    }
}

/// Copies a directory tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Every object of release `release` (its manifest, as Helm recorded it) exists in the API
/// server.
fn assert_release_objects_exist(kube: &KubeCluster, helm: &Helm, release: &str, ns: &str) {
    let manifest = helm.ok(&["get", "manifest", release, "-n", ns]);
    let out = kube.kubectl_stdin(&["get", "-n", ns, "-o", "name", "-f", "-"], &manifest);
    assert!(
        out.status.success(),
        "objects of release {release} missing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(
        found,
        manifest.matches("\nkind: ").count(),
        "release {release}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
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

/// Stand-ins for the Prometheus Operator's CRDs (schemaless: their real schemas are not in any
/// registry this test can reach), so that the API server takes the ServiceMonitor and
/// PrometheusRule the chart renders. kubernetes-validate can't check them either (no schema);
/// their fields are those of the Prometheus Operator's `monitoring.coreos.com/v1`.
const PROMETHEUS_CRDS: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PrometheusRule, listKind: PrometheusRuleList, plural: prometheusrules, singular: prometheusrule}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
";

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
fn chart_lints_with_helm_3_and_4_and_its_schema_refuses_typos() {
    let scratch = Scratch::new();
    let chart = chart_dir();
    let files = value_files(&scratch);
    for bin in [helm_bin(), helm4_bin()] {
        let helm = Helm {
            bin,
            scratch: &scratch,
            kubeconfig: scratch.path("no-cluster"),
        };
        let version = helm.ok(&["version", "--short"]);
        for (name, values) in &files {
            let out = helm.run(&["lint", "--strict", &chart, "-f", values]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("0 chart(s) failed"),
                "helm {version} lint --strict, {name}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // values.schema.json: a typo in the values fails the render, naming the key.
        // (Helm 3 and 4 word it differently: both name the key.)
        for (set, says) in [
            ("replicaCont=2", &["replicaCont", "not allowed"][..]),
            ("mode=clustr", &["mode", "standalone"]),
            ("redis.bundled.enabeld=true", &["enabeld", "not allowed"]),
            ("autoscaling.maxReplicas=lots", &["maxReplicas"]),
        ] {
            let out = helm.run(&["template", RELEASE, &chart, "--set", set]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "helm {version}: --set {set} rendered"
            );
            assert!(
                err.contains("schema") && says.iter().all(|s| err.contains(s)),
                "helm {version}: --set {set}: {err}"
            );
        }
        // And what the schema can't say, the templates do.
        let out = helm.run(&[
            "template",
            RELEASE,
            &chart,
            "--set",
            "autoscaling.enabled=true,autoscaling.targetCPUUtilizationPercentage=0",
        ]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("autoscaling.enabled needs a metric"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every value set, rendered for the oldest and the newest Kubernetes that
/// kubernetes-validate has schemas for, is valid under `kubernetes-validate --strict`
/// (unknown fields refused). Only the Prometheus Operator's kinds have no schema there.
#[test]
fn rendered_manifests_pass_kubernetes_validate_strict() {
    let scratch = Scratch::new();
    let helm = Helm {
        bin: helm_bin(),
        scratch: &scratch,
        kubeconfig: scratch.path("no-cluster"),
    };
    let validate = kubernetes_validate_bin();
    for (name, values) in value_files(&scratch) {
        for kube in ["1.25.0", "1.37.0"] {
            let yaml = helm.template_values(RELEASE, NS, &values, kube);
            let file = scratch.path("rendered.yaml");
            std::fs::write(&file, &yaml).unwrap();
            let out = Command::new(&validate)
                .args(["--strict", "-k", kube])
                .arg(&file)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "kubernetes-validate --strict -k {kube}, {name}:\n{text}"
            );
            let objects = yaml.matches("\nkind: ").count();
            let passed = text.matches(" passed for resource ").count();
            let unknown: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("Couldn't find schema"))
                .collect();
            assert!(
                unknown
                    .iter()
                    .all(|l| l.contains("kind ServiceMonitor") || l.contains("kind PrometheusRule")),
                "{name}: {unknown:?}"
            );
            assert_eq!(
                passed + unknown.len(),
                objects,
                "{name}, {kube}: not every object was validated\n{text}"
            );
        }
    }
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
    kube.apply_yaml(PROMETHEUS_CRDS);
    kube.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/inferenceservices.serving.kserve.io",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    ]);

    // --- Every rendered object of both modes is valid for the API server. ----------------
    let standalone = dry_run(&kube, &helm.template(RELEASE, NS, &[]));
    let mut want = names(&[
        "secret/tollgate-manifests",
        "service/tollgate",
        "deployment.apps/tollgate",
        "poddisruptionbudget.policy/tollgate",
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
        "poddisruptionbudget.policy/tollgate",
        "poddisruptionbudget.policy/tollgate-operator",
    ]);
    want.extend(names(&CRDS));
    assert_eq!(
        cluster, want,
        "cluster mode: the operator, RBAC, no manifests Secret"
    );
    // Every value set is valid for this (1.20) API server too: PodDisruptionBudgets and
    // HorizontalPodAutoscalers in the versions it serves.
    for (i, (name, values)) in value_files(&scratch).iter().enumerate() {
        let ns = format!("values-{i}");
        kube.kubectl_ok(&["create", "namespace", &ns]);
        let yaml = helm.template_values(RELEASE, &ns, values, KUBE_VERSION);
        let accepted = dry_run(&kube, &yaml);
        assert!(
            accepted.len() >= 7,
            "{name}: the server accepted only {accepted:?}"
        );
    }

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
    assert_release_objects_exist(&kube, &helm, RELEASE, NS);

    // --- A CRD change reaches the cluster with `helm upgrade` (Helm never upgrades crds/). --
    let changed = scratch.path("chart-next");
    copy_dir(Path::new(&chart), &changed);
    let crd_file = changed.join("files/crds/llmmodels.tollgate.dev.yaml");
    let crd = std::fs::read_to_string(&crd_file).unwrap();
    assert!(crd.contains("    categories:\n    - tollgate\n"), "{crd}");
    std::fs::write(
        &crd_file,
        crd.replace(
            "    categories:\n    - tollgate\n",
            "    categories:\n    - tollgate\n    - tollgate-next\n",
        ),
    )
    .unwrap();
    let categories = || {
        kube.kubectl_ok(&[
            "get",
            "crd",
            "llmmodels.tollgate.dev",
            "-o",
            "jsonpath={.spec.names.categories}",
        ])
    };
    assert!(!categories().contains("tollgate-next"));
    let changed = changed.display().to_string();
    helm.ok(&[
        "upgrade",
        RELEASE,
        &changed,
        "-n",
        NS,
        "--set",
        "mode=cluster",
    ]);
    assert!(categories().contains("tollgate-next"), "{}", categories());
    helm.ok(&[
        "upgrade",
        RELEASE,
        &chart,
        "-n",
        NS,
        "--set",
        "mode=cluster",
    ]);
    assert!(!categories().contains("tollgate-next"), "{}", categories());
    // The CRDs carry the keep policy and Argo CD's early sync wave.
    let crd = get_json(&kube, &["crd", "llmmodels.tollgate.dev"]);
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "{}",
        crd["metadata"]
    );
    assert_eq!(
        crd["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"], "-10",
        "{}",
        crd["metadata"]
    );

    // --- Real installs of the fuller value sets, beside the first release (which owns the
    // CRDs: the others set crds.install=false). ---------------------------------------------
    for (i, release) in [(1, "bundled"), (3, "monitored"), (4, "scaled")] {
        let ns = format!("{release}-system");
        let values = scratch
            .path(&format!("values-{i}.yaml"))
            .display()
            .to_string();
        helm.ok(&[
            "install",
            release,
            &chart,
            "-n",
            &ns,
            "--create-namespace",
            "-f",
            &values,
            "--set",
            "crds.install=false",
        ]);
        assert_release_objects_exist(&kube, &helm, release, &ns);
    }
    let redis = get_json(
        &kube,
        &[
            "statefulset",
            "bundled-tollgate-redis",
            "-n",
            "bundled-system",
        ],
    );
    let args = redis["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains(r#""--appendonly","yes""#), "{args}");
    assert_eq!(
        redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    let hpa = get_json(&kube, &["hpa", "scaled-tollgate", "-n", "scaled-system"]);
    assert_eq!(hpa["spec"]["maxReplicas"], 20, "{hpa}");
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
        &[
            "mode=cluster",
            "operator.watchNamespace=team-a",
            "crds.install=false",
        ],
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

    // --- examples/kubernetes, applied as they are, reconciled by this operator. ------------
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes");
    kube.kubectl_ok(&["create", "namespace", "examples"]);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let file_names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        file_names,
        [
            "anthropic.yaml",
            "keys.yaml",
            "kserve.yaml",
            "mock.yaml",
            "openai.yaml",
            "routepolicy.yaml",
            "vllm.yaml"
        ]
    );
    // Each file on its own, as the README says (`kubectl apply -n team-a -f <file>`): the
    // server validates every object against the CRDs' schemas. anthropic.yaml applies too (the
    // schema has the provider); the operator reports it not served, below.
    for f in &files {
        let f = f.display().to_string();
        kube.kubectl_ok(&["apply", "-n", "examples", "-f", &f]);
    }
    let condition = |kind: &str, name: &str, t: &str| -> Option<(String, String)> {
        let v = get_json(&kube, &[kind, name, "-n", "examples"]);
        let c = v["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == t)?
            .clone();
        Some((
            c["status"].as_str()?.to_string(),
            c["message"].as_str().unwrap_or_default().to_string(),
        ))
    };
    let wait_condition = |kind: &str, name: &str, t: &str, status: &str| -> String {
        wait_for(
            &format!("{kind}/{name} {t}={status}"),
            Duration::from_secs(60),
            op_logs,
            || {
                condition(kind, name, t)
                    .filter(|(s, _)| s == status)
                    .map(|(_, m)| m)
            },
        )
    };
    for model in ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "demo"] {
        wait_condition("llmmodel", model, "Ready", "True");
    }
    for key in ["chat-app", "batch-jobs", "contractor", "demo"] {
        wait_condition("virtualkey", key, "Ready", "True");
    }
    wait_condition("routepolicy", "gpt-4o", "Accepted", "True");
    // The Anthropic example needs a provider this version doesn't have: said on the object.
    let why = wait_condition("llmmodel", "claude-sonnet", "Ready", "False");
    assert!(why.contains("anthropic"), "{why}");
    // The operator wrote status only: every example object is still at its first generation.
    for kind in ["llmmodels", "virtualkeys", "routepolicies"] {
        let list = get_json(&kube, &[kind, "-n", "examples"]);
        for o in list["items"].as_array().unwrap() {
            assert_eq!(o["metadata"]["generation"], 1, "{}", o["metadata"]);
            assert!(
                o["status"]["observedGeneration"].is_number(),
                "{}",
                o["status"]
            );
        }
    }
    // The mock example serves a request with its generated key.
    let demo_key = wait_for(
        "the demo key Secret",
        Duration::from_secs(60),
        op_logs,
        || {
            let out = kube.kubectl(&["get", "secret", "demo-key", "-n", "examples", "-o", "json"]);
            let s: Secret = serde_json::from_slice(&out.stdout).ok()?;
            String::from_utf8(s.data?.get("key")?.0.clone()).ok()
        },
    );
    let t = Instant::now();
    loop {
        let r = reqwest::Client::new()
            .post(format!("http://{listen}/v1/chat/completions"))
            .bearer_auth(&demo_key)
            .json(&json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the mock example's key is not served: {}\n{}",
            r.status(),
            gateway.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `# --` comment above each key of values.yaml, by dotted path (comment lines that
/// follow the first, up to the key, continue it).
fn values_comments(values: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut pending: Option<String> = None;
    for line in values.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(text) = trimmed.strip_prefix("# --") {
            pending = Some(text.trim().to_string());
            continue;
        }
        if let Some(text) = trimmed.strip_prefix('#') {
            if let Some(p) = pending.as_mut() {
                p.push(' ');
                p.push_str(text.trim());
            }
            continue;
        }
        let Some((key, _)) = trimmed.split_once(':') else {
            continue;
        };
        if trimmed.starts_with('-') || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_string()));
        if let Some(text) = pending.take() {
            let path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
            out.push((path.join("."), text));
        }
    }
    out
}

/// The documented leaves of the values: objects whose keys have no comments of their own
/// (free Kubernetes objects like `resources`, or probe timings) are one leaf.
fn value_leaves(
    v: &Value,
    schema: &Value,
    comments: &std::collections::BTreeMap<String, String>,
    path: &str,
    out: &mut Vec<(String, Value, Value)>,
) {
    let child = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(o)
            if schema.get("properties").is_some()
                && o.keys().any(|k| {
                    let prefix = format!("{}.", child(k));
                    comments.contains_key(&child(k))
                        || comments.keys().any(|c| c.starts_with(&prefix))
                }) =>
        {
            for (k, x) in o {
                let p = child(k);
                let s = &schema["properties"][k];
                assert!(
                    !s.is_null(),
                    "values.yaml has {p}, values.schema.json doesn't"
                );
                value_leaves(x, s, comments, &p, out);
            }
        }
        _ => out.push((path.to_string(), v.clone(), schema.clone())),
    }
}

/// The values table of charts/tollgate/README.md is generated from values.yaml: every value,
/// its default and its `# --` comment; values.schema.json describes each value with the same
/// comment. `TOLLGATE_BLESS=1` rewrites the table (and fails nothing).
#[test]
fn every_value_is_documented_in_the_schema_and_the_chart_readme() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tollgate");
    let text = std::fs::read_to_string(dir.join("values.yaml")).unwrap();
    let values: Value = serde_yaml::from_str(&text).unwrap();
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("values.schema.json")).unwrap())
            .unwrap();
    let comments: std::collections::BTreeMap<String, String> =
        values_comments(&text).into_iter().collect();
    let mut leaves = Vec::new();
    value_leaves(&values, &schema, &comments, "", &mut leaves);
    let mut table = String::from("| Key | Default | Description |\n| --- | --- | --- |\n");
    let mut undocumented = Vec::new();
    for (path, default, s) in &leaves {
        let Some(comment) = comments.get(path) else {
            undocumented.push(path.clone());
            continue;
        };
        assert_eq!(
            s["description"].as_str(),
            Some(comment.as_str()),
            "values.schema.json's description of {path} is not its comment in values.yaml"
        );
        let default = match default {
            Value::String(s) if s.contains('\n') => "(see values.yaml)".to_string(),
            d => format!("`{}`", serde_json::to_string(d).unwrap()),
        };
        writeln!(
            table,
            "| `{path}` | {} | {} |",
            default.replace('|', "\\|"),
            comment.replace('|', "\\|")
        )
        .unwrap();
    }
    assert!(
        undocumented.is_empty(),
        "values without a `# --` comment: {undocumented:?}"
    );
    let readme_path = dir.join("README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let (begin, end) = ("<!-- values:begin -->\n", "<!-- values:end -->");
    let (head, rest) = readme.split_once(begin).expect("no values:begin marker");
    let (_, tail) = rest.split_once(end).expect("no values:end marker");
    let want = format!("{head}{begin}{table}{end}{tail}");
    if std::env::var_os("TOLLGATE_BLESS").is_some() {
        std::fs::write(&readme_path, &want).unwrap();
    } else {
        assert!(
            readme == want,
            "charts/tollgate/README.md's values table is stale: run \
             TOLLGATE_BLESS=1 cargo nextest run -p tollgate-operator --test chart every_value"
        );
    }
}
