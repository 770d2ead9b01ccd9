//! Black-box tests of submission (issue 2): the real `sealpost serve`, real sockets, real TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use sealpost_tests::*;
use std::time::Duration;

const FROM: &str = "billing@clinic.example";
const TO: &str = "patient@example.net";

/// EHLO, STARTTLS, EHLO, AUTH PLAIN as the default user on the STARTTLS listener.
async fn authed(relay: &Relay) -> SmtpClient {
    let mut c = SmtpClient::connect(relay.starttls).await.unwrap();
    c.greeting().await.unwrap();
    c.ehlo("client.test").await.unwrap();
    c.starttls(relay.ca_pem(), RELAY_HOSTNAME).await.unwrap();
    c.ehlo("client.test").await.unwrap();
    c.auth_plain(DEFAULT_USER, DEFAULT_PASSWORD)
        .await
        .unwrap()
        .assert(235, "2.7.0");
    c
}

#[tokio::test]
async fn raw_client_submits_over_starttls() {
    let relay = Relay::start(RelayConfig::default());
    let mut c = authed(&relay).await;
    let reply = c
        .submit(FROM, &[TO], &message(FROM, TO, "hello", "body"))
        .await
        .unwrap();
    let id = queue_id_of(&reply).unwrap_or_else(|| panic!("not 250 Ok <id>: {reply}"));
    assert_eq!(relay.queue_ids(), vec![id]);
    let _ = Duration::ZERO;
}
