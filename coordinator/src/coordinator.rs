//! The coordinator's control loop: leader election, then epochs.
//!
//! Each *term* grants a lease and keeps it alive ([`crate::lease::keep_alive`]) concurrently
//! with the work of the term, in the same task. The term campaigns for the leader key
//! (create-if-absent under the lease), stands by watching the key while another coordinator
//! holds it, and once it leads runs the [`leader`] loop. A lost lease (or a leader key taken
//! away) ends the term at once; the next term campaigns again. An unreachable store does not end
//! a term: the leader keeps its view and retries, and every placement write is fenced by the
//! leader key's lease, so a leader that lost its role meanwhile cannot overwrite its successor.
//! On shutdown the lease is revoked, which hands leadership to a standby immediately.

mod leader;
pub mod metrics;
pub(crate) mod probe;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use tokio::sync::{mpsc, watch};

use crate::admin::{AdminLink, AdminRequest, Role};
use crate::error::CoordinatorError;
use crate::store::{LeaseId, StoreError, TopologyStore, WatchEvent};
use crate::topology::Keys;
use crate::watch::{Change, PrefixWatch};
pub use metrics::CoordinatorMetrics;

/// How a coordinator behaves; see [`run`].
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// This coordinator's name in the leader key; unique among the cluster's coordinators.
    pub id: String,
    /// The cluster's name: its keys live under `/moebius/<cluster>/`.
    pub cluster: String,
    /// Workers that must register before the first epoch is formed.
    pub expected_workers: usize,
    /// Logical routed experts of the model (`n_routed_experts`); also the most ranks an EP
    /// group can have.
    pub num_experts: usize,
    /// TTL of the coordinator's lease; a standby takes over this long after a leader dies.
    pub lease_ttl: Duration,
    /// Quiet time after the last membership change before an epoch is formed, so that workers
    /// starting (or dying) together land in one epoch.
    pub settle: Duration,
    /// Expert groups of the model (`n_group`): EPLB packs whole groups together.
    pub expert_groups: usize,
    /// Redundant expert slots over the group, until an operator sets another count (which is
    /// kept in the store and wins over this one).
    pub redundant_experts: usize,
    /// The leader rebalances on its own when the mean imbalance (max over mean rows per rank,
    /// per MoE layer) under the measured load passes this; 0 turns it off.
    pub rebalance_threshold: f64,
    /// How often the leader looks at the load for a rebalance.
    pub rebalance_interval: Duration,
    /// The address of this coordinator's admin service, announced under its lease so that
    /// `moebius admin --etcd` finds the leader's.
    pub admin_address: Option<String>,
    /// Where the coordinator counts what it does (registered by the caller, or unseen).
    pub metrics: CoordinatorMetrics,
    /// TLS towards the workers' gRPC services (health probes); `None`: plaintext.
    pub tls: Option<crate::tls::Tls>,
}

impl Default for CoordinatorConfig {
    /// Cluster "default", 2 workers, DeepSeek-V3's 256 experts, a 5 s lease, 300 ms settle.
    fn default() -> Self {
        Self {
            id: "coordinator".into(),
            cluster: "default".into(),
            expected_workers: 2,
            num_experts: 256,
            lease_ttl: Duration::from_secs(5),
            settle: Duration::from_millis(300),
            expert_groups: 1,
            redundant_experts: 0,
            rebalance_threshold: 1.3,
            rebalance_interval: Duration::from_secs(60),
            admin_address: None,
            metrics: CoordinatorMetrics::default(),
            tls: None,
        }
    }
}

impl CoordinatorConfig {
    /// Checks that the config can work.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        let bad = |m: String| Err(CoordinatorError::Config(m));
        for (name, value) in [("id", &self.id), ("cluster", &self.cluster)] {
            if value.is_empty() || value.contains('/') {
                return bad(format!(
                    "{name} {value:?} must be non-empty and contain no '/'"
                ));
            }
        }
        if self.num_experts == 0 {
            return bad("num_experts must be at least 1".into());
        }
        if self.expected_workers == 0 {
            return bad("expected_workers must be at least 1".into());
        }
        if self.expected_workers > self.num_experts {
            return bad(format!(
                "expected_workers is {}, but must be between 1 and the {} experts (each rank \
                 holds at least one expert)",
                self.expected_workers, self.num_experts
            ));
        }
        if self.expert_groups == 0 || !self.num_experts.is_multiple_of(self.expert_groups) {
            return bad(format!(
                "expert_groups {} must divide the {} experts",
                self.expert_groups, self.num_experts
            ));
        }
        if !(self.rebalance_threshold == 0.0 || self.rebalance_threshold >= 1.0) {
            return bad(format!(
                "rebalance_threshold {} must be 0 (off) or at least 1.0 (max over mean load)",
                self.rebalance_threshold
            ));
        }
        if self.rebalance_interval.is_zero() {
            return bad("rebalance_interval must be more than zero".into());
        }
        if self.lease_ttl < Duration::from_millis(30) {
            return bad(format!(
                "lease_ttl {:?} is too short to keep alive",
                self.lease_ttl
            ));
        }
        Ok(())
    }
}

/// Shared by the parts of one coordinator.
struct Ctx {
    config: CoordinatorConfig,
    keys: Keys,
    store: Arc<dyn TopologyStore>,
    /// The admin requests, taken by whichever term leads.
    admin: Option<Arc<tokio::sync::Mutex<mpsc::Receiver<AdminRequest>>>>,
    role: Arc<watch::Sender<Role>>,
}

impl Ctx {
    /// Tells the admin service and the metrics what this coordinator is now.
    fn set_role(&self, role: Role) {
        self.config
            .metrics
            .leader
            .set(i64::from(matches!(role, Role::Leading)));
        self.role.send_replace(role);
    }
}

/// Pause between terms after a failure, growing to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Bound on revoking the lease at shutdown, so an unreachable store cannot hold the exit.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a coordinator until `shutdown` is cancelled: elects a leader among the coordinators of
/// `config.cluster`; the leader forms and activates epochs.
///
/// Returns `Ok` after a shutdown (having revoked its lease), and an error only when retrying
/// cannot help (an invalid config, a placement record that is not an epoch record). Store
/// failures and lost leases end the current term and start a new one after a backoff.
pub async fn run(
    config: CoordinatorConfig,
    store: Arc<dyn TopologyStore>,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    run_with_admin(config, store, shutdown, None).await
}

/// [`run`], answering the admin requests of `admin` while it leads (see [`crate::admin`]).
pub async fn run_with_admin(
    config: CoordinatorConfig,
    store: Arc<dyn TopologyStore>,
    shutdown: CancellationToken,
    admin: Option<AdminLink>,
) -> Result<(), CoordinatorError> {
    config.validate()?;
    let (admin, role) = match admin {
        Some(link) => (Some(link.requests), link.role),
        None => (None, Arc::new(watch::channel(Role::default()).0)),
    };
    let ctx = Ctx {
        keys: Keys::new(&config.cluster),
        config,
        store,
        admin,
        role,
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let started = Instant::now();
        match term(&ctx, &shutdown).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_fatal() => {
                tracing::error!(id = %ctx.config.id, error = %e, "coordinator stops");
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(
                    id = %ctx.config.id, error = %e, kind = e.kind(),
                    "coordinator term ended; campaigning again"
                );
            }
        }
        // A term that lasted a while was healthy: start the backoff over.
        if started.elapsed() > MAX_BACKOFF * 2 {
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One lease's life: campaign, then stand by or lead. `Ok` only on shutdown.
async fn term(ctx: &Ctx, shutdown: &CancellationToken) -> Result<(), CoordinatorError> {
    ctx.set_role(Role::Campaigning);
    let lease = ctx.store.grant_lease(ctx.config.lease_ttl).await?;
    if let Some(address) = &ctx.config.admin_address {
        let key = ctx.keys.admin(&ctx.config.id);
        ctx.store
            .put(&key, address.clone().into_bytes(), Some(lease))
            .await?;
    }
    let outcome = tokio::select! {
        // Biased: a shutdown or a lost lease wins over any further step of the leader.
        biased;
        _ = shutdown.cancelled() => Ok(()),
        e = crate::lease::keep_alive(&*ctx.store, lease, ctx.config.lease_ttl) => Err(e.into()),
        r = campaign_and_lead(ctx, lease) => r,
    };
    ctx.set_role(Role::Campaigning);
    // Best effort: after a loss the lease is gone already; an unreachable store lets it expire.
    match tokio::time::timeout(REVOKE_TIMEOUT, ctx.store.revoke_lease(lease)).await {
        Ok(Ok(())) | Ok(Err(StoreError::LeaseLost(_))) => {}
        Ok(Err(e)) => tracing::warn!(lease, error = %e, "cannot revoke the coordinator lease"),
        Err(_) => tracing::warn!(lease, "revoking the coordinator lease timed out"),
    }
    outcome
}

/// Becomes the leader (waiting while another coordinator is), then leads until an error.
async fn campaign_and_lead(ctx: &Ctx, lease: LeaseId) -> Result<(), CoordinatorError> {
    campaign(ctx, lease).await?;
    tracing::info!(id = %ctx.config.id, cluster = %ctx.config.cluster, "leading");
    ctx.set_role(Role::Leading);
    leader::lead(ctx, lease).await
}

/// Returns once this coordinator holds the leader key under `lease`.
async fn campaign(ctx: &Ctx, lease: LeaseId) -> Result<(), CoordinatorError> {
    let key = ctx.keys.leader();
    let me = leader_value(&ctx.config.id);
    let mut announced: Option<Vec<u8>> = None;
    let mut announce = |holder: &[u8]| {
        if announced.as_deref() != Some(holder) {
            let leader = serde_json::from_slice::<String>(holder)
                .unwrap_or_else(|_| String::from_utf8_lossy(holder).into_owned());
            ctx.set_role(Role::Standby { leader });
            tracing::info!(
                id = %ctx.config.id,
                leader = %String::from_utf8_lossy(holder),
                "standing by"
            );
            announced = Some(holder.to_vec());
        }
    };
    let mut watch = PrefixWatch::new(ctx.store.clone(), key.clone());
    loop {
        if ctx
            .store
            .compare_and_swap(&key, 0, me.clone(), Some(lease))
            .await?
        {
            return Ok(());
        }
        // Stand by until the key goes away, then try again.
        loop {
            match watch.next().await {
                Change::Snapshot(kvs) => match kvs.into_iter().find(|kv| kv.key == key) {
                    None => break,
                    // Our own write, from a call whose answer was lost.
                    Some(kv) if kv.value == me && kv.lease == Some(lease) => return Ok(()),
                    Some(kv) => announce(&kv.value),
                },
                Change::Event(WatchEvent::Delete { key: k, .. }) if k == key => break,
                Change::Event(WatchEvent::Put(kv)) if kv.key == key => announce(&kv.value),
                Change::Event(_) => {}
            }
        }
    }
}

/// The leader key's value: the coordinator id as a JSON string.
fn leader_value(id: &str) -> Vec<u8> {
    serde_json::Value::String(id.to_owned())
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        CoordinatorConfig::default().validate().unwrap();
    }

    #[test]
    fn validate_rejects_unworkable_configs() {
        let base = CoordinatorConfig::default();
        let cases = [
            CoordinatorConfig {
                id: String::new(),
                ..base.clone()
            },
            CoordinatorConfig {
                cluster: "a/b".into(),
                ..base.clone()
            },
            CoordinatorConfig {
                expected_workers: 0,
                ..base.clone()
            },
            CoordinatorConfig {
                num_experts: 4,
                expected_workers: 5,
                ..base.clone()
            },
            CoordinatorConfig {
                num_experts: 6,
                expert_groups: 4,
                ..base.clone()
            },
            CoordinatorConfig {
                rebalance_threshold: 0.5,
                ..base.clone()
            },
            CoordinatorConfig {
                lease_ttl: Duration::ZERO,
                ..base.clone()
            },
        ];
        for config in cases {
            let err = config.validate().unwrap_err();
            assert_eq!(err.kind(), "config", "{config:?}");
        }
    }
}
