//! What every relay link, session and stream of the agent shares ([`AgentShared`]): the
//! configuration, the stream policy, the dialler, the shutdown and force tokens, the links'
//! status and metrics, the token in force and the signal that the rules changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use privlink_protocol::token::Token;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AgentConfig;
use crate::dialer::RelayDialer;
use crate::forward::StreamPolicy;
use crate::metrics::AgentMetrics;
use crate::status::AgentStatus;

/// State every link and stream of the agent shares.
#[derive(Debug)]
pub(crate) struct AgentShared {
    pub(crate) config: AgentConfig,
    pub(crate) policy: Arc<StreamPolicy>,
    pub(crate) agent_id: String,
    /// Dials relays on either transport.
    pub(crate) dialer: RelayDialer,
    /// Stop dialling and accepting streams.
    pub(crate) shutdown: CancellationToken,
    /// Abort streams still running after the grace period.
    pub(crate) force: CancellationToken,
    /// Each relay link's state, for the admin listener.
    pub(crate) status: Arc<AgentStatus>,
    pub(crate) metrics: Arc<AgentMetrics>,
    /// The connector token in force (a reload re-reads the file); presented at each hello.
    pub(crate) token: RwLock<Token>,
    /// Bumped when a reload changes the allowlist: sessions judge their endpoints again.
    pub(crate) rules_changed: watch::Sender<u64>,
    /// Each configured relay's links, by the relay as written, and the token that retires it.
    pub(crate) relays: Mutex<HashMap<String, CancellationToken>>,
    /// Every relay's link tasks.
    pub(crate) links: TaskTracker,
}

impl AgentShared {
    /// The token to present.
    pub(crate) fn token(&self) -> Token {
        self.token.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// A random id for this process (or a `check` session), in hex.
pub(crate) fn random_id() -> String {
    let mut bytes = [0u8; 8];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return "unknown".to_owned();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
