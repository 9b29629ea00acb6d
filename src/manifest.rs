//! `kips inject -f FILE`: manifests as admission would make them.
//!
//! Documents without kips annotations are written back byte for byte; kips documents are
//! re-serialised after the patch. Workloads get both admission steps at once: the annotation
//! copy into the template and the pod injection of the template.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::inject::patch::{PatchOp, to_json_patch};
use crate::inject::{self, InjectConfig, workload};

/// `kips inject -f FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectCommand {
    /// The manifest; `-` is stdin.
    pub file: PathBuf,
    pub inject: InjectConfig,
}

pub fn run(args: &InjectCommand) -> Result<()> {
    let config = &args.inject;
    let input = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let rendered = inject_manifests(&input, config)?;
    for warning in &rendered.warnings {
        eprintln!("warning: {warning}");
    }
    std::io::stdout().write_all(rendered.text.as_bytes())?;
    Ok(())
}

#[derive(Debug)]
pub struct Rendered {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Splits a YAML stream into documents at `---` lines, keeping each document's text.
fn documents(input: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in input.split_inclusive('\n') {
        let is_separator =
            line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
        if is_separator && offset > 0 {
            docs.push(&input[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    docs.push(&input[start..]);
    docs
}

/// Renders every document; fails (writing nothing) if any kips document is invalid.
pub fn inject_manifests(input: &str, config: &InjectConfig) -> Result<Rendered> {
    let mut text = String::with_capacity(input.len() * 2);
    let mut warnings = Vec::new();
    for (index, doc) in documents(input).into_iter().enumerate() {
        let (separator, body) = match doc.split_once('\n') {
            Some((first, rest)) if first.starts_with("---") => (&doc[..first.len() + 1], rest),
            _ => ("", doc),
        };
        let value: Option<Value> = serde_yaml::from_str(body)
            .with_context(|| format!("document {} is not valid YAML", index + 1))?;
        let Some(mut value) = value.filter(|v| !v.is_null()) else {
            text.push_str(doc);
            continue;
        };
        let label = describe(&value, index);
        let before = value.clone();
        inject_object(&mut value, config, &mut warnings, &label)
            .map_err(|e| anyhow!("{label}: {e:#}"))?;
        if value == before {
            text.push_str(doc);
        } else {
            text.push_str(separator);
            text.push_str(&serde_yaml::to_string(&value)?);
        }
    }
    Ok(Rendered { text, warnings })
}

fn describe(value: &Value, index: usize) -> String {
    let kind = value["kind"].as_str().unwrap_or("object");
    match value.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) => format!("document {} ({kind} {name})", index + 1),
        None => format!("document {} ({kind})", index + 1),
    }
}

fn inject_object(
    value: &mut Value,
    config: &InjectConfig,
    warnings: &mut Vec<String>,
    label: &str,
) -> Result<()> {
    let api_version = value["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = value["kind"].as_str().unwrap_or_default().to_owned();
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            // `get_mut`: indexing would add `items: null` to a List without items.
            let items = value.get_mut("items").and_then(Value::as_array_mut);
            for item in items.into_iter().flatten() {
                let item_label = format!("{label} item {}", describe(item, 0));
                inject_object(item, config, warnings, &item_label)?;
            }
        }
        ("v1", "Pod") => {
            let mutation = inject::mutate_pod(&value.to_string(), config, None)?;
            apply(value, &mutation.patch)?;
            warnings.extend(labelled(label, mutation.warnings));
        }
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet") => {
            let mutation = workload::mutate(&value.to_string(), config)?;
            apply(value, &mutation.patch)?;
            warnings.extend(labelled(label, mutation.warnings));
            let name = value
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let Some(template) = value.pointer_mut("/spec/template") else {
                bail!("it has no spec.template");
            };
            let mutation = inject::mutate_pod(&template.to_string(), config, name.as_deref())?;
            apply(template, &mutation.patch)?;
            warnings.extend(labelled(label, mutation.warnings));
        }
        _ => {}
    }
    Ok(())
}

fn labelled(label: &str, warnings: Vec<String>) -> impl Iterator<Item = String> + '_ {
    warnings.into_iter().map(move |w| format!("{label}: {w}"))
}

fn apply(value: &mut Value, patch: &[PatchOp]) -> Result<()> {
    json_patch::patch(value, &to_json_patch(patch)).context("applying kips' patch")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  annotations:
    kips.io/redirect: \"8080\"
spec:
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers:
      - name: app
        image: api:1
        ports: [{containerPort: 8080}]
";

    #[test]
    fn a_list_without_items_passes_through_byte_for_byte() {
        let input = "apiVersion: v1\nkind: List\nmetadata: {}\n";
        let rendered = inject_manifests(input, &InjectConfig::default()).unwrap();
        assert_eq!(rendered.text, input);
    }

    #[test]
    fn documents_split_at_separator_lines_only() {
        let docs = documents("a: 1\n---\nb: '---'\n--- \nc: 3\n");
        assert_eq!(docs, vec!["a: 1\n", "---\nb: '---'\n", "--- \nc: 3\n"]);
    }

    #[test]
    fn non_kips_documents_pass_through_byte_for_byte() {
        let input = "# a comment\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}  # inline\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s\n";
        let rendered = inject_manifests(input, &InjectConfig::default()).unwrap();
        assert_eq!(rendered.text, input);
    }

    #[test]
    fn a_deployment_template_gets_the_sidecar_and_init_container() {
        let input =
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\n---\n{DEPLOYMENT}");
        let rendered = inject_manifests(&input, &InjectConfig::default()).unwrap();
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered.text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        let deployment: k8s_openapi::api::apps::v1::Deployment =
            serde_json::from_value(docs[1].clone()).unwrap();
        let template = deployment.spec.unwrap().template;
        let annotations = template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations["kips.io/redirect"], "8080");
        assert!(annotations.contains_key("kips.io/status"));
        let init: Vec<String> = template
            .spec
            .unwrap()
            .init_containers
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(init, ["kips-init", "kips-bridge"]);
        // The default relay is the workload's name.
        assert!(docs[1].to_string().contains("0.0.0.0:15100/8080:api"));
    }

    #[test]
    fn a_relay_in_both_directions_fails_naming_the_reverse_annotation_and_the_relay() {
        let input = DEPLOYMENT.replace(
            "    kips.io/redirect: \"8080\"\n",
            "    kips.io/redirect: \"8080\"\n    kips.io/reverse: \"api=db:5432\"\n",
        );
        let error = inject_manifests(&input, &InjectConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(
                "document 1 (Deployment api): kips.io/reverse: \"api=db:5432\": relay \"api\""
            ),
            "{error}"
        );
    }

    /// Fuzz finding (target `inject_yaml`, seeded from tests/fixtures/dev/workloads.yaml):
    /// `kips inject` refused its own output for a template annotated in named mode ("no
    /// container declares a port named \"http\""), since it had renamed that port.
    #[test]
    fn its_own_output_is_printed_again_unchanged_in_named_mode() {
        let input = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {kips.io/redirect: http}
    spec:
      containers:
      - name: web
        image: web:1
        ports: [{name: http, containerPort: 3000}]
";
        let config = InjectConfig::default();
        let once = inject_manifests(input, &config).unwrap().text;
        assert!(once.contains("kips-app-3000"), "{once}");
        let twice = inject_manifests(&once, &config).unwrap().text;
        assert_eq!(twice, once);
    }

    #[test]
    fn an_invalid_document_fails_the_whole_run_naming_it() {
        let input = DEPLOYMENT.replace("\"8080\"", "\"api:80x0\"");
        let error = inject_manifests(&input, &InjectConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("document 1 (Deployment api): kips.io/redirect: \"api:80x0\""),
            "{error}"
        );
    }
}
