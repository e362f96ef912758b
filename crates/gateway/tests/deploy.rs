//! The deployment files under `deploy/` against the gateway they deploy:
//! every setting they name is one the binary reads, every metric their
//! dashboards and alerts query is one a running gateway exports, and the
//! compose services, the scrape targets and the proxy agree. (No
//! container engine or Kubernetes runs here; this is what can be checked
//! without one.)
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Gateway;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(deploy_dir().join(relative))
        .unwrap_or_else(|e| panic!("deploy/{relative}: {e}"))
}

/// Words that start with `prefix` (not inside a longer word), e.g. every `CHAT_X`.
fn words(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if end > prefix.len() && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    out
}

#[test]
fn every_setting_named_in_deploy_is_read_by_the_gateway() {
    let help = Command::new(env!("CARGO_BIN_EXE_chatgate"))
        .arg("--help")
        .output()
        .unwrap();
    let mut known = words(&String::from_utf8_lossy(&help.stdout), "CHAT_");
    // The log filter is read by the logging setup, not a flag.
    known.insert("CHAT_LOG".into());
    assert!(known.contains("CHAT_TOKEN_SECRET"), "help lists env names");
    let mut all = Vec::new();
    files(&deploy_dir(), &mut all);
    let mut checked = 0;
    for path in all {
        let text = std::fs::read_to_string(&path).unwrap();
        for name in words(&text, "CHAT_") {
            assert!(
                known.contains(&name),
                "{} names {name}, which the gateway does not read",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "deploy files name the settings they set");
}

#[tokio::test]
async fn every_metric_in_the_dashboard_and_alerts_is_exported() {
    let gw = Gateway::start(&[]);
    // Per-opcode request histograms exist once a request was served.
    let mut c = common::user(&gw, "ops").await;
    common::join(&mut c, &["dash"]).await;
    let sent = c.request(3, common::send_frame("dash", "m1", "hi")).await;
    assert!(matches!(
        sent,
        chatgate_protocol::ServerFrame::MessageSent(_)
    ));
    // Backend gauges appear with the first probe, right after start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let (status, text) = gw.get("/metrics");
        assert_eq!(status, 200);
        if text.contains("chat_backend_up{") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/dashboards/chatgate.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut queries = String::new();
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(!expr.trim().is_empty());
            queries.push_str(expr);
            queries.push('\n');
        }
    }
    queries.push_str(&read("prometheus/alerts.yml"));
    let used = words(&queries, "chat_");
    assert!(used.len() >= 15, "{used:?}");
    for name in &used {
        assert!(
            exported.contains(name),
            "{name} is queried by the dashboard or alerts but not exported by the gateway"
        );
    }
}

#[test]
fn compose_services_scrape_targets_and_proxy_agree() {
    let compose = read("compose/compose.yaml");
    let services: BTreeSet<String> = compose
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   ") && l.trim_end().ends_with(':'))
        .map(|l| l.trim().trim_end_matches(':').to_owned())
        .collect();
    for name in ["postgres", "redis", "nginx", "prometheus", "grafana"] {
        assert!(
            services.contains(name),
            "compose has no {name}: {services:?}"
        );
    }
    let gateways: BTreeSet<String> = services
        .iter()
        .filter(|s| s.starts_with("gateway"))
        .cloned()
        .collect();
    assert_eq!(gateways.len(), 3, "a 3-node cluster");
    let targets = |text: &str| -> BTreeSet<String> {
        words(text, "gateway")
            .into_iter()
            .filter(|w| {
                let n = &w["gateway".len()..];
                !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())
            })
            .collect()
    };
    assert_eq!(
        targets(&read("prometheus/prometheus.yml")),
        gateways,
        "Prometheus scrapes every gateway service"
    );
    assert_eq!(
        targets(&read("compose/nginx.conf")),
        gateways,
        "nginx balances over every gateway service"
    );
    // Every node needs its own id in the cluster.
    let ids: BTreeSet<&str> = compose
        .split("CHAT_NODE_ID:")
        .skip(1)
        .filter_map(|rest| rest.split([' ', '}', '\n']).find(|w| !w.is_empty()))
        .collect();
    assert_eq!(ids.len(), gateways.len(), "distinct node ids: {ids:?}");
}

/// `chatgate token` refuses a lifetime the gateway would refuse (or one
/// that would wrap around), and `serve` refuses a zero message rate
/// before it binds anything.
#[test]
fn the_command_line_refuses_what_would_fail_later() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_chatgate"))
            .args(args)
            .env_remove("CHAT_TOKEN_SECRET")
            .output()
            .expect("run chatgate")
    };
    let ok = run(&["token", "--user", "alice", "--ttl", "600"]);
    assert!(ok.status.success(), "{ok:?}");
    for ttl in ["0", "86401", "18446744073709551615"] {
        let out = run(&["token", "--user", "alice", "--ttl", ttl]);
        assert!(!out.status.success(), "--ttl {ttl} accepted: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--ttl"), "--ttl {ttl}: {err}");
    }
    let zero = run(&["--messages-per-minute", "0", "--listen", "127.0.0.1:0"]);
    assert!(!zero.status.success(), "{zero:?}");
    let err = String::from_utf8_lossy(&zero.stderr);
    assert!(err.contains("messages_per_minute"), "{err}");
}
