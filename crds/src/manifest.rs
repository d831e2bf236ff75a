//! Reading manifests: multi-document YAML (or JSON) with the three Tollgate kinds and `v1/Secret`,
//! exactly as `kubectl apply -f` would take them.

use crate::compile::{ObjectError, Objects};
use crate::{GROUP, VERSION};
use serde::de::DeserializeOwned;

/// Parses one file's documents into `objects`. A document that can't be read is reported (with
/// its file, position and the field at fault) and skipped; the others still load.
pub fn parse_into(objects: &mut Objects, text: &str, source: &str) -> Vec<ObjectError> {
    let mut errors = Vec::new();
    let api_version = format!("{GROUP}/{VERSION}");
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let where_ = format!("{source} (document {})", i + 1);
        let fail = |message: String| ObjectError {
            kind: "Manifest",
            object: where_.clone(),
            field: None,
            message,
        };
        let value = match serde_yaml::Value::deserialize_any(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(fail(format!("invalid YAML: {e}")));
                continue;
            }
        };
        let av = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        let result = match (av, kind) {
            (a, "LLMModel") if a == api_version => {
                typed(value, &where_).map(|o| objects.models.push(o))
            }
            (a, "VirtualKey") if a == api_version => {
                typed(value, &where_).map(|o| objects.keys.push(o))
            }
            (a, "RoutePolicy") if a == api_version => {
                typed(value, &where_).map(|o| objects.policies.push(o))
            }
            ("v1", "Secret") => typed(value, &where_).map(|o| objects.secrets.push(o)),
            ("", _) | (_, "") => Err(fail("a manifest needs apiVersion and kind".into())),
            (a, k) => Err(fail(format!(
                "unsupported object {a}/{k}: expected {api_version} LLMModel, VirtualKey or \
                 RoutePolicy, or v1 Secret"
            ))),
        };
        if let Err(e) = result {
            errors.push(e);
        }
    }
    errors
}

trait DeserializeAny {
    fn deserialize_any(
        doc: serde_yaml::Deserializer<'_>,
    ) -> Result<serde_yaml::Value, serde_yaml::Error>;
}

impl DeserializeAny for serde_yaml::Value {
    fn deserialize_any(
        doc: serde_yaml::Deserializer<'_>,
    ) -> Result<serde_yaml::Value, serde_yaml::Error> {
        serde::Deserialize::deserialize(doc)
    }
}

fn typed<T: DeserializeOwned + kube::Resource>(
    value: serde_yaml::Value,
    where_: &str,
) -> Result<T, ObjectError> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .map(str::to_string);
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let obj: T = serde_path_to_error::deserialize(value).map_err(|e| ObjectError {
        kind: "Manifest",
        object: format!("{where_} {kind} {}", name.as_deref().unwrap_or("<unnamed>")),
        field: Some(e.path().to_string()).filter(|p| p != "."),
        message: e.inner().to_string(),
    })?;
    if obj.meta().name.as_deref().unwrap_or("").is_empty() {
        return Err(ObjectError {
            kind: "Manifest",
            object: format!("{where_} {kind}"),
            field: Some("metadata.name".into()),
            message: "is required".into(),
        });
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;

    const QUICKSTART: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: demo}
spec:
  modelName: demo
  provider: mock
  pricing: {inputPerMillion: 1.5, outputPerMillion: 2}
---
apiVersion: v1
kind: Secret
metadata: {name: demo-key}
stringData: {key: sk-tollgate-demo-0123456789}
---
apiVersion: tollgate.dev/v1alpha1
kind: VirtualKey
metadata: {name: demo}
spec:
  secretRef: {name: demo-key}
  models: [demo]
"#;

    #[test]
    fn parses_and_compiles_the_three_kinds() {
        let mut o = Objects::default();
        assert!(parse_into(&mut o, QUICKSTART, "q.yaml").is_empty());
        let (cfg, errors) = compile(&o);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(cfg.models["demo"].deployments[0].pricing.input, 1_500_000);
        assert_eq!(cfg.keys[0].id, "default/demo");
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let mut o = Objects::default();
        let text = "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {name: x}\nspec:\n  modelName: x\n  provider: mock\n  pricing: {inputPerMillion: cheap}\n---\nkind: Foo\napiVersion: v9\n";
        let errors = parse_into(&mut o, text, "m.yaml");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(
            errors[0].field.as_deref(),
            Some("spec.pricing.inputPerMillion")
        );
        assert!(errors[0].object.contains("m.yaml (document 1) LLMModel x"));
        assert!(errors[1].message.contains("unsupported object v9/Foo"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let mut o = Objects::default();
        let text = "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {name: x}\nspec:\n  modelName: x\n  provider: mock\n  modelname: typo\n";
        let errors = parse_into(&mut o, text, "m.yaml");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].message.contains("unknown field `modelname`"),
            "{}",
            errors[0]
        );
    }
}
