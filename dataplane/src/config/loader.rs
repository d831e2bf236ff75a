//! Standalone mode: manifests on disk -> [`GatewayConfig`], and reloading them on change.
//!
//! A path may be a file or a directory (read recursively: `*.yaml`, `*.yml`, `*.json`; hidden
//! entries, such as the `..data` links of a mounted ConfigMap, are skipped). A config with any
//! error never replaces the running one: each error is logged with the object and field at
//! fault, and the old config keeps serving.

use super::Install;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tollgate_crds::manifest::parse_into;
use tollgate_crds::{GatewayConfig, Objects, compile};

/// Where keys made through the admin API are kept: `generated-keys.yaml` in the manifest
/// directory, or beside a single manifest file as `<file>.generated-keys.yaml`. Either way the
/// loader reads it with the manifests.
pub(crate) fn keys_file_for(manifests: &Path) -> PathBuf {
    if manifests.is_dir() {
        manifests.join(GENERATED_KEYS_FILE)
    } else {
        let mut name = manifests.file_name().unwrap_or_default().to_os_string();
        name.push(".");
        name.push(GENERATED_KEYS_FILE);
        manifests.with_file_name(name)
    }
}

/// File name of the admin API's keys.
pub const GENERATED_KEYS_FILE: &str = "generated-keys.yaml";

fn manifest_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        let mut files = vec![path.to_path_buf()];
        let keys = keys_file_for(path);
        if keys.is_file() {
            files.push(keys);
        }
        return Ok(files);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                continue;
            }
            let m = std::fs::metadata(&p)?;
            if m.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads and compiles the manifests at `path`. Any error fails the whole load.
pub(crate) fn load(path: &Path) -> Result<GatewayConfig, Vec<String>> {
    let files =
        manifest_files(path).map_err(|e| vec![format!("reading {}: {e}", path.display())])?;
    if files.is_empty() {
        return Err(vec![format!(
            "no manifests (*.yaml, *.yml, *.json) in {}",
            path.display()
        )]);
    }
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(text) => errors.extend(
                parse_into(&mut objects, &text, &f.display().to_string())
                    .into_iter()
                    .map(|e| e.to_string()),
            ),
            Err(e) => errors.push(format!("reading {}: {e}", f.display())),
        }
    }
    let (config, compile_errors) = compile(&objects);
    errors.extend(compile_errors.into_iter().map(|e| e.to_string()));
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// A cheap fingerprint of the manifests: names, sizes and modification times.
pub(crate) fn fingerprint(path: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Ok(files) = manifest_files(path) {
        for f in files {
            f.hash(&mut h);
            if let Ok(m) = std::fs::metadata(&f) {
                m.len().hash(&mut h);
                m.modified().ok().hash(&mut h);
            }
        }
    }
    h.finish()
}

/// Polls `path` every `interval` and installs the new config when the manifests change and
/// compile cleanly. Polling (rather than inotify) also sees a ConfigMap's atomic symlink swap.
/// `loaded` is the fingerprint taken *before* the running config was read, so an edit made
/// between start-up and this task's first poll is not mistaken for the running config.
pub(crate) async fn watch(
    state: std::sync::Arc<impl Install>,
    path: PathBuf,
    interval: Duration,
    loaded: u64,
) {
    let mut last = loaded;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = path.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&p)).await else {
            continue;
        };
        if now == last {
            continue;
        }
        last = now;
        let p = path.clone();
        let Ok(result) = tokio::task::spawn_blocking(move || load(&p)).await else {
            continue;
        };
        match result
            .map_err(|e| e.join("; "))
            .and_then(|c| state.install(&c).map(|()| c).map_err(|e| e.to_string()))
        {
            Ok(config) => {
                metrics::counter!(crate::telemetry::RELOADS, "result" => "success").increment(1);
                tracing::info!(
                    config_hash = config.content_hash(),
                    models = config.models.len(),
                    keys = config.keys.len(),
                    "reloaded manifests"
                );
            }
            Err(errors) => {
                metrics::counter!(crate::telemetry::RELOADS, "result" => "rejected").increment(1);
                tracing::error!(path = %path.display(), "manifests not reloaded; still serving the previous config: {errors}");
            }
        }
    }
}
