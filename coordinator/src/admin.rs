//! The operator's admin API: what the leader is asked ([`AdminRequest`]), the handle a server
//! asks through ([`AdminHandle`]), and the `moebius.v1.Admin` gRPC service over it
//! ([`service`]).
//!
//! Requests go to the leader loop over a channel and are answered between its other work, so
//! an admin command sees (and changes) exactly the state the leader acts on. A coordinator
//! that does not lead answers from its [`Role`]: a standby names the leader.

pub mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use crate::planner::{Load, Plan};
use crate::topology::{ClusterSettings, EpochRecord, WorkerInfo};

/// What a coordinator is doing, for its admin service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Role {
    /// Campaigning (or between terms): nobody known to lead.
    #[default]
    Campaigning,
    /// Standing by while coordinator `leader` leads.
    Standby { leader: String },
    /// Leading.
    Leading,
}

/// How an admin request failed, as the gRPC status it becomes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The request names something wrong (an unknown worker, a count that does not fit).
    #[error("{0}")]
    InvalidArgument(String),
    /// The cluster is not in a state that allows it (the last worker, no load yet, a standby).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Try again (the leadership changed, the store is unreachable).
    #[error("{0}")]
    Unavailable(String),
}

/// The leader's view, for `GetTopology`.
#[derive(Debug, Clone)]
pub struct TopologyView {
    pub leader: String,
    pub record: Option<EpochRecord>,
    /// Every registered worker.
    pub workers: Vec<WorkerInfo>,
    pub draining: BTreeSet<String>,
    pub settings: ClusterSettings,
    pub num_experts: usize,
    /// The load summed over the epoch's members.
    pub load: Option<Load>,
    /// Tokens each worker's own sequences routed over its window, all layers.
    pub routed: BTreeMap<String, u64>,
}

/// A plan the leader made, and whether it formed an epoch with it.
#[derive(Debug, Clone)]
pub struct PlanReport {
    pub plan: Plan,
    /// The epoch formed with it, when it was applied.
    pub epoch: Option<u64>,
    pub bytes_to_load: u64,
    /// Why nothing changes, when nothing does.
    pub note: String,
}

type Reply<T> = oneshot::Sender<Result<T, AdminError>>;

/// A request to the leader loop.
#[derive(Debug)]
pub enum AdminRequest {
    Topology(Reply<TopologyView>),
    Rebalance {
        dry_run: bool,
        reply: Reply<PlanReport>,
    },
    Drain {
        id: String,
        reply: Reply<String>,
    },
    SetRedundant {
        count: usize,
        dry_run: bool,
        reply: Reply<PlanReport>,
    },
}

/// The coordinator's side of the admin channel: the requests, and where it says what it does.
/// Clones share the channel, so that a coordinator started again (by `moebius up`) answers
/// the same admin service.
#[derive(Debug, Clone)]
pub struct AdminLink {
    pub(crate) requests: Arc<tokio::sync::Mutex<mpsc::Receiver<AdminRequest>>>,
    pub(crate) role: Arc<watch::Sender<Role>>,
}

/// The server's side: asks the leader, or says why it cannot.
#[derive(Debug, Clone)]
pub struct AdminHandle {
    requests: mpsc::Sender<AdminRequest>,
    role: watch::Receiver<Role>,
}

/// A connected pair: give the link to [`crate::coordinator::run_with_admin`] and the handle to
/// the admin service.
pub fn channel() -> (AdminHandle, AdminLink) {
    let (tx, rx) = mpsc::channel(16);
    let (role_tx, role_rx) = watch::channel(Role::default());
    (
        AdminHandle {
            requests: tx,
            role: role_rx,
        },
        AdminLink {
            requests: Arc::new(tokio::sync::Mutex::new(rx)),
            role: Arc::new(role_tx),
        },
    )
}

impl AdminHandle {
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Sends a request built around its reply channel to the leader and waits for the answer.
    pub async fn ask<T>(
        &self,
        request: impl FnOnce(Reply<T>) -> AdminRequest,
    ) -> Result<T, AdminError> {
        match self.role() {
            Role::Leading => {}
            Role::Standby { leader } => {
                return Err(AdminError::FailedPrecondition(format!(
                    "this coordinator is a standby; the leader is {leader}: ask its admin address"
                )))
            }
            Role::Campaigning => {
                return Err(AdminError::Unavailable(
                    "no coordinator leads right now (an election is under way); retry shortly"
                        .into(),
                ))
            }
        }
        let (tx, rx) = oneshot::channel();
        let lost = || AdminError::Unavailable("the leadership changed; retry".into());
        self.requests.send(request(tx)).await.map_err(|_| lost())?;
        rx.await.map_err(|_| lost())?
    }
}
