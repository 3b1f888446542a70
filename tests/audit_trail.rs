//! The audit trail written by real relay and agent processes: a scenario — an agent with a
//! wrong token, then the right one; a client the ACL denies; a burst over `per_source_rate`; a
//! completed transfer; a reload; the agent draining away; the relay stopping — leaves the
//! expected event codes in order, across rotated files, and `privlink audit verify` follows
//! them; then each tampering (a byte changed in a middle record, a record deleted, two
//! swapped, a line inserted, a rotated file removed) makes it fail naming the record. The
//! status API and `/metrics` show the last seq and hash. With `require = true`, a relay whose
//! disk refuses the trail's writes refuses new connections (`audit_unavailable`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use privlink_testbed::process::free_fixed_port;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `privlink_audit_records_total` count of `code` in a `/metrics` text (0 when absent).
fn records_of(metrics: &str, code: &str) -> u64 {
    let series = format!("privlink_audit_records_total{{code=\"{code}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |n| n.trim().parse().expect("count"))
}

/// Waits until the process behind `admin` has written at least `count` records of `code`.
fn wait_records(admin: &AdminProbe, code: &str, count: u64) {
    admin.wait("/metrics", |status, text| status == 200 && records_of(text, code) >= count);
}

/// Every record of a trail (rotated files oldest first, then the current one).
fn trail_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}.")))
        })
        .collect();
    files.sort();
    files.push(dir.join(name));
    files
}

fn records(files: &[PathBuf]) -> Vec<Value> {
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f).expect("read").lines().map(str::to_owned).collect::<Vec<_>>()
        })
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn verify(files: &[PathBuf], args: &[&str]) -> (i32, String) {
    let (code, out, err) = audit_verify(files, args);
    (code, out + &err)
}

/// The position of the first record after `from` that has every `(key, value)` of `want`.
fn find(records: &[Value], from: usize, want: &[(&str, &str)]) -> usize {
    records[from..]
        .iter()
        .position(|r| want.iter().all(|(k, v)| r[*k].as_str() == Some(*v)))
        .map(|i| from + i)
        .unwrap_or_else(|| {
            let events: Vec<String> =
                records.iter().map(|r| format!("{} {}", r["event"], r["outcome"])).collect();
            panic!("no record {want:?} after #{from} in:\n{}", events.join("\n"))
        })
}

/// A relay and agent's files: endpoint `e` at `endpoint` in front of `echo`, with `extra` —
/// lines after the endpoint's table, and the agent's settings.
fn echo_tunnel(
    dir: &Path,
    echo: std::net::SocketAddr,
    endpoint: std::net::SocketAddr,
    (endpoint_extra, agent_extra): (&str, &str),
) -> privlink_testbed::process::TunnelConfigs {
    write_tunnel_files(
        dir,
        &TunnelFiles {
            tunnel_listen: &loopback(free_fixed_port()).to_string(),
            endpoint: "e",
            endpoint_listen: &endpoint.to_string(),
            destination: &echo.to_string(),
            endpoint_extra,
            agent_extra,
            allow: &echo.to_string(),
            admin: (loopback(free_fixed_port()), loopback(free_fixed_port())),
        },
    )
}

fn rewrite(file: &Path, change: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> =
        std::fs::read_to_string(file).expect("read").lines().map(str::to_owned).collect();
    change(&mut lines);
    std::fs::write(file, lines.join("\n") + "\n").expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_leaves_its_events_in_order_and_verify_catches_each_tampering() {
    let echo = echo_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("audit")).expect("audit dir");
    let endpoint = loopback(free_fixed_port());
    let extra = (
        "per_source_rate = \"5/s\"\n[endpoint.acl]\ndeny = [\"127.0.0.9/32\"]\n\n\
                             [audit]\npath = \"audit/relay.jsonl\"\nrotate_size = \"2KiB\"\nperiodic = \"1s\"\n",
        "transport = \"quic\"\n[audit]\npath = \"audit/agent.jsonl\"\n",
    );
    let configs = echo_tunnel(dir.path(), echo, endpoint, extra);
    let relay_admin = AdminProbe::new(None, configs.relay_admin);
    let agent_admin = AdminProbe::new(None, configs.agent_admin);
    let relay = privlink(&["relay", "--config", &configs.relay]);
    tokio::task::block_in_place(|| relay_admin.wait_ready());

    // An agent with a wrong token first: refused, audited without the token.
    let agent_text = std::fs::read_to_string(&configs.agent).expect("agent.toml");
    std::fs::write(dir.path().join("certs/wrong"), "plk_wrong_0123456789abcdef0123456789abcdef")
        .expect("token");
    let wrong = dir.path().join("agent-wrong.toml");
    let wrong_text = agent_text
        .replace("certs/token", "certs/wrong")
        .replace("audit/agent.jsonl", "audit/wrong.jsonl")
        .replace(&configs.agent_admin.to_string(), &loopback(free_fixed_port()).to_string());
    std::fs::write(&wrong, wrong_text).expect("write");
    let mut impostor = privlink(&["agent", "--config", wrong.to_str().expect("utf-8")]);
    tokio::task::block_in_place(|| wait_records(&relay_admin, "PL2002", 1));
    impostor.kill_hard();

    let agent = privlink(&["agent", "--config", &configs.agent]);
    tokio::task::block_in_place(|| {
        agent_admin.wait_ready();
        let id = agent_admin.agent_status().id;
        relay_admin.wait_relay_status(|s| privlink_testbed::process::approved_by(s, &id, "e"));
        wait_records(&relay_admin, "PL2101", 1);
    });

    // Denied by the ACL, then a burst over the rate from one source.
    assert!(is_refused(connect_from("127.0.0.9", endpoint).await).await);
    let mut refused = 0;
    for _ in 0..20 {
        if is_refused(connect_from("127.0.0.2", endpoint).await).await {
            refused += 1;
        }
    }
    assert!(refused >= 10, "{refused} of 20 refused");

    // A completed transfer from another source.
    let payload = vec![7u8; 10_000];
    let mut socket = connect_from("127.0.0.3", endpoint).await.expect("connect");
    socket.write_all(&payload).await.expect("write");
    let mut echoed = vec![0u8; payload.len()];
    socket.read_exact(&mut echoed).await.expect("echo");
    drop(socket);
    tokio::task::block_in_place(|| {
        relay_admin.wait("/metrics", |_, text| {
            text.contains("privlink_relay_connections_total{endpoint=\"e\",outcome=\"completed\"} ")
                && records_of(text, "PL3003") > 20 - refused
        });
    });

    // A reload, then the agent drains away, then the relay stops.
    let relay_text = std::fs::read_to_string(&configs.relay).expect("relay.toml");
    std::fs::write(
        &configs.relay,
        relay_text.replace("per_source_rate = \"5/s\"", "per_source_rate = \"6/s\""),
    )
    .expect("write");
    let status =
        Command::new("kill").args(["-HUP", &relay.pid().to_string()]).status().expect("kill");
    assert!(status.success());
    tokio::task::block_in_place(|| wait_records(&relay_admin, "PL1002", 1));
    // Drained with a connection open, the agent waits for it: the relay hears the drain.
    let mut held = connect_from("127.0.0.4", endpoint).await.expect("connect");
    held.write_all(b"ping").await.expect("write");
    held.read_exact(&mut [0u8; 4]).await.expect("echo");
    agent.signal_terminate();
    tokio::task::block_in_place(|| wait_records(&relay_admin, "PL2004", 1));
    drop(held);
    let agent_exit = tokio::task::block_in_place(|| agent.wait_exit());
    assert!(agent_exit.success(), "{agent_exit:?}");
    tokio::task::block_in_place(|| wait_records(&relay_admin, "PL2003", 1));
    let status = tokio::task::block_in_place(|| relay_admin.relay_status());
    let anchored = status.audit.expect("the status API shows the trail");
    let relay_exit = relay.terminate();
    assert!(relay_exit.success(), "{relay_exit:?}");

    // The codes, in order.
    let audit = dir.path().join("audit");
    let files = trail_files(&audit, "relay.jsonl");
    assert!(files.len() >= 3, "rotated at 2 KiB: {files:?}");
    let all = records(&files);
    let mut at = find(&all, 0, &[("event", "trail.opened"), ("role", "relay")]);
    at = find(&all, at, &[("event", "config.loaded")]);
    at = find(&all, at, &[("event", "agent.auth_failed"), ("reason", "wrong_token")]);
    at = find(&all, at, &[("event", "agent.authenticated"), ("connector", "tunnel")]);
    at = find(&all, at, &[("event", "endpoint.status"), ("endpoint", "e"), ("status", "approved")]);
    at = find(&all, at, &[("event", "connection.denied"), ("outcome", "acl_denied")]);
    let rate = find(&all, at, &[("event", "connection.denied"), ("outcome", "rate_limited")]);
    assert!(all[rate]["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.2:")));
    let transfer = all
        .iter()
        .position(|r| r["event"] == "connection.closed" && r["bytes_from_client"] == 10_000)
        .expect("the transfer's closed record");
    let record = &all[transfer];
    assert_eq!(record["outcome"], "completed", "{record}");
    assert_eq!(record["destination"], echo.to_string());
    assert_eq!(record["bytes_to_client"], 10_000);
    let connection = record["connection"].as_u64().expect("number");
    assert!(
        all[..transfer]
            .iter()
            .any(|r| r["event"] == "connection.opened" && r["connection"] == connection)
    );
    at = find(&all, transfer, &[("event", "config.reloaded")]);
    at = find(&all, at, &[("event", "agent.draining")]);
    at = find(&all, at, &[("event", "agent.disconnected")]);
    let closed = find(&all, at, &[("event", "trail.closed")]);
    assert_eq!(closed, all.len() - 1, "trail.closed is the last record");
    let text: String = files.iter().map(|f| std::fs::read_to_string(f).expect("read")).collect();
    assert!(!text.contains("plk_"), "no token in the trail");
    assert!(anchored.last_seq <= all.len() as u64);

    // The agent's own trail: its link, the stream it carried, its stop.
    let agent_files = trail_files(&audit, "agent.jsonl");
    let agent_records = records(&agent_files);
    let mut at = find(&agent_records, 0, &[("event", "link.up")]);
    at = find(&agent_records, at, &[("event", "stream.closed"), ("outcome", "completed")]);
    find(&agent_records, at, &[("event", "trail.closed"), ("role", "agent")]);
    assert_eq!(verify(&agent_files, &[]).0, 0);

    // The whole trail follows, and ends where the status API said it was then or later.
    let last = all.last().expect("records")["hash"].as_str().expect("hash").to_owned();
    let (code, out) = verify(&files, &["--expect-last", &last]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{} records follow", all.len())), "{out}");
    let anchor_at = all.iter().position(|r| r["hash"] == anchored.last_hash.as_str());
    assert_eq!(anchor_at.map(|i| all[i]["seq"].as_u64()), Some(Some(anchored.last_seq)));

    // Each tampering is named by file and line.
    let copy = |name: &str| -> Vec<PathBuf> {
        let to = dir.path().join(name);
        std::fs::create_dir(&to).expect("dir");
        files
            .iter()
            .map(|f| {
                let target = to.join(f.file_name().expect("name"));
                std::fs::copy(f, &target).expect("copy");
                target
            })
            .collect()
    };
    let middle = |files: &[PathBuf]| files[1].clone();
    let edited = copy("edited");
    // One byte: the record's year.
    rewrite(&middle(&edited), |lines| {
        lines[1] = lines[1].replacen("\"time\":\"2", "\"time\":\"3", 1)
    });
    let (code, out) = verify(&edited, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{}:2:", middle(&edited).display())), "{out}");

    let deleted = copy("deleted");
    rewrite(&middle(&deleted), |lines| drop(lines.remove(1)));
    let (code, out) = verify(&deleted, &[]);
    assert!(
        code == 1 && out.contains(&format!("{}:2: does not follow", middle(&deleted).display())),
        "{out}"
    );

    let swapped = copy("swapped");
    rewrite(&middle(&swapped), |lines| lines.swap(0, 1));
    let (code, out) = verify(&swapped, &[]);
    assert!(
        code == 1 && out.contains(&format!("{}:1: does not follow", middle(&swapped).display())),
        "{out}"
    );

    let inserted = copy("inserted");
    let foreign =
        std::fs::read_to_string(&files[0]).expect("read").lines().next().expect("line").to_owned();
    rewrite(&middle(&inserted), |lines| lines.insert(1, foreign));
    let (code, out) = verify(&inserted, &[]);
    assert!(
        code == 1 && out.contains(&format!("{}:2: does not follow", middle(&inserted).display())),
        "{out}"
    );

    let mut missing = copy("missing");
    missing.remove(1);
    let (code, out) = verify(&missing, &[]);
    assert!(
        code == 1 && out.contains(&format!("{}:1: does not follow", missing[1].display())),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_a_relay_that_cannot_write_its_trail_refuses_new_connections() {
    let echo = echo_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = loopback(free_fixed_port());
    let extra = ("\n[audit]\npath = \"relay.jsonl\"\nrequire = true\n", "transport = \"tcp\"");
    let configs = echo_tunnel(dir.path(), echo, endpoint, extra);
    // The disk "fills" at 8 KiB: the kernel refuses writes past the file-size limit (EFBIG; the
    // signal that would kill the process is ignored, as a full disk would not send one).
    let script = format!(
        "trap '' XFSZ; ulimit -f 16; exec {} relay --config {}",
        common::BIN,
        configs.relay
    );
    let mut command = Command::new("sh");
    command.args(["-c", &script]);
    let relay = privlink_testbed::process::Running::spawn(command);
    let relay_admin = AdminProbe::new(None, configs.relay_admin);
    tokio::task::block_in_place(|| relay_admin.wait_ready());
    let agent = privlink(&["agent", "--config", &configs.agent]);
    let agent_admin = AdminProbe::new(None, configs.agent_admin);
    tokio::task::block_in_place(|| {
        agent_admin.wait_ready();
        let id = agent_admin.agent_status().id;
        relay_admin.wait_relay_status(|s| privlink_testbed::process::approved_by(s, &id, "e"));
    });

    let (mut served, mut refused) = (0, 0);
    for _ in 0..200 {
        if is_refused(connect_from("127.0.0.1", endpoint).await).await {
            refused += 1;
            if refused == 3 {
                break;
            }
        } else {
            served += 1;
        }
    }
    assert!(served > 0 && refused == 3, "served {served}, refused {refused}");
    let (_, metrics) = tokio::task::block_in_place(|| relay_admin.get("/metrics"));
    let count = |prefix: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map_or(0, |n| n.trim().parse::<u64>().expect("count"))
    };
    assert!(
        count("privlink_relay_connections_total{endpoint=\"e\",outcome=\"audit_unavailable\"} ")
            >= 3,
        "{metrics}"
    );
    assert!(count("privlink_audit_records_lost_total ") >= 1, "{metrics}");
    let status = tokio::task::block_in_place(|| relay_admin.relay_status());
    let trail = status.audit.expect("the trail in the status API");
    // Not `failing` itself: a small batch (a `trail.lost` record) may still fit below the
    // limit after a large one was cut off, and `failing` clears while it does.
    assert!(trail.require && trail.lost >= 1, "{trail:?}");
    assert!(status.ready, "the relay keeps running");
    // What is on disk still follows.
    let (code, out) = verify(&[dir.path().join("relay.jsonl")], &[]);
    assert_eq!(code, 0, "{out}");
    drop(agent);
    drop(relay);
}
