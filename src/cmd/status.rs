//! `privlink status [--admin URL] [--token-file F] [--json]`: asks a relay's or an agent's admin
//! listener for its status and prints it as tables — a relay's endpoints and agents, an agent's
//! relay links and verdicts — or as the JSON it came as. Exit 69 when nothing answers.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

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
    let status: Value = serde_json::from_str(&body).context("the status is not JSON")?;
    print!("{}", render(&status));
    Ok(())
}

/// The status as tables, by role.
fn render(status: &Value) -> String {
    match status["role"].as_str() {
        Some("agent") => render_agent(status),
        _ => render_relay(status),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn items(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
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

fn render_relay(status: &Value) -> String {
    let endpoints: Vec<Vec<String>> = items(&status["endpoints"])
        .iter()
        .map(|e| {
            let mut state = text(&e["status"]);
            if let Some(reason) = e["reason"].as_str() {
                let _ = write!(state, " ({reason})");
            }
            let agents: Vec<String> = items(&e["approving_agents"]).iter().map(text).collect();
            vec![
                text(&e["name"]),
                state,
                if agents.is_empty() { "-".to_owned() } else { agents.join(",") },
                text(&e["active_connections"]),
                text(&e["total_connections"]),
                text(&e["destination"]),
            ]
        })
        .collect();
    let agents: Vec<Vec<String>> = items(&status["agents"])
        .iter()
        .map(|a| {
            vec![
                text(&a["name"]),
                text(&a["connector"]),
                text(&a["transport"]),
                text(&a["active_streams"]),
                if a["draining"].as_bool() == Some(true) { "yes" } else { "no" }.to_owned(),
                text(&a["remote"]),
                text(&a["version"]),
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
    out
}

fn render_agent(status: &Value) -> String {
    let mut verdicts = Vec::new();
    let links: Vec<Vec<String>> = items(&status["links"])
        .iter()
        .map(|l| {
            if let Some(all) = l["verdicts"].as_object() {
                for (endpoint, v) in all {
                    let mut verdict = text(&v["verdict"]);
                    if let Some(reason) = v["reason"].as_str() {
                        let _ = write!(verdict, " ({reason})");
                    }
                    verdicts.push(vec![text(&l["relay"]), endpoint.clone(), verdict]);
                }
            }
            vec![
                text(&l["relay"]),
                text(&l["address"]),
                text(&l["state"]),
                text(&l["transport"]),
                text(&l["active_streams"]),
                text(&l["last_error"]),
            ]
        })
        .collect();
    let mut out = format!(
        "agent {} (connector {}): {}\n\n",
        text(&status["name"]),
        text(&status["connector"]),
        if status["ready"].as_bool() == Some(true) { "ready" } else { "not ready" }
    );
    out.push_str(&table(
        &["RELAY", "ADDRESS", "STATE", "TRANSPORT", "STREAMS", "LAST ERROR"],
        &links,
    ));
    if !verdicts.is_empty() {
        out.push('\n');
        out.push_str(&table(&["RELAY", "ENDPOINT", "VERDICT"], &verdicts));
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
            "endpoints": [
                { "name": "kv", "status": "Approved", "reason": null, "approving_agents": ["a1"],
                  "active_connections": 2, "total_connections": 10, "destination": "kv.example:443" },
                { "name": "db", "status": "Rejected", "reason": "not in the allowlist",
                  "approving_agents": [], "active_connections": 0, "total_connections": 0,
                  "destination": "db.example:5432" }
            ],
            "agents": [ { "name": "a1", "connector": "east", "transport": "quic",
                          "active_streams": 2, "draining": false, "remote": "10.0.0.9:5000",
                          "version": "0.1.0" } ]
        });
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
