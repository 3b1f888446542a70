//! `privlink status [--admin URL] [--token-file F] [--json]`: asks a relay's or an agent's admin
//! listener for its status and prints it as tables — a relay's endpoints and agents, an agent's
//! relay links and verdicts — or as the JSON it came as. Exit 69 when nothing answers.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use privlink_admin::snapshot::{AgentStatus, RelayStatus, StatusSnapshot, VerdictView};

use super::Unavailable;

/// How long the admin listener may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn run(admin: &str, token_file: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let token = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the admin token from {}", path.display()))?;
            let token = privlink_protocol::token::token_in_file(&text)
                .map_err(|problem| anyhow::anyhow!("{}: {problem}", path.display()))?;
            Some(token.to_owned())
        }
        None => None,
    };
    let (code, body) =
        privlink_admin::client::get(admin, "/api/v1/status", token.as_deref(), TIMEOUT)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
    match code {
        200 => {}
        401 => bail!("{admin} wants the admin token: pass --token-file"),
        other => bail!("{admin} answered {other}: {}", body.trim()),
    }
    if json {
        print!("{body}");
        return Ok(());
    }
    let status: StatusSnapshot =
        serde_json::from_str(&body).context("the answer is not a privlink status")?;
    print!("{}", render(&status));
    Ok(())
}

/// The status as tables, by role.
fn render(status: &StatusSnapshot) -> String {
    match status {
        StatusSnapshot::Relay(relay) => render_relay(relay),
        StatusSnapshot::Agent(agent) => render_agent(agent),
    }
}

/// A cell for something that may be absent.
fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

/// A verdict in words, with the reason of a rejection.
fn verdict_text(verdict: &VerdictView) -> String {
    match verdict {
        VerdictView::Approved => "Approved".to_owned(),
        VerdictView::Rejected { reason } => format!("Rejected ({reason})"),
    }
}

/// Lays rows out in columns as wide as their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn render_relay(status: &RelayStatus) -> String {
    let endpoints: Vec<Vec<String>> = status
        .endpoints
        .iter()
        .map(|e| {
            let mut state = e.status.clone();
            if let Some(reason) = &e.reason {
                let _ = write!(state, " ({reason})");
            }
            vec![
                e.name.clone(),
                state,
                if e.approving_agents.is_empty() {
                    "-".to_owned()
                } else {
                    e.approving_agents.join(",")
                },
                e.active_connections.to_string(),
                e.total_connections.to_string(),
                e.destination.clone(),
            ]
        })
        .collect();
    let agents: Vec<Vec<String>> = status
        .agents
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.connector.clone(),
                a.transport.clone(),
                a.active_streams.to_string(),
                if a.draining { "yes" } else { "no" }.to_owned(),
                a.remote.clone(),
                a.version.clone(),
            ]
        })
        .collect();
    let mut out =
        table(&["ENDPOINT", "STATUS", "AGENTS", "ACTIVE", "TOTAL", "DESTINATION"], &endpoints);
    out.push('\n');
    if agents.is_empty() {
        out.push_str("no agents connected\n");
    } else {
        out.push_str(&table(
            &["AGENT", "CONNECTOR", "TRANSPORT", "STREAMS", "DRAINING", "REMOTE", "VERSION"],
            &agents,
        ));
    }
    if let Some(reason) = &status.not_ready_reason {
        let _ = writeln!(out, "\nnot ready: {reason}");
    }
    if let Some(fleet) = &status.fleet {
        let _ = writeln!(
            out,
            "\nrelay {} of a fleet of {}: {}",
            fleet.id,
            fleet.members.len(),
            fleet.members.join(", ")
        );
    }
    out
}

fn render_agent(status: &AgentStatus) -> String {
    let mut verdicts = Vec::new();
    let links: Vec<Vec<String>> = status
        .links
        .iter()
        .map(|l| {
            for (endpoint, verdict) in &l.verdicts {
                verdicts.push(vec![l.relay.clone(), endpoint.clone(), verdict_text(verdict)]);
            }
            vec![
                match &l.relay_id {
                    Some(id) => format!("{} -> {id}", l.relay),
                    None => l.relay.clone(),
                },
                l.address.clone(),
                l.state.clone(),
                or_dash(l.transport.as_deref()),
                l.active_streams.to_string(),
                or_dash(l.last_error.as_deref()),
            ]
        })
        .collect();
    let mut out = format!(
        "agent {} (connector {}): {}\n\n",
        status.name,
        status.connector,
        if status.ready { "ready" } else { "not ready" }
    );
    out.push_str(&table(
        &["RELAY", "ADDRESS", "STATE", "TRANSPORT", "STREAMS", "LAST ERROR"],
        &links,
    ));
    if !verdicts.is_empty() {
        out.push('\n');
        out.push_str(&table(&["RELAY", "ENDPOINT", "VERDICT"], &verdicts));
    }
    if !status.fleets.is_empty() {
        let fleets: Vec<Vec<String>> = status
            .fleets
            .iter()
            .map(|f| {
                vec![
                    f.relay.clone(),
                    f.members.len().to_string(),
                    f.reached.len().to_string(),
                    if f.missing.is_empty() { "-".to_owned() } else { f.missing.join(", ") },
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(&["RELAY", "FLEET", "REACHED", "MISSING"], &fleets));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_status_prints_as_two_tables() {
        let status = serde_json::json!({
            "role": "relay",
            "version": "0.1.0",
            "ready": true,
            "pending_tunnel_connections": 0,
            "endpoints": [
                { "name": "kv", "status": "Approved", "reason": null, "approving_agents": ["a1"],
                  "active_connections": 2, "total_connections": 10, "destination": "kv.example:443",
                  "listen": "0.0.0.0:8443", "connector": "east" },
                { "name": "db", "status": "Rejected", "reason": "not in the allowlist",
                  "approving_agents": [], "active_connections": 0, "total_connections": 0,
                  "destination": "db.example:5432", "listen": "0.0.0.0:8444", "connector": "east" }
            ],
            "agents": [ { "name": "a1", "connector": "east", "transport": "quic",
                          "active_streams": 2, "draining": false, "remote": "10.0.0.9:5000",
                          "version": "0.1.0", "id": "1", "connected_since_unix": 1,
                          "verdicts": {} } ]
        });
        let status: StatusSnapshot = serde_json::from_value(status).expect("a relay status");
        let out = render(&status);
        let lines: Vec<&str> = out.lines().collect();
        // Columns line up under their headers.
        let agents_column = lines[0].find("AGENTS").expect("header");
        assert_eq!(lines[1].find("a1"), Some(agents_column), "{out}");
        assert_eq!(lines[2].find(" -").map(|i| i + 1), Some(agents_column), "{out}");
        assert!(lines[1].starts_with("kv  ") && lines[1].contains("Approved"), "{out}");
        assert!(lines[2].contains("Rejected (not in the allowlist)"), "{out}");
        assert!(lines[1].ends_with("kv.example:443"), "{out}");
        let agent_row = lines.iter().find(|l| l.starts_with("a1 ")).expect("agent row");
        let cells: Vec<&str> = agent_row.split_whitespace().collect();
        assert_eq!(cells, ["a1", "east", "quic", "2", "no", "10.0.0.9:5000", "0.1.0"], "{out}");
    }
}
