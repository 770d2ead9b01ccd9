//! Issue 3's admin side on the real binary: `sealpost queue …` through the admin socket while
//! `serve` runs and directly on the store when it does not, every action audited, and key
//! rotation with `queue rekey`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use sealpost_tests::*;
use std::os::unix::fs::PermissionsExt;

const FROM: &str = "billing@clinic.example";
const TO: &str = "patient@example.net";

async fn submit_one(relay: &Relay, subject: &str) -> String {
    let mut c = SmtpClient::connect(relay.starttls).await.unwrap();
    c.greeting().await.unwrap();
    c.ehlo("client.test").await.unwrap();
    c.starttls(relay.ca_pem(), RELAY_HOSTNAME).await.unwrap();
    c.ehlo("client.test").await.unwrap();
    c.auth_plain(DEFAULT_USER, DEFAULT_PASSWORD)
        .await
        .unwrap()
        .assert(235, "2.7.0");
    let r = c
        .submit(FROM, &[TO], &message(FROM, TO, subject, "body"))
        .await
        .unwrap();
    queue_id_of(&r).unwrap_or_else(|| panic!("not queued: {r}"))
}

fn cli_ok(relay: &Relay, args: &[&str]) -> String {
    let out = relay.cli(args);
    assert!(
        out.status.success(),
        "sealpost {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_operations_work_live_and_offline_and_are_audited() {
    let mut relay = Relay::start(RelayConfig::default());
    let a = submit_one(&relay, "first").await;
    let b = submit_one(&relay, "second").await;

    // The admin socket is private to the relay's user.
    let sock = relay.state_dir().join("admin.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode");

    let list = cli_ok(&relay, &["queue", "list"]);
    assert!(list.contains(&a) && list.contains(&b), "{list}");
    let show = relay.queue_json(&["show", &a]);
    assert_eq!(show["id"], a.as_str());
    assert!(
        !show.to_string().contains("body"),
        "show never prints the body: {show}"
    );

    cli_ok(&relay, &["queue", "hold", &a]);
    let show = relay.queue_json(&["show", &a]);
    assert!(show.to_string().contains("AdminHold"), "{show}");
    cli_ok(&relay, &["queue", "release", &a]);
    cli_ok(&relay, &["queue", "retry", &a]);
    cli_ok(&relay, &["queue", "delete", &b]);
    assert_eq!(relay.queue_ids(), vec![a.clone()]);
    let stats = relay.queue_json(&["stats"]);
    assert_eq!(stats["messages"], 1, "{stats}");

    // Unknown ids and malformed ids are clear errors.
    let out = relay.cli(&["queue", "show", "not-an-id"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a queue id"));

    let admin: Vec<String> = relay
        .audit_lines()
        .iter()
        .filter(|v| v["event"] == "admin")
        .map(|v| format!("{} {}", v["detail"]["action"], v["queue_id"]))
        .collect();
    for action in [
        "list", "show", "stats", "hold", "release", "retry", "delete",
    ] {
        assert!(
            admin.iter().any(|l| l.contains(action)),
            "no audited {action}: {admin:?}"
        );
    }

    // With the relay stopped the CLI opens the store itself.
    assert!(tokio::task::block_in_place(|| relay.sigterm()).success());
    let list = cli_ok(&relay, &["queue", "list", "--json"]);
    assert!(list.contains(&a), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_with_rekey() {
    let mut relay = Relay::start(RelayConfig::default());
    let a = submit_one(&relay, "under the old key").await;
    assert!(tokio::task::block_in_place(|| relay.sigterm()).success());

    // New primary key; the old one becomes a previous key.
    let state = relay.state_dir();
    let old = state.join("old.key");
    std::fs::rename(state.join("queue.key"), &old).unwrap();
    let new_key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    std::fs::write(state.join("queue.key"), new_key).unwrap();
    std::fs::set_permissions(
        state.join("queue.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let config = std::fs::read_to_string(relay.config_path()).unwrap();
    let with_previous = config.replacen(
        "[queue]\n",
        &format!("[queue]\nprevious_key_files = [\"{}\"]\n", old.display()),
        1,
    );
    std::fs::write(relay.config_path(), &with_previous).unwrap();
    tokio::task::block_in_place(|| relay.restart());
    let b = submit_one(&relay, "under the new key").await;
    let out = cli_ok(&relay, &["queue", "rekey"]);
    assert!(out.contains("re-encrypted"), "{out}");
    assert!(
        relay
            .audit_lines()
            .iter()
            .any(|v| v["event"] == "admin" && v["detail"]["action"] == "rekey"),
        "rekey is audited"
    );

    // After rekey the old key can go.
    assert!(tokio::task::block_in_place(|| relay.sigterm()).success());
    std::fs::write(relay.config_path(), &config).unwrap();
    std::fs::remove_file(&old).unwrap();
    tokio::task::block_in_place(|| relay.restart());
    let mut ids = relay.queue_ids();
    ids.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(ids, want, "both messages readable with only the new key");
}

#[test]
fn a_group_readable_key_is_refused_naming_path_and_mode() {
    let mut relay = Relay::start(RelayConfig::default());
    assert!(relay.sigterm().success());
    let key = relay.state_dir().join("queue.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = run_sealpost(
        &["serve", "--config", relay.config_path().to_str().unwrap()],
        &[],
        b"",
    );
    assert!(!out.status.success(), "serve must refuse a 0640 key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&key.display().to_string()) && err.contains("640"),
        "{err}"
    );
}

/// A queued record changed on disk fails AES-GCM authentication: the relay moves it aside, never
/// delivers it, counts it, and records an audit `quarantined` event naming its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_record_is_quarantined_and_audited() {
    let mut relay = Relay::start(RelayConfig::default().queue("retry", "[\"1s\"]"));
    let id = submit_one(&relay, "to be tampered with").await;
    assert!(tokio::task::block_in_place(|| relay.sigterm()).success());

    // Sealed records start with version 1 and the 8-byte key id (SHA-256 of the key); flip a
    // ciphertext byte of each one in the store file.
    let key = std::fs::read(relay.state_dir().join("queue.key")).unwrap();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &key);
    let mut prefix = vec![1u8];
    prefix.extend_from_slice(&digest.as_ref()[..8]);
    let store = relay.state_dir().join("queue").join("queue.redb");
    let mut bytes = std::fs::read(&store).unwrap();
    let starts: Vec<usize> = bytes
        .windows(prefix.len())
        .enumerate()
        .filter(|(_, w)| *w == prefix.as_slice())
        .map(|(i, _)| i)
        .collect();
    assert!(starts.len() >= 2, "found {} sealed records", starts.len());
    for s in &starts {
        bytes[s + prefix.len() + 12 + 3] ^= 0x40; // past the nonce: inside the ciphertext
    }
    std::fs::write(&store, bytes).unwrap();

    tokio::task::block_in_place(|| relay.restart());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let found = relay
            .audit_lines()
            .iter()
            .any(|v| v["event"] == "quarantined" && v["queue_id"] == id.as_str());
        if found {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no quarantined record:\n{}",
            relay.log_tail(20)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        relay.queue_ids().is_empty(),
        "the tampered message is not listed"
    );
    assert_eq!(relay.queue_json(&["stats"])["quarantined"], 1);
    assert!(
        !relay
            .audit_lines()
            .iter()
            .any(|v| v["event"] == "attempt" && v["queue_id"] == id.as_str()),
        "never delivered"
    );
}

/// A store file that is not a redb database stops the relay at start with an error naming it.
#[test]
fn a_corrupt_store_is_refused_at_start_naming_the_file() {
    let mut relay = Relay::start(RelayConfig::default());
    assert!(relay.sigterm().success());
    let store = relay.state_dir().join("queue").join("queue.redb");
    std::fs::write(&store, vec![0x5a; 64 * 1024]).unwrap();
    let out = run_sealpost(
        &["serve", "--config", relay.config_path().to_str().unwrap()],
        &[],
        b"",
    );
    assert!(!out.status.success(), "serve must refuse a corrupt store");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&store.display().to_string()),
        "names the file: {err}"
    );
}
