//! Peers played by hand for the attack and failover tests: dialling the relay as an agent,
//! the agent's part of the handshake, and [`FakeAgent`] — an authenticated agent that approves
//! an endpoint and then misbehaves on its data streams and control stream as told.

use std::sync::Arc;
use std::time::Duration;

use privlink_protocol::frame::MAX_BODY_LEN;
use privlink_protocol::message::{
    Control, EndpointVerdict, Hello, MAX_OPEN_BODY, Open, OpenFailCode, OpenFailure, OpenReply,
    PROTOCOL_VERSION, Verdict,
};
use privlink_protocol::token::Token;
use privlink_transport::io::{FrameReader, read_frame, write_frame};
use privlink_transport::tls;
use privlink_transport::tunnel::{AgentConnection, ResetCode, TransportKind, TunnelStream};
use privlink_transport::{h2, quic};
use tokio::task::JoinHandle;

use super::inproc::{CONNECTOR, Harness, WAIT};
use privlink_transport::limits::STREAM_RECEIVE_WINDOW as WINDOW;

/// Dials the harness's relay as an agent would, on `transport`.
pub async fn dial_relay(
    harness: &Harness,
    transport: TransportKind,
) -> Result<AgentConnection, String> {
    let client_tls = tls_for(harness);
    let relay = harness.relay.tunnel_addr();
    match transport {
        TransportKind::Quic => {
            let endpoint =
                quic::agent_endpoint("127.0.0.1:0".parse().expect("addr"), client_tls, WINDOW)
                    .expect("endpoint");
            quic::dial(&endpoint, relay, "localhost", WAIT).await.map_err(|e| e.to_string())
        }
        TransportKind::Tcp => {
            h2::dial(relay, None, "localhost", Arc::new(client_tls), WINDOW, WAIT)
                .await
                .map(AgentConnection::from)
                .map_err(|e| e.to_string())
        }
    }
}

/// Plays the agent's part of the control handshake on `connection` up to the relay's answer to
/// the hello; returns the control stream, the answer and how long it took after the hello.
pub async fn hello_on(
    connection: &AgentConnection,
    connector: &str,
    token: &str,
    agent_name: &str,
) -> Result<(TunnelStream, Control, Duration), String> {
    let mut control = connection.accept_stream().await.map_err(|e| e.to_string())?;
    let relay_hello: Control =
        read_frame(&mut control, MAX_BODY_LEN, WAIT).await.map_err(|e| e.to_string())?;
    assert!(matches!(relay_hello, Control::RelayHello { protocol_version: PROTOCOL_VERSION, .. }));
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        connector: connector.to_owned(),
        token: Token::new(token),
        agent_name: agent_name.into(),
        agent_id: "raw".into(),
        software_version: "test".into(),
        allowed: vec![],
    };
    let sent = std::time::Instant::now();
    write_frame(&mut control, &Control::Hello(hello)).await.map_err(|e| e.to_string())?;
    let answer = read_frame(&mut control, MAX_BODY_LEN, WAIT).await.map_err(|e| e.to_string())?;
    Ok((control, answer, sent.elapsed()))
}

/// The TLS settings an agent of `harness` dials with.
pub fn tls_for(harness: &Harness) -> rustls::ClientConfig {
    tls::tunnel_client_config(
        std::slice::from_ref(&harness.pki.ca.identity.cert_der),
        Default::default(),
    )
    .expect("tls")
}

/// What a [`FakeAgent`] does with the relay's open requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOpen {
    /// Answers `OpenFailed` with a code another agent might not hit (`refused`).
    FailRefused,
    /// Answers `OpenFailed` with a policy refusal (`not-allowed`), which every agent would give.
    FailNotAllowed,
    /// Resets the stream without answering.
    Reset,
    /// Reads the open and never answers (its control stream stays alive).
    Ignore,
}

/// An authenticated agent played by hand that approves endpoint `e` and then treats open
/// requests as [`OnOpen`] says. With `answers_heartbeats` false it never reads its control
/// stream again — a frozen process whose transport connection still looks alive.
pub struct FakeAgent {
    task: JoinHandle<()>,
}

impl FakeAgent {
    /// Connects over `transport`, approves `e` and waits until the relay has the approval.
    pub async fn start(
        harness: &Harness,
        transport: TransportKind,
        on_open: OnOpen,
        answers_heartbeats: bool,
    ) -> Self {
        let approve = EndpointVerdict { endpoint: "e".into(), verdict: Verdict::Approved };
        Self::judging(harness, transport, approve, on_open, answers_heartbeats).await
    }

    /// [`FakeAgent::start`] with another verdict (say, a rejection whose reason is hostile
    /// text): waits until the relay has it.
    pub async fn judging(
        harness: &Harness,
        transport: TransportKind,
        verdict: EndpointVerdict,
        on_open: OnOpen,
        answers_heartbeats: bool,
    ) -> Self {
        let connection = dial_relay(harness, transport).await.expect("dial");
        let (mut control, welcome, _) =
            hello_on(&connection, CONNECTOR, &harness.token, "fake").await.expect("hello");
        assert!(matches!(welcome, Control::Welcome { .. }), "{welcome:?}");
        connection.allow_data_streams();
        let expected = verdict.clone();
        write_frame(&mut control, &Control::Verdicts(vec![verdict])).await.expect("verdicts");
        harness
            .relay
            .wait_for_agents(CONNECTOR, WAIT, |agents| {
                agents.iter().any(|a| {
                    a.name == "fake"
                        && a.verdicts
                            .iter()
                            .any(|(e, v)| *e == expected.endpoint && *v == expected.verdict)
                })
            })
            .await;
        let task = tokio::spawn(async move {
            let mut frames = FrameReader::new();
            let mut held: Vec<TunnelStream> = Vec::new();
            loop {
                tokio::select! {
                    stream = connection.accept_stream() => {
                        let Ok(mut stream) = stream else { return };
                        let Ok(_open) = read_frame::<Open, _>(&mut stream, MAX_OPEN_BODY, WAIT).await
                        else { continue };
                        match on_open {
                            OnOpen::FailRefused | OnOpen::FailNotAllowed => {
                                let code = if on_open == OnOpen::FailRefused {
                                    OpenFailCode::Refused
                                } else {
                                    OpenFailCode::NotAllowed
                                };
                                let failure = OpenFailure { code, message: "fake agent".into() };
                                let _ = write_frame(&mut stream, &OpenReply::Failed(failure)).await;
                                let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
                                // As a real agent does: keep the stream until the relay ends
                                // it, so no reset overtakes the answer.
                                tokio::spawn(async move {
                                    let mut sink = [0u8; 1024];
                                    let read = async {
                                        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {
                                            if n == 0 {
                                                break;
                                            }
                                        }
                                    };
                                    let _ = tokio::time::timeout(WAIT, read).await;
                                });
                            }
                            OnOpen::Reset => stream.reset(ResetCode::PeerReset),
                            OnOpen::Ignore => held.push(stream),
                        }
                    }
                    frame = frames.next::<Control, _>(&mut control, MAX_BODY_LEN), if answers_heartbeats => {
                        match frame {
                            Ok(Control::Heartbeat { .. }) => {
                                if write_frame(&mut control, &Control::HeartbeatAck).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                }
            }
        });
        Self { task }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}
