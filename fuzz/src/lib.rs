//! What the fuzz targets check, shared by them: the properties of one admission.
//!
//! For any body: the answer is an AdmissionReview that says `allowed` (with a message when
//! not), echoes the uid, and never panics. When it carries a patch: the patch is base64 JSON
//! Patch of adds, removes and replaces only, never of the whole object; it applies to the
//! request's object; the result still decodes as the kind (when the input did); and
//! admitting the result again (a reinvocation, a re-applied manifest) patches nothing.

use base64::Engine;
use json_patch::PatchOperation;
use kips::inject::InjectConfig;
use kips::webhook::review;
use serde_json::Value;

/// The kinds kips admits, as the request's `kind` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pod,
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl Kind {
    /// What kips dispatches on: group, version (both default to empty), kind, operation.
    fn of(request: &Value) -> Option<Kind> {
        let kind = &request["kind"];
        let group = kind.get("group").map_or(Some(""), Value::as_str)?;
        let version = kind.get("version").map_or(Some(""), Value::as_str)?;
        match (group, version, kind["kind"].as_str()?) {
            ("", "v1", "Pod") => Some(Kind::Pod),
            ("apps", "v1", "Deployment") => Some(Kind::Deployment),
            ("apps", "v1", "StatefulSet") => Some(Kind::StatefulSet),
            ("apps", "v1", "DaemonSet") => Some(Kind::DaemonSet),
            _ => None,
        }
    }

    /// Whether `object` decodes as this kind's k8s-openapi type (what the API server would
    /// make of it).
    pub fn decodes(self, object: &Value) -> bool {
        use k8s_openapi::api::{apps::v1 as apps, core::v1 as core};
        let object = object.clone();
        match self {
            Kind::Pod => serde_json::from_value::<core::Pod>(object).is_ok(),
            Kind::Deployment => serde_json::from_value::<apps::Deployment>(object).is_ok(),
            Kind::StatefulSet => serde_json::from_value::<apps::StatefulSet>(object).is_ok(),
            Kind::DaemonSet => serde_json::from_value::<apps::DaemonSet>(object).is_ok(),
        }
    }
}

/// One admission, as the webhook answers it, parsed.
fn answer(body: &[u8], config: &InjectConfig) -> (review::Reviewed, Value) {
    let reviewed = review::review(body, config);
    let answer: Value = serde_json::from_slice(&reviewed.body).expect("kips answers JSON");
    assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
    (reviewed, answer)
}

/// Checks one admission of `body` (module docs). Returns the review with its object
/// replaced by the patched one (the operation's `oldObject` too for an UPDATE), when kips
/// patched and the body reads as a JSON value, so that callers can change it further and
/// admit it again.
pub fn check_review(body: &[u8], config: &InjectConfig) -> Option<Value> {
    let (reviewed, response) = answer(body, config);
    let response = &response["response"];
    let allowed = response["allowed"]
        .as_bool()
        .unwrap_or_else(|| panic!("`allowed` is a boolean: {response}"));
    if !allowed {
        let message = response["status"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "a refusal says why: {response}");
        assert!(
            response.get("patch").is_none(),
            "a refusal patches: {response}"
        );
    }
    // serde_json's Value refuses a few things that skipping does not (numbers out of f64's
    // range, unpaired surrogates): such bodies are checked for the answer only.
    let input: Option<Value> = serde_json::from_slice(body).ok();
    if let (Some(input), Some(_)) = (&input, &reviewed.request)
        && let Some(uid) = input["request"]["uid"].as_str()
    {
        assert_eq!(response["uid"], uid, "the uid is echoed");
    }
    let encoded = response.get("patch")?;
    assert_eq!(response["patchType"], "JSONPatch");
    let encoded = encoded
        .as_str()
        .unwrap_or_else(|| panic!("the patch is base64 text: {response}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("the patch is valid base64");
    let patch: json_patch::Patch =
        serde_json::from_slice(&bytes).expect("the patch is a JSON Patch");
    let patch_text = String::from_utf8_lossy(&bytes);
    assert!(!patch.0.is_empty(), "an empty patch is sent as none");
    for operation in &patch.0 {
        let path = match operation {
            PatchOperation::Add(op) => &op.path,
            PatchOperation::Remove(op) => &op.path,
            PatchOperation::Replace(op) => &op.path,
            other => panic!("kips sends adds, removes and replaces only, not {other:?}"),
        };
        assert!(
            !path.is_root(),
            "a patch never replaces the whole object: {patch_text}"
        );
    }
    let input = input?;
    let request = &input["request"];
    let kind = Kind::of(request).expect("kips patches only the kinds it admits");
    let mut object = request["object"].clone();
    if let Err(error) = json_patch::patch(&mut object, &patch) {
        panic!(
            "kips' patch does not apply to the request's object: {error}\npatch: {patch_text}\nobject: {}",
            request["object"]
        );
    }
    if kind.decodes(&request["object"]) {
        assert!(
            kind.decodes(&object),
            "the patched object no longer decodes as a {kind:?}\npatch: {patch_text}\nresult: {object}"
        );
    }
    let mut again = input.clone();
    again["request"]["object"] = object.clone();
    if request["operation"] == "UPDATE" {
        again["request"]["oldObject"] = object;
    }
    let (_, second) = answer(&serde_json::to_vec(&again).expect("JSON"), config);
    assert_eq!(
        second["response"]["allowed"], true,
        "kips refuses its own result: {second}\nfirst patch: {patch_text}"
    );
    if let Some(patch) = second["response"].get("patch") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(patch.as_str().unwrap_or_default())
            .unwrap_or_default();
        panic!(
            "admitting kips' own result again patched it again\nfirst patch: {patch_text}\nsecond patch: {}\nresult: {}",
            String::from_utf8_lossy(&decoded),
            again["request"]["object"]
        );
    }
    Some(again)
}
