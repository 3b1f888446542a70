//! The Azure SDK for Python (`azure-keyvault-secrets` from PyPI) reaching two vaults through one
//! shared :443 by their real names, as a key orchestrator would once split-horizon DNS points
//! `<vault>.vault.azure.net` at the relay: the client runs with its own `/etc/hosts` (a private
//! mount namespace), trusts the test CA that issued the vaults' certificates, and keeps the
//! SDK's challenge-resource verification on — it checks that the bearer challenge's resource
//! (`vault.azure.net`) matches the name it connected to, which only works by the vault's name.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;
use privlink_agent::config::TransportChoice;

const VAULTS: [&str; 2] = ["contoso-kv.vault.azure.net", "fabrikam-kv.vault.azure.net"];
/// The relay's shared listener: port 443, as the SDK's challenge check wants the default
/// port, on a loopback address of the test's own (one per transport: both run at once) so no
/// other service's :443 is in the way.
fn shared_port(transport: TransportChoice) -> SocketAddr {
    let last = if transport == TransportChoice::Quic { 1 } else { 2 };
    SocketAddr::from(([127, 77, 0, last], 443))
}

const SCRIPT: &str = r#"
import sys, time
from azure.core.credentials import AccessToken
from azure.keyvault.secrets import SecretClient

class StaticToken:
    """Stands in for Entra ID: the vault stand-in accepts this token."""
    def get_token(self, *scopes, **kwargs):
        return AccessToken("test-token", int(time.time()) + 3600)

for name in sys.argv[1:]:
    client = SecretClient(f"https://{name}", StaticToken())  # verify_challenge_resource stays on
    print(client.get_secret("db-password").value)
"#;

async fn the_azure_sdk_reaches_two_vaults_by_their_own_names(transport: TransportChoice) {
    let installed = Command::new("python3")
        .args(["-c", "import azure.keyvault.secrets"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed,
        "azure-keyvault-secrets is not installed: pip install azure-keyvault-secrets (.ci/run does)"
    );
    let ca = privlink_transport::pki::CertificateAuthority::new("Test Vault CA").expect("CA");
    let mut endpoints = Vec::new();
    let mut allow = Vec::new();
    let mut routes = Vec::new();
    for (i, name) in VAULTS.iter().enumerate() {
        let vault = vault::https_key_vault(&ca, name).await;
        let mut spec = endpoint(&format!("kv{i}"), vault);
        spec.listener = Some("vaults".to_owned());
        spec.server_names = vec![(*name).to_owned()];
        routes.push(((*name).to_owned(), spec.name.clone()));
        endpoints.push(spec);
        allow.push(rule_for(vault));
    }
    let shared = shared_port(transport);
    let routes: Vec<(&str, &str)> = routes.iter().map(|(n, e)| (n.as_str(), e.as_str())).collect();
    let mut listener = listener("vaults", &routes);
    listener.listen = shared;
    let harness = Harness::start_with(endpoints, vec![listener], None).await;
    let agent = harness.spawn_agent(harness.agent_config(transport, &allow));
    harness.wait_approved("kv0").await;
    harness.wait_approved("kv1").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    let mut entries = "127.0.0.1 localhost\n".to_owned();
    for name in VAULTS {
        entries.push_str(&format!("{} {name}\n", shared.ip()));
    }
    std::fs::write(&hosts, entries).expect("hosts");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.identity.cert_pem).expect("ca");
    let out = tokio::task::block_in_place(|| {
        Command::new("unshare")
            .args([
                "--mount",
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/hosts && exec python3 -c \"$1\" \"$2\" \"$3\"",
            ])
            .args([hosts.to_str().expect("utf-8"), SCRIPT, VAULTS[0], VAULTS[1]])
            .env("REQUESTS_CA_BUNDLE", &ca_file)
            .output()
            .expect("unshare (util-linux)")
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the SDK failed: {stdout}{stderr}");
    let got: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        got,
        VAULTS.iter().map(|v| format!("{v}/db-password")).collect::<Vec<_>>(),
        "each vault answered by its own name: {stderr}"
    );
    harness.shutdown(&[agent]).await;
}

on_both_transports!(the_azure_sdk_reaches_two_vaults_by_their_own_names);
