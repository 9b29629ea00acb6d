//! AdmissionReview in, AdmissionReview out. The one place where errors become responses.
//!
//! kips has its own wire types: it reads only what it needs, borrowing from the body, and
//! writes the patch as base64 (kube-core's `AdmissionResponse` has serialised it as an array
//! of numbers, which the API server rejects).

use axum::http::StatusCode;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::inject::view::{ObjectView, PodView, Text, WorkloadView};
use crate::inject::workload::Denial;
use crate::inject::{self, Effect, InjectConfig, Mutation};

const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// `O` is how the object is read: [`ObjectView`] in one pass over the body (the usual
/// way), or as raw JSON when that failed and the error must say what was wrong with it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn<'a, O> {
    #[serde(borrow, default)]
    api_version: Option<Text<'a>>,
    #[serde(borrow, default = "none")]
    request: Option<RequestIn<'a, O>>,
}

/// `#[serde(default)]` would demand `O: Default`, which `&RawValue` is not.
fn none<T>() -> Option<T> {
    None
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn<'a, O> {
    #[serde(borrow)]
    uid: Text<'a>,
    #[serde(borrow)]
    kind: KindIn<'a>,
    #[serde(borrow, default)]
    namespace: Option<Text<'a>>,
    #[serde(borrow, default)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    operation: Text<'a>,
    #[serde(default = "none")]
    object: Option<O>,
    #[serde(default)]
    dry_run: Option<bool>,
}

/// Only `request.object`, as a JSON value: for a pod (or a workload's pod template) kips
/// injected before.
#[derive(Deserialize)]
struct WholeObject {
    request: WholeObjectRequest,
}

#[derive(Deserialize)]
struct WholeObjectRequest {
    object: Value,
}

#[derive(Deserialize)]
struct KindIn<'a> {
    #[serde(borrow, default)]
    group: Text<'a>,
    #[serde(borrow, default)]
    version: Text<'a>,
    #[serde(borrow)]
    kind: Text<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut>,
    /// The base64 patch as a JSON string, quotes included: written as it is, since base64
    /// never needs escaping (a plain string would be scanned byte by byte for escapes).
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

#[derive(Serialize)]
struct StatusOut {
    status: &'static str,
    code: u16,
    reason: &'static str,
    message: String,
}

/// Why a request was not simply allowed.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("kips could not read the AdmissionReview: {0}")]
    Unreadable(String),
    #[error("kips refuses AdmissionReview bodies over {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{0}")]
    Denied(#[from] Denial),
}

impl AdmissionError {
    fn http_status(&self) -> StatusCode {
        match self {
            AdmissionError::Unreadable(_) => StatusCode::BAD_REQUEST,
            AdmissionError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // A denial is a successful review: the API server reads it and tells the user.
            AdmissionError::Denied(_) => StatusCode::OK,
        }
    }

    fn status(&self) -> StatusOut {
        let (code, reason) = match self {
            AdmissionError::Unreadable(_) => (400, "BadRequest"),
            AdmissionError::TooLarge { .. } => (413, "RequestEntityTooLarge"),
            AdmissionError::Denied(_) => (400, "BadRequest"),
        };
        StatusOut {
            status: "Failure",
            code,
            reason,
            message: self.to_string(),
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            AdmissionError::Denied(_) => Outcome::Denied,
            _ => Outcome::Error,
        }
    }
}

/// How a review ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Patched,
    Denied,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Patched => "patched",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

/// What the request was about, for tracing, metrics and events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub uid: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub operation: String,
    pub dry_run: bool,
}

/// A finished review: the HTTP answer and what it was about.
#[derive(Debug)]
pub struct Reviewed {
    pub http_status: StatusCode,
    pub body: Vec<u8>,
    pub outcome: Outcome,
    pub effect: Effect,
    pub warnings: Vec<String>,
    pub denial: Option<String>,
    /// `None` when the body was not a readable AdmissionReview.
    pub request: Option<RequestInfo>,
}

/// A decided review that has not been written yet: the edge may still add warnings that
/// need the cluster to know (a missing Secret, a namespace's Pod Security level).
#[derive(Debug)]
pub struct Decision {
    api_version: &'static str,
    /// `None` when the body was not a readable AdmissionReview.
    pub request: Option<RequestInfo>,
    pub result: Result<Mutation, AdmissionError>,
}

/// Reviews one AdmissionReview body. Never panics on input; every failure is a response.
pub fn review(body: &[u8], config: &InjectConfig) -> Reviewed {
    decide(body, config).respond()
}

pub fn decide(body: &[u8], config: &InjectConfig) -> Decision {
    match serde_json::from_slice::<ReviewIn<ObjectView>>(body) {
        Ok(review) => decide_review(review, body, config, |object, kind| {
            Ok(match kind {
                ObjectKind::Pod => Object::Pod(object.into_pod()),
                ObjectKind::Workload => Object::Workload(object.into_workload()),
            })
        }),
        // Read again in two steps, so that the error names what is wrong, and where.
        Err(_) => match serde_json::from_slice::<ReviewIn<&RawValue>>(body) {
            Ok(review) => decide_review(review, body, config, |raw, kind| match kind {
                ObjectKind::Pod => serde_json::from_str(raw.get()).map(Object::Pod),
                ObjectKind::Workload => serde_json::from_str(raw.get()).map(Object::Workload),
            }),
            Err(error) => Decision {
                api_version: REVIEW_API_VERSION,
                request: None,
                result: Err(AdmissionError::Unreadable(error.to_string())),
            },
        },
    }
}

/// What kind of object a request carries, as far as kips reads it.
#[derive(Clone, Copy)]
enum ObjectKind {
    Pod,
    Workload,
}

enum Object<'a> {
    Pod(PodView<'a>),
    Workload(WorkloadView<'a>),
}

fn decide_review<'a, O>(
    review: ReviewIn<'a, O>,
    body: &[u8],
    config: &InjectConfig,
    read_object: impl FnOnce(O, ObjectKind) -> Result<Object<'a>, serde_json::Error>,
) -> Decision {
    let Some(request) = review.request else {
        return Decision {
            api_version: REVIEW_API_VERSION,
            request: None,
            result: Err(AdmissionError::Unreadable("it has no request".into())),
        };
    };
    let api_version = match review.api_version.as_deref() {
        Some("admission.k8s.io/v1beta1") => "admission.k8s.io/v1beta1",
        _ => REVIEW_API_VERSION,
    };
    let info = RequestInfo {
        uid: request.uid.to_string(),
        kind: request.kind.kind.to_string(),
        namespace: request.namespace.as_deref().unwrap_or_default().to_owned(),
        name: request.name.as_deref().unwrap_or_default().to_owned(),
        operation: request.operation.to_string(),
        dry_run: request.dry_run.unwrap_or(false),
    };
    let kind = (
        &*request.kind.group,
        &*request.kind.version,
        &*request.kind.kind,
    );
    let object_kind = match (kind, &*request.operation) {
        (("", "v1", "Pod"), "CREATE") => Some(ObjectKind::Pod),
        (("apps", "v1", "Deployment" | "StatefulSet" | "DaemonSet"), "CREATE" | "UPDATE") => {
            Some(ObjectKind::Workload)
        }
        // Anything else the API server may send (a widened rule, a DELETE): let it through.
        _ => None,
    };
    let result = match (object_kind, request.object) {
        (None, _) => Ok(Mutation::default()),
        (Some(_), None) => Err(AdmissionError::Unreadable(
            "request.object is missing".into(),
        )),
        (Some(object_kind), Some(object)) => match read_object(object, object_kind) {
            Err(error) => Err(AdmissionError::Unreadable(format!(
                "request.object is not a {}: {error}",
                info.kind
            ))),
            Ok(Object::Pod(pod)) => {
                let whole_pod = || {
                    serde_json::from_slice::<WholeObject>(body).map(|whole| whole.request.object)
                };
                inject::mutate_pod_view(&pod, whole_pod, config, None).map_err(|error| {
                    AdmissionError::Unreadable(format!("request.object is not a Pod: {error}"))
                })
            }
            Ok(Object::Workload(workload)) => {
                let template = || {
                    serde_json::from_slice::<WholeObject>(body)
                        .ok()
                        .and_then(|mut whole| {
                            whole
                                .request
                                .object
                                .pointer_mut("/spec/template")
                                .map(Value::take)
                        })
                };
                inject::workload::mutate_view(workload, template, config)
                    .map_err(AdmissionError::from)
            }
        },
    };
    Decision {
        api_version,
        result,
        request: Some(info),
    }
}

/// The response for a body that could not be reviewed at all (no uid to echo).
pub fn error_review(error: AdmissionError) -> Reviewed {
    Decision {
        api_version: REVIEW_API_VERSION,
        request: None,
        result: Err(error),
    }
    .respond()
}

/// `bytes` in base64, as a JSON string.
fn json_string_base64(bytes: &[u8]) -> Box<RawValue> {
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4 + 2);
    text.push('"');
    base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut text);
    text.push('"');
    RawValue::from_string(text).expect("a base64 string is a JSON string")
}

impl Decision {
    /// Writes the AdmissionReview response.
    pub fn respond(self) -> Reviewed {
        let Decision {
            api_version,
            request,
            result,
        } = self;
        let write = |response: ResponseOut| {
            let review = ReviewOut {
                api_version,
                kind: "AdmissionReview",
                response,
            };
            // Sized for the patch, so the buffer is not regrown while it is written.
            let patch_len = review.response.patch.as_ref().map_or(0, |p| p.get().len());
            let mut body = Vec::with_capacity(512 + patch_len);
            serde_json::to_writer(&mut body, &review).expect("reviews serialise");
            body
        };
        let uid = request.as_ref().map_or("", |r| r.uid.as_str());
        let (http_status, body, outcome, effect, warnings, denial) = match result {
            Ok(mutation) => {
                let (patch, patch_type, outcome) = if mutation.patch.is_empty() {
                    (None, None, Outcome::Allowed)
                } else {
                    let mut json = Vec::with_capacity(4096);
                    serde_json::to_writer(&mut json, &mutation.patch).expect("patches serialise");
                    (
                        Some(json_string_base64(&json)),
                        Some("JSONPatch"),
                        Outcome::Patched,
                    )
                };
                let response = ResponseOut {
                    uid,
                    allowed: true,
                    status: None,
                    patch,
                    patch_type,
                    warnings: &mutation.warnings,
                };
                (
                    StatusCode::OK,
                    write(response),
                    outcome,
                    mutation.effect,
                    mutation.warnings,
                    None,
                )
            }
            Err(error) => {
                let response = ResponseOut {
                    uid,
                    allowed: false,
                    status: Some(error.status()),
                    patch: None,
                    patch_type: None,
                    warnings: &[],
                };
                let denial = match &error {
                    AdmissionError::Denied(denial) => Some(denial.0.clone()),
                    _ => None,
                };
                (
                    error.http_status(),
                    write(response),
                    error.outcome(),
                    Effect::Unchanged,
                    Vec::new(),
                    denial,
                )
            }
        };
        Reviewed {
            http_status,
            body,
            outcome,
            effect,
            warnings,
            denial,
            request,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn review_json(value: Value) -> (Reviewed, Value) {
        let reviewed = review(
            &serde_json::to_vec(&value).unwrap(),
            &InjectConfig::default(),
        );
        let body: Value = serde_json::from_slice(&reviewed.body).unwrap();
        (reviewed, body)
    }

    fn pod_review(annotations: Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "dev", "operation": "CREATE",
                "object": {"metadata": {"name": "api-0", "annotations": annotations},
                           "spec": {"containers": [{"name": "app", "image": "app"}]}}
            }
        })
    }

    #[test]
    fn patch_is_base64_json_patch_on_the_wire() {
        let (reviewed, body) = review_json(pod_review(json!({"kips.io/redirect": "api:8080"})));
        assert_eq!(reviewed.outcome, Outcome::Patched);
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(body["kind"], "AdmissionReview");
        assert_eq!(body["response"]["uid"], "u-1");
        assert_eq!(body["response"]["allowed"], true);
        assert_eq!(body["response"]["patchType"], "JSONPatch");
        let encoded = body["response"]["patch"]
            .as_str()
            .expect("the patch is a string, not an array of numbers");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        let ops: Value = serde_json::from_slice(&decoded).unwrap();
        assert!(
            ops.as_array()
                .unwrap()
                .iter()
                .all(|op| op["op"] == "add" || op["op"] == "replace")
        );
    }

    #[test]
    fn unannotated_objects_get_no_patch() {
        let (reviewed, body) = review_json(pod_review(json!({"team": "a"})));
        assert_eq!(reviewed.outcome, Outcome::Allowed);
        assert!(body["response"].get("patch").is_none());
        assert!(body["response"].get("patchType").is_none());
    }

    #[test]
    fn unreadable_bodies_get_a_readable_review() {
        for body in [&b"not json"[..], b"{\"request\": 5}", b"{}", b"[]"] {
            let reviewed = review(body, &InjectConfig::default());
            assert_eq!(reviewed.http_status, StatusCode::BAD_REQUEST);
            let value: Value = serde_json::from_slice(&reviewed.body).unwrap();
            assert_eq!(value["response"]["allowed"], false);
            assert!(
                value["response"]["status"]["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("kips could not read")
            );
        }
    }

    /// Fuzz finding (target `inject_yaml`), through the webhook: a Deployment whose template
    /// `kips inject` rendered in named mode is admitted (UPDATE) without a patch, not denied.
    #[test]
    fn a_workload_rendered_by_kips_inject_in_named_mode_is_admitted_unchanged() {
        let manifest = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: dev}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}, annotations: {kips.io/redirect: http}}\n    spec: {containers: [{name: web, image: web, ports: [{name: http, containerPort: 3000}]}]}\n";
        let rendered = crate::manifest::inject_manifests(manifest, &InjectConfig::default())
            .unwrap()
            .text;
        let object: Value = serde_yaml::from_str(&rendered).unwrap();
        let (reviewed, body) = review_json(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-2", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
                "namespace": "dev", "operation": "UPDATE", "object": object, "oldObject": object
            }
        }));
        assert_eq!(reviewed.outcome, Outcome::Allowed, "{body}");
        assert!(body["response"].get("patch").is_none(), "{body}");
    }

    #[test]
    fn other_kinds_and_operations_pass_untouched() {
        let mut value = pod_review(json!({"kips.io/redirect": "api:8080"}));
        value["request"]["operation"] = json!("UPDATE");
        assert_eq!(review_json(value).0.outcome, Outcome::Allowed);
        let mut value = pod_review(json!({"kips.io/redirect": "api:8080"}));
        value["request"]["kind"] = json!({"group": "batch", "version": "v1", "kind": "Job"});
        assert_eq!(review_json(value).0.outcome, Outcome::Allowed);
    }
}
