//! Loading tests: real files, real environment variables (with a per-test prefix).

use super::*;
use std::io::Write;

const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$xqddkAneAAkPHdk9q4OcQQ$3UjyZkIDoWnaglX2X7o0qPHm2jKnxE/t9WNtvcjdWFM";

fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("sealpost.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

fn minimal() -> String {
    format!(
        r#"
[server]
hostname = "relay.example.org"
state_dir = "/tmp/sp"

[[listeners]]
address = "127.0.0.1:2587"
mode = "starttls"

[[users]]
name = "app"
password_hash = "{HASH}"
allowed_senders = ["*@clinic.example"]
"#
    )
}

fn problems(err: ConfigError) -> Vec<Problem> {
    match err {
        ConfigError::Invalid { problems, .. } => problems,
        other => panic!("expected Invalid, got {other}"),
    }
}

#[test]
fn embedded_default_loads() {
    let c = Config::load_default().unwrap();
    assert_eq!(c.listeners.len(), 2);
    assert_eq!(c.listeners[0].address.port(), 2587);
    assert_eq!(c.listeners[1].mode, ListenerMode::Implicit);
    assert_eq!(c.queue.max_message_size.0, 40_000_000);
    assert_eq!(c.queue.max_recipients, 50);
    assert_eq!(c.policies["phi"].tls, TlsRequirement::Verified);
    assert_eq!(
        c.policies["phi"].on_failure,
        vec![
            FallbackStep::Hold(Duration::from_secs(4 * 3600)),
            FallbackStep::Bounce
        ]
    );
}

use std::time::Duration;

#[test]
fn minimal_file_gets_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, &minimal());
    let c = Config::load_with_env_prefix(&path, "SPTEST_NONE_").unwrap();
    assert!(c.policies.contains_key("phi"));
    assert_eq!(c.queue.retry.len(), 6);
    assert_eq!(c.queue.lifetime.0, Duration::from_secs(5 * 86_400));
    assert_eq!(c.queue_key_file(), PathBuf::from("/tmp/sp/queue.key"));
    assert_eq!(c.audit_path(), PathBuf::from("/tmp/sp/audit/audit.jsonl"));
}

#[test]
fn missing_file_is_named() {
    let err = Config::load(Path::new("/nonexistent/sealpost.toml")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/nonexistent/sealpost.toml"), "{text}");
}

#[test]
fn bad_duration_names_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal() + "\n[queue]\nlifetime = \"5 fortnights\"\n";
    let path = write(&dir, &text);
    let err = Config::load_with_env_prefix(&path, "SPTEST_NONE_").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("queue.lifetime"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("unknown unit"), "{msg}");
}

#[test]
fn bad_size_and_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        &(minimal() + "\n[queue]\nmax_message_size = \"40XB\"\n"),
    );
    let msg = Config::load_with_env_prefix(&path, "SPTEST_NONE_")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("queue.max_message_size") && msg.contains("unknown unit"),
        "{msg}"
    );

    let path = write(
        &dir,
        &(minimal() + "\n[queue]\nmax_mesage_size = \"40MB\"\n"),
    );
    let msg = Config::load_with_env_prefix(&path, "SPTEST_NONE_")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("max_mesage_size"), "{msg}");
}

#[test]
fn semantic_problems_name_each_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
[server]
hostname = "not a host"
state_dir = "/tmp/sp"

[[listeners]]
address = "127.0.0.1:2587"
mode = "starttls"

[[listeners]]
address = "127.0.0.1:2587"
mode = "implicit"

[[users]]
name = "app"
password_hash = "plaintext-password"
allowed_senders = ["clinic.example"]
policy = "nonexistent"

[queue]
max_recipients = 0
retry = []

[policies.phi]
tls = "verified"
on_failure = ["bounce", "hold:1h", "smarthost:nowhere", "portal"]
"#;
    let path = write(&dir, text);
    let ps = problems(Config::load_with_env_prefix(&path, "SPTEST_NONE_").unwrap_err());
    let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "server.hostname",
        "listeners[1].address",
        "users[0].password_hash",
        "users[0].allowed_senders[0]",
        "users[0].policy",
        "queue.max_recipients",
        "queue.retry",
        "policies.phi.on_failure[0]",
        "policies.phi.on_failure[2]",
        "policies.phi.on_failure[3]",
    ] {
        assert!(keys.contains(&k), "missing {k} in {keys:?}");
    }
    for p in &ps {
        assert!(p.origin.contains(&path.display().to_string()), "{p}");
    }
}

#[test]
fn plaintext_policy_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, &(minimal() + "\n[policies.open]\ntls = \"none\"\n"));
    let msg = Config::load_with_env_prefix(&path, "SPTEST_NONE_")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("policies.open.tls") || msg.contains("tls"),
        "{msg}"
    );
    assert!(
        msg.contains("verified") && msg.contains("encrypted"),
        "{msg}"
    );
}

#[test]
fn environment_overrides_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, &minimal());
    // A prefix unique to this test, so parallel tests do not see it.
    std::env::set_var("SPTEST_ENV1_QUEUE__MAX_RECIPIENTS", "7");
    std::env::set_var("SPTEST_ENV1_SERVER__HOSTNAME", "mx.example.net");
    let c = Config::load_with_env_prefix(&path, "SPTEST_ENV1_").unwrap();
    assert_eq!(c.queue.max_recipients, 7);
    assert_eq!(c.server.hostname, "mx.example.net");

    std::env::set_var("SPTEST_ENV2_QUEUE__MAX_RECIPIENTS", "0");
    let ps = problems(Config::load_with_env_prefix(&path, "SPTEST_ENV2_").unwrap_err());
    let p = ps.iter().find(|p| p.key == "queue.max_recipients").unwrap();
    assert_eq!(
        p.origin,
        "environment variable SPTEST_ENV2_QUEUE__MAX_RECIPIENTS"
    );
}

#[test]
fn fallback_steps_parse() {
    assert_eq!(
        FallbackStep::parse("hold:30m"),
        Ok(FallbackStep::Hold(Duration::from_secs(1800)))
    );
    assert_eq!(FallbackStep::parse("bounce"), Ok(FallbackStep::Bounce));
    assert_eq!(
        FallbackStep::parse("smarthost:relay"),
        Ok(FallbackStep::Smarthost("relay".into()))
    );
    assert!(FallbackStep::parse("hold").is_err());
    assert!(FallbackStep::parse("drop")
        .unwrap_err()
        .contains("not a fallback step"));
}

#[test]
fn smarthost_must_use_tls_and_verified_policy() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal()
        + r#"
[policies.weak]
tls = "encrypted"
on_failure = ["bounce"]

[smarthosts.relay]
host = "relay.partner.example"
port = 25
mode = "plain"
policy = "weak"
"#;
    let path = write(&dir, &text);
    let ps = problems(Config::load_with_env_prefix(&path, "SPTEST_NONE_").unwrap_err());
    let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"smarthosts.relay.mode"), "{keys:?}");
    assert!(keys.contains(&"smarthosts.relay.policy"), "{keys:?}");
}

#[test]
fn delivery_paused_defaults_off_parses_and_rejects_non_bool() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, &minimal());
    let c = Config::load_with_env_prefix(&path, "SPTEST_NONE_").unwrap();
    assert!(!c.delivery.paused);
    let path = write(&dir, &(minimal() + "\n[delivery]\npaused = true\n"));
    let c = Config::load_with_env_prefix(&path, "SPTEST_NONE_").unwrap();
    assert!(c.delivery.paused);
    let path = write(&dir, &(minimal() + "\n[delivery]\npaused = \"yes\"\n"));
    let err = Config::load_with_env_prefix(&path, "SPTEST_NONE_")
        .unwrap_err()
        .to_string();
    assert!(err.contains("paused"), "{err}");
}

#[test]
fn delay_notice_is_off_by_default_parses_and_must_be_shorter_than_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::load(&write(&dir, &minimal())).unwrap();
    assert_eq!(c.queue.delay_notice, None);
    let text = minimal() + "\n[queue]\ndelay_notice = \"4h\"\nlifetime = \"1d\"\n";
    let c = Config::load(&write(&dir, &text)).unwrap();
    assert_eq!(
        c.queue.delay_notice.map(|d| d.0),
        Some(Duration::from_secs(4 * 3600))
    );
    let text = minimal() + "\n[queue]\ndelay_notice = \"2d\"\nlifetime = \"1d\"\n";
    let p = problems(Config::load(&write(&dir, &text)).unwrap_err());
    assert!(p.iter().any(|p| p.key == "queue.delay_notice"), "{p:?}");
}

#[test]
fn delivery_connection_limits_are_bounded_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    for (n, ok) in [(0, false), (1, true), (10_000, true), (10_001, false)] {
        let text = format!(
            "{}\n[delivery]\nmax_connections = {n}\nmax_connections_per_domain = {n}\n",
            minimal()
        );
        let path = write(&dir, &text);
        let result = Config::load_with_env_prefix(&path, "SPTEST_NONE_");
        if ok {
            let c = result.unwrap();
            assert_eq!(c.delivery.max_connections, n);
            continue;
        }
        let ps = problems(result.unwrap_err());
        for key in [
            "delivery.max_connections",
            "delivery.max_connections_per_domain",
        ] {
            let p = ps
                .iter()
                .find(|p| p.key == key)
                .unwrap_or_else(|| panic!("{n}: no problem for {key} in {ps:?}"));
            assert!(p.origin.contains(&path.display().to_string()), "{p}");
        }
    }
}
