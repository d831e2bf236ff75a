//! Publishing a config as Secrets (see [`tollgate_crds::publish`] for the format): shards
//! first (content-addressed, so never rewritten), the head last, old shards deleted after.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;
use tollgate_crds::publish::{HEAD_HASH, HEAD_SHARDS, LABEL, Published, SHARD_DATA, shard_name};

const MANAGER: &str = "tollgate-operator";

fn secret(name: &str, role: &str, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([
                (LABEL.to_string(), role.to_string()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    MANAGER.to_string(),
                ),
            ])),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The hash of the config currently published under `name`, if any.
pub async fn current_hash(client: &Client, ns: &str, name: &str) -> kube::Result<Option<String>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    Ok(api.get_opt(name).await?.and_then(|s| {
        let v = s.data?.remove(HEAD_HASH)?;
        String::from_utf8(v.0).ok()
    }))
}

/// Publishes `p` under `name` in `ns`.
pub async fn publish(client: &Client, ns: &str, name: &str, p: &Published) -> kube::Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (i, shard) in p.shards.iter().enumerate() {
        let s = secret(
            &shard_name(name, &p.hash, i),
            "shard",
            BTreeMap::from([(SHARD_DATA.to_string(), ByteString(shard.clone()))]),
        );
        match api.create(&PostParams::default(), &s).await {
            Ok(_) => {}
            // Content-addressed: one that exists already holds these bytes.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let head = secret(
        name,
        "head",
        BTreeMap::from([
            (
                HEAD_HASH.to_string(),
                ByteString(p.hash.clone().into_bytes()),
            ),
            (
                HEAD_SHARDS.to_string(),
                ByteString(p.shards.len().to_string().into_bytes()),
            ),
        ]),
    );
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&head),
    )
    .await?;
    // Shards of older configs: nobody reads them once the head moved on.
    let keep = format!("{name}-{}-", p.hash);
    let prefix = format!("{name}-");
    let shards = api
        .list(&ListParams::default().labels(&format!("{LABEL}=shard")))
        .await?;
    for s in shards {
        let n = s.metadata.name.unwrap_or_default();
        if n.starts_with(&prefix) && !n.starts_with(&keep) {
            let _ = api.delete(&n, &DeleteParams::default()).await;
        }
    }
    Ok(())
}
