//! The `switchyard` command itself: help, JSON listings, and one clear line
//! when the operator credentials are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, process::Command};

use switchyard_tests::Cluster;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

#[test]
fn help_exits_zero_and_lists_the_subcommands() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["hub", "dev", "token", "pop", "policy", "status", "--config"] {
        assert!(text.contains(sub), "--help does not mention {sub}:\n{text}");
    }
    for sub in ["token", "pop", "policy", "hub"] {
        let out = Command::new(bin()).args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help failed");
    }
}

#[test]
fn missing_credentials_fail_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let missing = dir.join("nope.toml");
    for args in [
        vec!["status"],
        vec!["pop", "list"],
        vec!["--config", missing.to_str().unwrap(), "pop", "list"],
    ] {
        let out = Command::new(bin())
            .args(&args)
            .env_remove("SWITCHYARD_CONFIG")
            // No default file either.
            .env("HOME", dir)
            .env("XDG_CONFIG_HOME", dir)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{args:?} succeeded without credentials"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.trim().lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: not one line:\n{err}");
        assert!(
            lines[0].contains("--config") && lines[0].contains("SWITCHYARD_CONFIG"),
            "{args:?}: does not say how to pass the credentials: {err}"
        );
        println!("{args:?}: {}", lines[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_print_valid_json() {
    let c = Cluster::start(bin(), 1).await.unwrap();
    c.run_cli_ok(["pop", "add", "north-1", "--region", "north"])
        .await
        .unwrap();
    for (args, check) in [
        (vec!["pop", "list", "-o", "json"], "array"),
        (vec!["pop", "list", "--local", "-o", "json"], "array"),
        (vec!["token", "list", "-o", "json"], "array"),
        (vec!["policy", "list", "-o", "json"], "array"),
        (vec!["service", "list", "-o", "json"], "array"),
        (vec!["hub", "members", "list", "-o", "json"], "object"),
        (vec!["status", "-o", "json"], "object"),
        (vec!["pop", "show", "north-1", "-o", "json"], "object"),
    ] {
        let stdout = c.run_cli_ok(&args).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?} printed invalid JSON ({e}): {}",
                String::from_utf8_lossy(&stdout)
            )
        });
        match check {
            "array" => assert!(v.is_array(), "{args:?}: {v}"),
            _ => assert!(v.is_object(), "{args:?}: {v}"),
        }
    }
    let stdout = c.run_cli_ok(["pop", "list", "-o", "json"]).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(v[0]["name"], "north-1");
    assert_eq!(v[0]["labels"]["region"], "north");

    // A refused command is one line naming the node.
    let out = c.run_cli(["pop", "show", "no-such-pop"]).await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no POP named no-such-pop"), "{err}");
    assert!(
        err.contains(&c.node(1).grpc.to_string()),
        "names no node: {err}"
    );
}
