//! The admin API over raw HTTP against real `basaltd run` processes: each
//! kind of error is the HTTP status README lists and a JSON body
//! `{error, message}` with a stable code and a message that says what to
//! do; successes are 201 and 204 where README says so.

mod common;

use common::cluster::Cluster;
use serde_json::Value;
use std::time::Duration;

/// Status, content type and JSON body (`Null` when empty) of a request.
fn call(c: &Cluster, k: usize, method: &str, path: &str, body: Option<&str>) -> (u16, String, Value) {
    let url = format!("http://{}{path}", c.nodes[k].admin);
    let req = ureq::request(method, &url).timeout(Duration::from_secs(30));
    let res = match body {
        Some(b) => req.set("content-type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = resp.status();
    let ct = resp.header("content-type").unwrap_or_default().to_string();
    let text = resp.into_string().unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"))
    };
    (status, ct, v)
}

/// Asserts an error answer: status, JSON content type, the stable code and
/// every fragment in the message.
fn error(got: (u16, String, Value), status: u16, code: &str, says: &[&str]) {
    let (s, ct, v) = got;
    assert_eq!((s, v["error"].as_str()), (status, Some(code)), "{v}");
    assert_eq!(ct, "application/json", "{v}");
    let msg = v["message"].as_str().unwrap();
    for f in says {
        assert!(msg.contains(f), "{f:?} not in {msg:?}");
    }
    assert_eq!(v.as_object().unwrap().len(), 2, "only error and message: {v}");
}

#[test]
fn admin_api_errors_are_json_with_the_listed_status() {
    let mut c = Cluster::start(3, 3);
    let leader = c.wait_leader(0, None);
    let via = (leader + 1) % 3;

    let (s, _, v) = call(&c, via, "POST", "/v1/volumes", Some(r#"{"name":"a","size":16777216}"#));
    assert_eq!((s, v["name"].as_str(), v["size"].as_u64()), (201, Some("a"), Some(16 << 20)), "{v}");
    error(
        call(&c, via, "POST", "/v1/volumes", Some(r#"{"name":"a","size":16777216}"#)),
        409,
        "conflict",
        &["\"a\"", "exists"],
    );
    error(call(&c, via, "POST", "/v1/volumes", Some("{not json")), 400, "invalid", &["request body"]);
    error(call(&c, via, "POST", "/v1/volumes", Some(r#"{"size":1}"#)), 400, "invalid", &["name"]);
    error(
        call(&c, via, "POST", "/v1/volumes", Some(r#"{"name":"bad name","size":16777216}"#)),
        400,
        "invalid",
        &["bad name"],
    );
    error(call(&c, via, "GET", "/v1/volumes/nope", None), 404, "not_found", &["nope"]);
    error(call(&c, via, "DELETE", "/v1/volumes/nope", None), 404, "not_found", &["nope"]);
    error(call(&c, via, "GET", "/v1/nodes/abc", None), 400, "invalid", &["\"abc\"", "not a number"]);
    error(call(&c, via, "GET", "/v1/nodes/999999", None), 404, "not_found", &["999999"]);
    error(call(&c, via, "GET", "/v1/nope", None), 404, "not_found", &["no such route", "README"]);
    // A node that holds replicas: refused, and told what to do.
    let id = c.cli_json(0, &["cluster", "status"])["this_node"].as_u64().unwrap();
    error(
        call(&c, via, "DELETE", &format!("/v1/nodes/{id}"), None),
        409,
        "conflict",
        &["delete or move its volumes first"],
    );
    let (s, _, v) = call(&c, via, "DELETE", "/v1/volumes/a", None);
    assert_eq!((s, v), (204, Value::Null));
    error(call(&c, via, "GET", "/v1/volumes/a", None), 404, "not_found", &["\"a\""]);

    // One node of three left: writes are 503 with what it takes.
    for k in 0..3 {
        if k != via {
            c.kill9(k);
        }
    }
    error(
        call(&c, via, "POST", "/v1/volumes", Some(r#"{"name":"b","size":16777216}"#)),
        503,
        "unavailable",
        &["majority"],
    );
    // A stale read still answers from local state.
    let (s, _, v) = call(&c, via, "GET", "/v1/volumes?stale=true", None);
    assert_eq!((s, v), (200, serde_json::json!([])));
}
