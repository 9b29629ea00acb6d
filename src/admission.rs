//! AdmissionReview in, AdmissionReview out. The one place where errors become responses.
//!
//! kips has its own wire types: it reads only what it needs, borrowing from the body, and
//! writes the patch as base64 (kube-core's `AdmissionResponse` has serialised it as an array
//! of numbers, which the API server rejects).

use axum::http::StatusCode;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::inject::view::Text;
use crate::inject::workload::Denial;
use crate::inject::{self, Effect, InjectConfig, Mutation};

const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn<'a> {
    #[serde(borrow, default)]
    api_version: Option<Text<'a>>,
    #[serde(borrow, default)]
    request: Option<RequestIn<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn<'a> {
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
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
    #[serde(default)]
    dry_run: Option<bool>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
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
    let unreadable = |message: String| Decision {
        api_version: REVIEW_API_VERSION,
        request: None,
        result: Err(AdmissionError::Unreadable(message)),
    };
    let parsed: ReviewIn = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => return unreadable(error.to_string()),
    };
    let Some(request) = parsed.request else {
        return unreadable("it has no request".into());
    };
    let api_version = match parsed.api_version.as_deref() {
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
    Decision {
        api_version,
        result: decide_request(&request, config),
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

fn decide_request(request: &RequestIn, config: &InjectConfig) -> Result<Mutation, AdmissionError> {
    let object = || {
        request
            .object
            .filter(|raw| raw.get() != "null")
            .map(RawValue::get)
            .ok_or_else(|| AdmissionError::Unreadable("request.object is missing".into()))
    };
    let unreadable_object = |error: serde_json::Error| {
        AdmissionError::Unreadable(format!(
            "request.object is not a {}: {error}",
            &*request.kind.kind
        ))
    };
    let kind = (
        &*request.kind.group,
        &*request.kind.version,
        &*request.kind.kind,
    );
    match (kind, &*request.operation) {
        (("", "v1", "Pod"), "CREATE") => {
            inject::pod::mutate(object()?, config, None).map_err(unreadable_object)
        }
        (("apps", "v1", "Deployment" | "StatefulSet" | "DaemonSet"), "CREATE" | "UPDATE") => {
            Ok(inject::workload::mutate(object()?, config).map_err(unreadable_object)??)
        }
        // Anything else the API server may send (a widened rule, a DELETE): let it through.
        _ => Ok(Mutation::default()),
    }
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
            serde_json::to_vec(&review).expect("reviews serialise")
        };
        let uid = request.as_ref().map_or("", |r| r.uid.as_str());
        let (http_status, body, outcome, effect, warnings, denial) = match result {
            Ok(mutation) => {
                let (patch, patch_type, outcome) = if mutation.patch.is_empty() {
                    (None, None, Outcome::Allowed)
                } else {
                    let json = serde_json::to_vec(&mutation.patch).expect("patches serialise");
                    (
                        Some(base64::engine::general_purpose::STANDARD.encode(json)),
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
