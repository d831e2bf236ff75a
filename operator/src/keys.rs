//! Keys for VirtualKeys that name no Secret: the operator generates one into a Secret named
//! after the VirtualKey and owned by it (deleting the VirtualKey deletes the Secret).

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use std::collections::BTreeMap;
use tollgate_crds::VirtualKey;
use tollgate_crds::compile::{DEFAULT_VIRTUAL_KEY_KEY, generated_key_secret_name};

/// Creates the key Secret of every VirtualKey that has neither `secretRef` nor its generated
/// Secret yet. Returns the Secrets created, so this pass can compile with them.
pub async fn ensure_generated(
    client: &Client,
    keys: &[VirtualKey],
    secrets: &Store<Secret>,
) -> anyhow::Result<Vec<Secret>> {
    let mut created = Vec::new();
    for k in keys.iter().filter(|k| k.spec.secret_ref.is_none()) {
        let ns = k.namespace().unwrap_or_else(|| "default".into());
        let name = generated_key_secret_name(&k.name_any());
        if secrets.get(&ObjectRef::new(&name).within(&ns)).is_some() {
            continue;
        }
        let Some(owner) = k.controller_owner_ref(&()) else {
            continue;
        };
        let s = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                owner_references: Some(vec![owner]),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "tollgate-operator".to_string(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                DEFAULT_VIRTUAL_KEY_KEY.to_string(),
                ByteString(
                    tollgate_crds::admin::new_key()
                        .map_err(|e| anyhow::anyhow!(e.message))?
                        .into_bytes(),
                ),
            )])),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        match api.create(&PostParams::default(), &s).await {
            Ok(s) => {
                tracing::info!(virtual_key = %format!("{ns}/{}", k.name_any()), secret = %name, "generated a key");
                created.push(s);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(created)
}
