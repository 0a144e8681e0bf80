//! `moebius.v1.Admin` over an [`AdminHandle`]: proto conversion, the workers' health probes,
//! and one mapping from [`AdminError`] to a gRPC status.

use std::time::Duration;

use moebius_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{AdminError, AdminHandle, AdminRequest, PlanReport, TopologyView};
use crate::placement::Placement;
use crate::planner;
use crate::tls::{Clients, Tls};
use crate::topology::EpochState;

/// How long a worker's health service has to answer `GetTopology`'s probe.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);

/// The admin service of one coordinator.
#[derive(Debug, Clone)]
pub struct AdminService {
    handle: AdminHandle,
    /// TLS towards the workers' health services.
    tls: Option<Tls>,
}

impl AdminService {
    pub fn new(handle: AdminHandle, tls: Option<Tls>) -> Self {
        Self { handle, tls }
    }

    pub fn into_server(self) -> pb::admin_server::AdminServer<Self> {
        pb::admin_server::AdminServer::new(self)
    }
}

/// Serves the admin service of `handle` on `listener` until `stop`, with a gRPC health service:
/// every coordinator, leader or standby, is live and ready (a standby answers by naming the
/// leader). With `tls`, only clients with a certificate from the cluster's CA are served.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: AdminHandle,
    stop: CancellationToken,
    tls: Option<Tls>,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let (health, health_service) = crate::health::health_service().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        server = server.tls_config(tls.grpc_server(Clients::Components))?;
    }
    server
        .add_service(health_service)
        .add_service(AdminService::new(handle, tls).into_server())
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
}

fn status(e: AdminError) -> Status {
    match e {
        AdminError::InvalidArgument(m) => Status::invalid_argument(m),
        AdminError::FailedPrecondition(m) => Status::failed_precondition(m),
        AdminError::Unavailable(m) => Status::unavailable(m),
    }
}

fn layers(placement: &Placement) -> Vec<pb::LayerPlacement> {
    placement
        .layers
        .iter()
        .map(|plan| pb::LayerPlacement {
            ranks: plan
                .iter()
                .map(|slots| pb::RankSlots {
                    experts: slots.iter().map(|&e| e as u32).collect(),
                })
                .collect(),
        })
        .collect()
}

fn plan(report: PlanReport) -> pb::RebalancePlan {
    let p = &report.plan;
    pb::RebalancePlan {
        applied: report.epoch.is_some(),
        epoch: report.epoch.unwrap_or(0),
        changed_layers: p.changed_layers.iter().map(|&l| l as u32).collect(),
        slots_to_load: p.slots_to_load as u64,
        bytes_to_load: report.bytes_to_load,
        imbalance_before: p.imbalance_before,
        imbalance_after: p.imbalance_after,
        layers: layers(&p.placement),
        note: report.note,
    }
}

async fn topology(view: TopologyView, tls: Option<&Tls>) -> pb::Topology {
    let record = view.record.as_ref();
    let probes = view.workers.iter().map(|w| async move {
        crate::coordinator::probe::serving(&w.address, HEALTH_TIMEOUT, tls).await
    });
    let serving = futures::future::join_all(probes).await;
    let workers = view
        .workers
        .iter()
        .zip(serving)
        .map(|(w, serving)| {
            let rank = record.and_then(|r| {
                r.workers
                    .iter()
                    .position(|m| m.id == w.id && m.incarnation == w.incarnation)
            });
            pb::WorkerState {
                id: w.id.clone(),
                address: w.address.clone(),
                rank: rank.map_or(-1, |r| r as i32),
                serving,
                draining: view.draining.contains(&w.id),
                slots: match (record, rank) {
                    (Some(rec), Some(r)) => rec.placement.slots(0, r).len() as u32,
                    _ => 0,
                },
                routed_tokens: view.routed.get(&w.id).copied().unwrap_or(0),
            }
        })
        .collect();
    let (load, window, layer_imbalance) = match (&view.load, record) {
        (Some(load), Some(rec)) => (
            load.tokens
                .iter()
                .map(|l| pb::LayerLoad {
                    tokens: l.iter().map(|&t| t as u64).collect(),
                })
                .collect(),
            load.window_s,
            planner::layer_imbalance(&rec.placement, &load.tokens),
        ),
        _ => (Vec::new(), 0.0, Vec::new()),
    };
    let imbalance = match (&view.load, record) {
        (Some(load), Some(rec)) => planner::mean_imbalance(&rec.placement, &load.tokens),
        _ => 0.0,
    };
    pb::Topology {
        leader: view.leader,
        epoch: record.map_or(0, |r| r.epoch),
        epoch_state: match record.map(|r| r.state) {
            Some(EpochState::Pending) => "pending".into(),
            Some(EpochState::Active) => "active".into(),
            None => String::new(),
        },
        num_experts: view.num_experts as u32,
        redundant_experts: view.settings.redundant_experts as u32,
        workers,
        layers: record.map(|r| layers(&r.placement)).unwrap_or_default(),
        load,
        load_window_seconds: window,
        layer_imbalance,
        imbalance,
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn get_topology(
        &self,
        _request: Request<pb::GetTopologyRequest>,
    ) -> Result<Response<pb::Topology>, Status> {
        let view = self
            .handle
            .ask(AdminRequest::Topology)
            .await
            .map_err(status)?;
        Ok(Response::new(topology(view, self.tls.as_ref()).await))
    }

    async fn rebalance(
        &self,
        request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalancePlan>, Status> {
        let dry_run = request.into_inner().dry_run;
        let report = self
            .handle
            .ask(|reply| AdminRequest::Rebalance { dry_run, reply })
            .await
            .map_err(status)?;
        Ok(Response::new(plan(report)))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let id = request.into_inner().worker_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("worker_id is empty"));
        }
        let message = self
            .handle
            .ask(|reply| AdminRequest::Drain {
                id: id.clone(),
                reply,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DrainResponse {
            worker_id: id,
            message,
        }))
    }

    async fn set_redundant_experts(
        &self,
        request: Request<pb::SetRedundantExpertsRequest>,
    ) -> Result<Response<pb::RebalancePlan>, Status> {
        let r = request.into_inner();
        let report = self
            .handle
            .ask(|reply| AdminRequest::SetRedundant {
                count: r.count as usize,
                dry_run: r.dry_run,
                reply,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(plan(report)))
    }
}
