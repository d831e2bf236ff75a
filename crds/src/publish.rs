//! How the operator hands a [`GatewayConfig`] to data-plane pods through the Kubernetes API,
//! and how a pod reads it back: the wire format only (no client here).
//!
//! The config is JSON, gzip-compressed, cut into shards of at most [`SHARD_BYTES`], each the
//! data of one `Secret` named `<prefix>-<hash>-<n>` (a `Secret` because the config carries
//! provider credentials). A head `Secret` named `<prefix>` says which config is current: its
//! hash and shard count. The operator writes the shards first and the head last, and deletes
//! old shards after, so a pod that sees a head always finds its shards (or waits for them), and
//! a pod that restarts while the operator is down reads the last good config from the API.
//!
//! Why shards of gzip: Kubernetes objects are limited to about 1 MiB. 10,000 keys and 1,000
//! models are about 2.1 MiB of JSON, 468 KiB gzipped (one shard; measured in docs/scale.md);
//! past about 15,000 keys a second shard is needed. Shards keep any size publishable, and gzip
//! keeps etcd writes and watch traffic small.

use crate::GatewayConfig;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

/// Default name of the head Secret (and prefix of the shards).
pub const DEFAULT_NAME: &str = "tollgate-config";
/// Label on every published Secret; the data plane watches Secrets with it. Values: `head`,
/// `shard`.
pub const LABEL: &str = "tollgate.dev/config";
/// Head data key: the config's hash.
pub const HEAD_HASH: &str = "hash";
/// Head data key: the number of shards.
pub const HEAD_SHARDS: &str = "shards";
/// Shard data key.
pub const SHARD_DATA: &str = "config.json.gz";
/// Largest shard, bytes: well under the API server's 1 MiB object limit, with room for
/// metadata.
pub const SHARD_BYTES: usize = 700 * 1024;
/// Largest config a pod accepts when decompressing (a bound, not an expectation).
const MAX_CONFIG_BYTES: u64 = 512 << 20;

/// A config ready to publish.
#[derive(Clone, Debug)]
pub struct Published {
    /// [`GatewayConfig::content_hash`] of the config.
    pub hash: String,
    /// The gzipped JSON, in order.
    pub shards: Vec<Vec<u8>>,
}

/// Encodes `config` for publication.
pub fn encode(config: &GatewayConfig) -> Published {
    let json = serde_json::to_vec(config).unwrap_or_default();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec can't fail.
    let _ = gz.write_all(&json);
    let zipped = gz.finish().unwrap_or_default();
    Published {
        hash: hash_of(&json),
        shards: zipped.chunks(SHARD_BYTES).map(<[u8]>::to_vec).collect(),
    }
}

/// The hash of a config's JSON (the same as [`GatewayConfig::content_hash`]).
fn hash_of(json: &[u8]) -> String {
    Sha256::digest(json)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The name of shard `n` of the config with `hash`, published under `name`.
pub fn shard_name(name: &str, hash: &str, n: usize) -> String {
    format!("{name}-{hash}-{n}")
}

/// Why a published config could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Shards are missing (not yet visible, or deleted).
    #[error("shard {0} is missing")]
    MissingShard(usize),
    /// Not gzip, or not JSON of a GatewayConfig.
    #[error("the config is corrupt: {0}")]
    Corrupt(String),
    /// The content doesn't match the head's hash.
    #[error("the config's hash is {actual}, the head says {expected}")]
    HashMismatch {
        /// From the head.
        expected: String,
        /// Of the content.
        actual: String,
    },
}

/// Reassembles a config from its shards (in order; `None` for one not found) and checks it
/// against `hash`.
pub fn decode(hash: &str, shards: &[Option<&[u8]>]) -> Result<GatewayConfig, DecodeError> {
    let mut zipped = Vec::new();
    for (i, s) in shards.iter().enumerate() {
        zipped.extend_from_slice(s.ok_or(DecodeError::MissingShard(i))?);
    }
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(zipped.as_slice())
        .take(MAX_CONFIG_BYTES)
        .read_to_end(&mut json)
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let actual = hash_of(&json);
    if actual != hash {
        return Err(DecodeError::HashMismatch {
            expected: hash.to_string(),
            actual,
        });
    }
    serde_json::from_slice(&json).map_err(|e| DecodeError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeyConfig, KeyHash};

    fn big_config(keys: usize) -> GatewayConfig {
        let mut c = GatewayConfig::default();
        for i in 0..keys {
            c.keys.push(KeyConfig {
                id: format!("team-{}/key-{i}", i % 50),
                hash: KeyHash::of(format!("sk-test-{i:08}-abcdefgh")),
                team: Some(format!("team-{}", i % 50)),
                alias: None,
                models: vec!["gpt-4o".into()],
                budget: None,
                limits: Default::default(),
                expires_at: None,
            });
        }
        c
    }

    #[test]
    fn round_trips_through_several_shards() {
        let c = big_config(30_000);
        let p = encode(&c);
        assert_eq!(p.hash, c.content_hash());
        assert!(p.shards.len() >= 2, "{} shards", p.shards.len());
        assert!(p.shards.iter().all(|s| s.len() <= SHARD_BYTES));
        let parts: Vec<_> = p.shards.iter().map(|s| Some(s.as_slice())).collect();
        assert_eq!(decode(&p.hash, &parts).expect("decodes"), c);
    }

    #[test]
    fn a_missing_or_foreign_shard_is_refused() {
        let p = encode(&big_config(10));
        assert!(matches!(
            decode(&p.hash, &[None]),
            Err(DecodeError::MissingShard(0))
        ));
        let other = encode(&big_config(11));
        let parts = [Some(other.shards[0].as_slice())];
        assert!(matches!(
            decode(&p.hash, &parts),
            Err(DecodeError::HashMismatch { .. })
        ));
    }
}
