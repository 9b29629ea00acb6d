//! The admission router in process (`tower::ServiceExt::oneshot`, no TLS, no sockets), over
//! every JSON fixture: what each answers, the wire format, that each patch applies to its
//! object and that admitting the result again changes nothing. The real-TLS suite
//! (`webhook_tls`) drives the same fixtures through the binary.

mod support;

use std::sync::Arc;

use anyhow::Result;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use http_body_util::BodyExt;
use kips::inject::InjectConfig;
use kips::webhook::{AppState, MAX_BODY_BYTES, Metrics, Readiness, ServerSettings, router};
use serde_json::Value;
use tower::ServiceExt;

fn app(ready: bool) -> Router {
    let readiness = Readiness::new();
    readiness.set_trusted(ready);
    let state = AppState::new(
        InjectConfig::default(),
        Arc::new(Metrics::new()),
        readiness,
        None,
    );
    router(state, &ServerSettings::default())
}

async fn call(app: &Router, request: Request<Body>) -> Result<(StatusCode, Vec<u8>)> {
    let response = app.clone().oneshot(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}

async fn review(app: &Router, body: Vec<u8>) -> Result<(StatusCode, Value)> {
    let request = Request::post("/mutate")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))?;
    let (status, body) = call(app, request).await?;
    Ok((status, serde_json::from_slice(&body)?))
}

/// The JSON patch of a response, decoded; `None` when it allows without a patch.
fn patch(response: &Value) -> Option<json_patch::Patch> {
    let encoded = response["response"].get("patch")?;
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let text = encoded
        .as_str()
        .expect("the patch is base64 text, not an array of numbers");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64");
    Some(serde_json::from_slice(&bytes).expect("a JSON patch"))
}

#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Patched,
    /// Patched, with a warning that says this.
    PatchedWarned(&'static str),
    Allowed,
    /// Allowed unpatched, with a warning that says why.
    Warned(&'static str),
    Denied(&'static str),
}

#[tokio::test]
async fn every_fixture_gets_its_answer_and_a_second_admission_changes_nothing() -> Result<()> {
    let app = app(true);
    let expected = [
        ("daemonset-create", Expect::Patched),
        ("deployment-annotate", Expect::Patched),
        // `8080` takes the relay `api` (the workload's name), which the reverse entry uses.
        (
            "deployment-both-ways",
            Expect::Denied(
                "kips.io/reverse: \"api=db.shop.svc:5432\": relay \"api\" is also used by kips.io/redirect (\"8080\" takes the workload's name, api, as its relay)",
            ),
        ),
        ("deployment-invalid", Expect::Denied("kips.io/redirect")),
        ("deployment-remove-annotation", Expect::Patched),
        (
            "deployment-udp",
            Expect::PatchedWarned("azbridge stops forwarding UDP"),
        ),
        ("pod-bare-invalid", Expect::Warned("kips: pod not injected")),
        ("pod-deployment-typical", Expect::Patched),
        ("pod-hostnetwork", Expect::Warned("hostNetwork")),
        ("pod-names-that-collided", Expect::Patched),
        ("pod-no-annotations", Expect::Allowed),
        ("pod-statefulset-named", Expect::Patched),
        ("pod-two-redirects-reverse", Expect::Patched),
    ];
    let mut on_disk: Vec<String> = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/admission"
    ))?
    .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
    .collect::<Result<_, _>>()?;
    on_disk.sort();
    let listed: Vec<String> = expected.iter().map(|(n, _)| format!("{n}.json")).collect();
    assert_eq!(on_disk, listed, "every fixture has an expectation here");

    for (name, expect) in expected {
        let text = support::webhook::fixture(&format!("admission/{name}.json"))?;
        let request: Value = serde_json::from_str(&text)?;
        let (status, response) = review(&app, text.into_bytes()).await?;
        assert_eq!(status, StatusCode::OK, "{name}: {response}");
        assert_eq!(response["apiVersion"], "admission.k8s.io/v1", "{name}");
        assert_eq!(response["kind"], "AdmissionReview", "{name}");
        assert_eq!(
            response["response"]["uid"], request["request"]["uid"],
            "{name}"
        );
        let allowed = response["response"]["allowed"] == true;
        let warnings: Vec<&str> = response["response"]["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let warnings = warnings.join("\n");
        match expect {
            Expect::Denied(part) => {
                assert!(!allowed, "{name}: {response}");
                let message = response["response"]["status"]["message"]
                    .as_str()
                    .unwrap_or_default();
                assert!(message.contains(part), "{name}: {message}");
                continue;
            }
            Expect::Allowed | Expect::Warned(_) => {
                assert!(allowed, "{name}: {response}");
                assert!(patch(&response).is_none(), "{name}: {response}");
                if let Expect::Warned(part) = expect {
                    assert!(warnings.contains(part), "{name}: {warnings}");
                }
                continue;
            }
            Expect::Patched => assert!(allowed, "{name}: {response}"),
            Expect::PatchedWarned(part) => {
                assert!(allowed, "{name}: {response}");
                assert!(warnings.contains(part), "{name}: {warnings}");
            }
        }
        let ops = patch(&response).unwrap_or_else(|| panic!("{name}: no patch: {response}"));
        let mut object = request["request"]["object"].clone();
        json_patch::patch(&mut object, &ops)
            .unwrap_or_else(|e| panic!("{name}: the patch does not apply: {e}"));

        if let Some(names) = duplicate_binding_names(&object) {
            panic!("{name}: a relay's bindings share names {names:?}: {object}");
        }

        let mut again = request.clone();
        again["request"]["object"] = object.clone();
        if again["request"]["operation"] == "UPDATE" {
            again["request"]["oldObject"] = object;
        }
        let (status, second) = review(&app, serde_json::to_vec(&again)?).await?;
        assert_eq!(status, StatusCode::OK, "{name}");
        assert_eq!(second["response"]["allowed"], true, "{name}: {second}");
        assert!(patch(&second).is_none(), "{name}: patched twice: {second}");
    }
    Ok(())
}

/// The binding names of the sidecar's `-L` expressions that occur twice on one relay (a
/// laptop `-T` holding a name twice makes azbridge exit); `None` when all are distinct.
fn duplicate_binding_names(pod: &Value) -> Option<Vec<String>> {
    let containers = pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .chain(pod["spec"]["containers"].as_array())
        .flatten();
    let bridge = containers
        .into_iter()
        .find(|c| c["name"] == "kips-bridge")?;
    let args: Vec<&str> = bridge["args"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut duplicates = Vec::new();
    for pair in args.windows(2).filter(|w| w[0] == "-L") {
        let (bindings, _relay) = pair[1].rsplit_once(':')?;
        let mut seen = std::collections::BTreeSet::new();
        for binding in bindings.split(';') {
            let name = binding.rsplit_once('/').map_or(binding, |(_, n)| n);
            if !seen.insert(name) {
                duplicates.push(name.to_owned());
            }
        }
    }
    (!duplicates.is_empty()).then_some(duplicates)
}

#[tokio::test]
async fn unreadable_and_oversized_bodies_get_a_readable_review() -> Result<()> {
    let app = app(true);
    let (status, response) = review(&app, b"not json".to_vec()).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(response["response"]["allowed"], false);
    assert!(
        response["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .starts_with("kips could not read the AdmissionReview")
    );
    let (status, response) = review(&app, vec![b' '; MAX_BODY_BYTES + 1]).await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response["response"]["status"]["code"], 413);
    Ok(())
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() -> Result<()> {
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let ready = app(true);
    assert_eq!(call(&ready, get("/healthz")).await?.0, StatusCode::OK);
    assert_eq!(call(&ready, get("/readyz")).await?.0, StatusCode::OK);
    let unready = app(false);
    assert_eq!(call(&unready, get("/healthz")).await?.0, StatusCode::OK);
    assert_eq!(
        call(&unready, get("/readyz")).await?.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let fixture = support::webhook::fixture("admission/pod-deployment-typical.json")?;
    review(&ready, fixture.into_bytes()).await?;
    let (status, body) = call(&ready, get("/metrics")).await?;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body)?;
    assert!(
        text.contains(
            "kips_admission_requests_total{kind=\"Pod\",operation=\"CREATE\",outcome=\"patched\"} 1"
        ),
        "{text}"
    );
    Ok(())
}
