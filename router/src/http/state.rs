//! `GET /dashboard/state`: the cluster as the dashboard draws it, read from the store (epoch,
//! registrations, load statistics) and the pool (requests in flight, who is routable).

use std::collections::BTreeMap;

use moebius_coordinator::{planner, EpochRecord, EpochState, LoadStats, StoreError, WorkerInfo};
use serde::Serialize;

use super::Dashboard;

#[derive(Debug, Serialize)]
pub(super) struct DashboardState {
    cluster: String,
    time_unix_s: f64,
    epoch: Option<Epoch>,
    workers: Vec<Worker>,
    placement: Option<PlacementView>,
    load: Option<LoadView>,
    imbalance: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Epoch {
    epoch: u64,
    state: &'static str,
}

#[derive(Debug, Serialize)]
struct Worker {
    id: String,
    address: String,
    device: String,
    rank: Option<usize>,
    registered: bool,
    draining: bool,
    routable: bool,
    in_flight: u32,
    capacity: u32,
}

#[derive(Debug, Serialize)]
struct PlacementView {
    num_experts: usize,
    layers: Vec<LayerView>,
}

#[derive(Debug, Serialize)]
struct LayerView {
    ranks: Vec<Vec<usize>>,
}

#[derive(Debug, Serialize)]
struct LoadView {
    window_seconds: f64,
    experts: usize,
    tokens: Vec<Vec<f64>>,
}

pub(super) async fn read(d: &Dashboard) -> Result<DashboardState, StoreError> {
    let record: Option<EpochRecord> = d
        .store
        .get(&d.keys.placement())
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok());
    let registrations: BTreeMap<String, WorkerInfo> = decode_all(d, &d.keys.workers()).await?;
    let stats: BTreeMap<String, LoadStats> = decode_all(d, &d.keys.stats_prefix()).await?;
    let pool = d.pool.view();

    // Every registered worker and every member of the epoch, by id.
    let mut infos: BTreeMap<String, WorkerInfo> = registrations.clone();
    if let Some(record) = &record {
        for w in &record.workers {
            infos.entry(w.id.clone()).or_insert_with(|| w.clone());
        }
    }
    let workers = infos
        .into_values()
        .map(|info| {
            let in_pool = pool.workers.iter().find(|w| w.id == info.id);
            Worker {
                rank: record.as_ref().and_then(|r| r.rank_of(&info.id)),
                registered: registrations.contains_key(&info.id),
                draining: pool.draining.contains(&info.id),
                routable: in_pool.is_some_and(|w| w.routable),
                in_flight: in_pool.map_or(0, |w| w.in_flight),
                capacity: in_pool.map_or(info.capacity, |w| w.capacity),
                id: info.id,
                address: info.address,
                device: info.device,
            }
        })
        .collect();

    let load = record
        .as_ref()
        .and_then(|r| planner::Load::of(&stats, &r.workers, r.placement.num_experts));
    let imbalance = match (&record, &load) {
        (Some(r), Some(l)) => Some(planner::mean_imbalance(&r.placement, &l.tokens)),
        _ => None,
    };
    let placement = record.as_ref().map(|r| {
        let layers = r
            .placement
            .layers
            .len()
            .max(load.as_ref().map_or(0, planner::Load::layers));
        PlacementView {
            num_experts: r.placement.num_experts,
            layers: (0..layers)
                .map(|l| LayerView {
                    ranks: r.placement.layer(l).to_vec(),
                })
                .collect(),
        }
    });
    Ok(DashboardState {
        cluster: d.cluster.clone(),
        time_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |t| t.as_secs_f64()),
        epoch: record.as_ref().map(|r| Epoch {
            epoch: r.epoch,
            state: match r.state {
                EpochState::Pending => "pending",
                EpochState::Active => "active",
            },
        }),
        workers,
        placement,
        load: load.map(|l| LoadView {
            window_seconds: (l.window_s * 10.0).round() / 10.0,
            experts: l.tokens.first().map_or(0, Vec::len),
            tokens: l.tokens,
        }),
        imbalance,
    })
}

/// The JSON values under `prefix`, by the key's last part; values that do not decode are
/// left out.
async fn decode_all<T: serde::de::DeserializeOwned>(
    d: &Dashboard,
    prefix: &str,
) -> Result<BTreeMap<String, T>, StoreError> {
    let (kvs, _) = d.store.get_prefix(prefix).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| {
            let id = kv.key.as_str().strip_prefix(prefix)?;
            let value = serde_json::from_slice(&kv.value).ok()?;
            Some((id.to_string(), value))
        })
        .collect())
}
