//! The real `kips webhook` binary over real TLS, driven by clients that trust only the CA it
//! wrote: fixtures shaped like what kube-apiserver sends, malformed input, and slow clients.

mod support;

use support::args;

use std::time::Duration;

use anyhow::Result;
use base64::Engine;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use support::webhook::{Webhook, fixture, post_head, read_to_close, tls_connect};
use tokio::io::AsyncWriteExt;

/// Posts an AdmissionReview and returns the HTTP status and the parsed response body.
async fn post(client: &reqwest::Client, webhook: &Webhook, body: Vec<u8>) -> Result<(u16, Value)> {
    let response = client
        .post(webhook.url("/mutate"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// The response's patch applied to the request's object, or `None` when there is no patch.
fn patched_object(review: &Value, response: &Value) -> Option<Value> {
    let encoded = response["response"].get("patch")?;
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let encoded = encoded
        .as_str()
        .expect("the patch is base64 text, not an array of numbers");
    let ops: json_patch::Patch = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap();
    let mut object = review["request"]["object"].clone();
    json_patch::patch(&mut object, &ops).expect("the patch applies to the request's object");
    Some(object)
}

fn template_annotations(deployment: Deployment) -> std::collections::BTreeMap<String, String> {
    deployment
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default()
}

fn containers(pod: &Pod) -> Vec<&Container> {
    let spec = pod.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect()
}

fn container<'p>(pod: &'p Pod, name: &str) -> &'p Container {
    containers(pod)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Admits a fixture, checks the wire format, re-admits the result, and returns the patched
/// object (the request's object when nothing was patched) and the response.
async fn admit_fixture(
    client: &reqwest::Client,
    webhook: &Webhook,
    name: &str,
) -> Result<(Value, Value)> {
    let review: Value = serde_json::from_str(&fixture(&format!("admission/{name}.json"))?)?;
    let (status, response) = post(client, webhook, serde_json::to_vec(&review)?).await?;
    assert_eq!(status, 200, "{name}: {response}");
    assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(
        response["response"]["uid"], review["request"]["uid"],
        "{name}: the uid is echoed"
    );
    let Some(patched) = patched_object(&review, &response) else {
        return Ok((review["request"]["object"].clone(), response));
    };
    // A second admission of the result changes nothing (reinvocation, re-applied manifests).
    let mut again = review.clone();
    again["request"]["object"] = patched.clone();
    if again["request"]["operation"] == "UPDATE" {
        again["request"]["oldObject"] = patched.clone();
    }
    let (_, second) = post(client, webhook, serde_json::to_vec(&again)?).await?;
    assert_eq!(second["response"]["allowed"], true, "{name}: {second}");
    assert!(
        second["response"].get("patch").is_none(),
        "{name}: second admission patched again: {second}"
    );
    Ok((patched, response))
}

async fn fixtures_are_admitted(http2: bool) -> Result<()> {
    let webhook = Webhook::start(&[])?;
    let client = webhook.client(http2)?;

    // A Deployment-made pod: the relay is the Deployment's name; 15100 is taken by envoy.
    let (object, _) = admit_fixture(&client, &webhook, "pod-deployment-typical").await?;
    let pod: Pod = serde_json::from_value(object)?;
    assert_eq!(
        args(container(&pod, "kips-init")),
        [
            "init-net",
            "--redirect",
            "8080/tcp=15101",
            "--node-ips=$(KIPS_NODE_IPS)",
            "--ipv6=false"
        ]
    );
    assert_eq!(
        args(container(&pod, "kips-bridge")),
        [
            "-x",
            "$(KIPS_RELAY_CONNECTION_STRING)",
            "-L",
            "0.0.0.0:15101/8080:checkout"
        ]
    );
    assert_eq!(containers(&pod).len(), 5);

    // A StatefulSet pod in named mode: no init container, the port name moves to the sidecar.
    let (object, _) = admit_fixture(&client, &webhook, "pod-statefulset-named").await?;
    let pod: Pod = serde_json::from_value(object)?;
    assert!(containers(&pod).iter().all(|c| c.name != "kips-init"));
    let postgres = container(&pod, "postgres");
    assert_eq!(
        postgres.ports.as_ref().unwrap()[0].name.as_deref(),
        Some("kips-app-5432")
    );
    let probe_port = &postgres
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap()
        .port;
    assert_eq!(
        serde_json::to_value(probe_port)?,
        json!("kips-app-5432"),
        "probes follow the renamed port"
    );
    let bridge = container(&pod, "kips-bridge");
    assert_eq!(
        bridge.ports.as_ref().unwrap()[0].name.as_deref(),
        Some("pg")
    );
    assert_eq!(args(bridge)[2..], ["-L", "0.0.0.0:15100/pg:db"]);

    // Two relays, a UDP port, a reverse entry, an existing init container, taken ports.
    let (object, _) = admit_fixture(&client, &webhook, "pod-two-redirects-reverse").await?;
    let pod: Pod = serde_json::from_value(object)?;
    let init_names: Vec<&str> = pod
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init_names, ["wait-for-db", "kips-init", "kips-bridge"]);
    assert_eq!(
        args(container(&pod, "kips-init"))[1..7],
        [
            "--redirect",
            "8080/tcp=15102",
            "--redirect",
            "9000/tcp=15103",
            "--redirect",
            "5353/udp=15104"
        ]
    );
    assert_eq!(
        args(container(&pod, "kips-bridge"))[2..],
        [
            "-L",
            "0.0.0.0:15102/http:orders",
            "-L",
            "0.0.0.0:15103/9000:orders-grpc",
            "-L",
            "0.0.0.0:15104U/5353.udp:dns",
            "-T",
            "inventory:8080/inventory.shop.svc:8080",
        ]
    );
    let env = &container(&pod, "kips-bridge").env.as_ref().unwrap()[0];
    assert_eq!(
        env.value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "orders-relay"
    );

    // Objects that are not kips' get no patch and no warning.
    let (_, response) = admit_fixture(&client, &webhook, "pod-no-annotations").await?;
    assert!(
        response["response"].get("patch").is_none()
            && response["response"].get("warnings").is_none()
    );

    // Pods kips cannot inject are let through, with a warning that says why.
    for (name, reason) in [
        ("pod-hostnetwork", "hostNetwork"),
        ("pod-bare-invalid", "port \"80x0\" is not a number 1-65535"),
    ] {
        let (_, response) = admit_fixture(&client, &webhook, name).await?;
        assert_eq!(response["response"]["allowed"], true);
        assert!(response["response"].get("patch").is_none());
        let warning = response["response"]["warnings"][0].as_str().unwrap();
        assert!(warning.contains(reason), "{name}: {warning}");
    }

    // Workloads: the copy goes in, and comes out again.
    let (object, _) = admit_fixture(&client, &webhook, "deployment-annotate").await?;
    let deployment: Deployment = serde_json::from_value(object)?;
    let template = template_annotations(deployment);
    assert_eq!(template["kips.io/redirect"], "api:8080");
    assert_eq!(template["kips.io/copied"], "redirect");

    let (object, _) = admit_fixture(&client, &webhook, "deployment-remove-annotation").await?;
    let deployment: Deployment = serde_json::from_value(object)?;
    let template = template_annotations(deployment);
    assert_eq!(
        template.keys().collect::<Vec<_>>(),
        ["example.com/owner", "kips.io/relay-secret"],
        "only kips' copies are removed; the user's own template annotations stay"
    );

    let (object, _) = admit_fixture(&client, &webhook, "daemonset-create").await?;
    let daemonset: DaemonSet = serde_json::from_value(object)?;
    assert_eq!(
        daemonset
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()["kips.io/copied"],
        "port-mode,redirect"
    );

    // A bad value is denied with the precise message.
    let review: Value = serde_json::from_str(&fixture("admission/deployment-invalid.json")?)?;
    let (status, response) = post(&client, &webhook, serde_json::to_vec(&review)?).await?;
    assert_eq!(status, 200);
    assert_eq!(response["response"]["allowed"], false);
    assert_eq!(response["response"]["status"]["code"], 400);
    assert_eq!(
        response["response"]["status"]["message"],
        "kips.io/redirect: \"api:80x0\": port \"80x0\" is not a number 1-65535 or a port name (expected <relay>:<port>[/udp][,...] or <port>)"
    );

    // The metrics saw all of it.
    let metrics = client
        .get(webhook.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains(
            "kips_admission_requests_total{kind=\"Pod\",operation=\"CREATE\",outcome=\"patched\"} 3"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("kips_admission_requests_total{kind=\"Deployment\",operation=\"UPDATE\",outcome=\"denied\"} 1"), "{metrics}");
    assert!(
        metrics.contains("kips_admission_effects_total{kind=\"Pod\",effect=\"injected\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kips_admission_duration_seconds_bucket"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn fixtures_are_admitted_over_http1() -> Result<()> {
    fixtures_are_admitted(false).await
}

#[tokio::test]
async fn fixtures_are_admitted_over_http2() -> Result<()> {
    fixtures_are_admitted(true).await
}

#[tokio::test]
async fn health_readiness_and_the_trusted_ca() -> Result<()> {
    let webhook = Webhook::start(&[])?;
    let client = webhook.client(false)?;
    assert_eq!(
        client
            .get(webhook.url("/healthz"))
            .send()
            .await?
            .text()
            .await?,
        "ok"
    );
    assert_eq!(
        client
            .get(webhook.url("/readyz"))
            .send()
            .await?
            .text()
            .await?,
        "ok"
    );
    // The certificate is for 127.0.0.1 as well as localhost.
    let by_ip = client
        .get(format!("https://127.0.0.1:{}/healthz", webhook.addr.port()))
        .send()
        .await?;
    assert_eq!(by_ip.status(), 200);
    // A client trusting another CA refuses the connection: the CA file is what vouches.
    let other_ca = kips::tls::generate_ca("someone else", Duration::from_secs(60))?;
    let stranger = support::webhook::client_trusting(&other_ca.cert, false)?;
    assert!(stranger.get(webhook.url("/healthz")).send().await.is_err());
    Ok(())
}

async fn tls_stream(webhook: &Webhook) -> Result<support::webhook::TlsStream> {
    tls_connect(webhook.addr, &webhook.ca_pem()?).await
}

#[tokio::test]
async fn malformed_input_gets_an_error_and_the_next_request_is_served() -> Result<()> {
    let webhook = Webhook::start(&[
        "--handshake-timeout=1s",
        "--header-read-timeout=1s",
        "--request-timeout=2s",
    ])?;
    let client = webhook.client(false)?;
    let good: Value = serde_json::from_str(&fixture("admission/pod-deployment-typical.json")?)?;
    let good = serde_json::to_vec(&good)?;
    // A new client each time: HTTP/1.1 connections idle longer than the header-read timeout
    // are closed by the server (hyper counts the idle wait toward it), which a pooled
    // connection would otherwise meet here after the one-second waits below.
    let assert_good_request_served = || async {
        let client = webhook.client(false).unwrap();
        let (status, response) = post(&client, &webhook, good.clone()).await.unwrap();
        assert_eq!(status, 200);
        assert!(response["response"]["patch"].is_string());
    };

    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("not JSON", b"hello".to_vec(), "kips could not read the AdmissionReview: expected value"),
        ("wrong shape", br#"{"request": {"uid": 7}}"#.to_vec(), "kips could not read the AdmissionReview: invalid type"),
        ("no request", br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#.to_vec(), "it has no request"),
        (
            "object of the wrong shape",
            br#"{"request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE", "object": {"spec": {"containers": 5}}}}"#.to_vec(),
            "request.object is not a Pod",
        ),
        (
            "missing object",
            br#"{"request": {"uid": "u", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"}, "operation": "CREATE"}}"#.to_vec(),
            "request.object is missing",
        ),
    ];
    for (case, body, message) in cases {
        let (status, response) = post(&client, &webhook, body).await?;
        assert_eq!(status, 400, "{case}");
        assert_eq!(response["response"]["allowed"], false, "{case}");
        let text = response["response"]["status"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{case}: {text}");
        assert_good_request_served().await;
    }

    // A 4 MiB body: refused on its declared length, before the body is read, with a
    // readable review; a client that insists on writing it finds the connection closed.
    let mut large = tls_stream(&webhook).await?;
    large
        .write_all(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4194304\r\n\r\n")
        .await?;
    let answer = String::from_utf8_lossy(&read_to_close(&mut large, Duration::from_secs(5)).await?)
        .into_owned();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("kips refuses AdmissionReview bodies over 3145728 bytes"),
        "{answer}"
    );
    // The server closes a connection whose body it refused unread; a client of its own keeps
    // that connection out of the pool the good requests use.
    let oversized = webhook.client(false)?;
    match post(&oversized, &webhook, vec![b' '; 4 * 1024 * 1024]).await {
        Ok((status, _)) => assert_eq!(status, 413),
        Err(error) => assert!(
            format!("{error:#}").contains("error writing a body to connection"),
            "{error:#}"
        ),
    }
    // Without a declared length (chunked), the limit stops reading at 3 MiB.
    let chunks =
        futures_util::stream::iter((0..64).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])));
    let chunked = oversized
        .post(webhook.url("/mutate"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    match chunked {
        Ok(response) => assert_eq!(response.status(), 413),
        Err(error) => assert!(
            format!("{error:#}").contains("error writing a body to connection"),
            "{error:#}"
        ),
    }
    assert_good_request_served().await;

    // A client that connects and never says anything: dropped after the handshake timeout.
    let mut idle = tokio::net::TcpStream::connect(webhook.addr).await?;
    read_to_close(&mut idle, Duration::from_secs(5)).await?;
    assert_good_request_served().await;

    // A client that never finishes its headers: dropped after the header-read timeout.
    let mut slow = tls_stream(&webhook).await?;
    slow.write_all(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\n")
        .await?;
    read_to_close(&mut slow, Duration::from_secs(5)).await?;
    assert_good_request_served().await;

    // A client that sends half its body and stalls: answered 408 after the request timeout.
    let mut stalled = tls_stream(&webhook).await?;
    stalled.write_all(post_head(good.len()).as_bytes()).await?;
    stalled.write_all(&good[..good.len() / 2]).await?;
    let answer =
        String::from_utf8_lossy(&read_to_close(&mut stalled, Duration::from_secs(6)).await?)
            .into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_good_request_served().await;

    // Nothing above made the server panic.
    assert!(!webhook.logs().contains("panicked"), "{}", webhook.logs());
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() -> Result<()> {
    let mut webhook = Webhook::start(&[])?;
    let good = fixture("admission/pod-deployment-typical.json")?.into_bytes();
    // A request in flight: headers and half the body sent.
    let mut in_flight = tls_stream(&webhook).await?;
    in_flight
        .write_all(post_head(good.len()).as_bytes())
        .await?;
    in_flight.write_all(&good[..good.len() / 2]).await?;
    in_flight.flush().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = webhook.pid() as libc::pid_t;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: new connections are refused...
    assert!(
        tokio::net::TcpStream::connect(webhook.addr).await.is_err(),
        "the listener is closed while draining"
    );
    // ...but the request in flight completes.
    in_flight.write_all(&good[good.len() / 2..]).await?;
    let answer =
        String::from_utf8_lossy(&read_to_close(&mut in_flight, Duration::from_secs(10)).await?)
            .into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"patchType\":\"JSONPatch\""), "{answer}");
    let status = webhook.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}
