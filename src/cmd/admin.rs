//! `moebius admin`: the operator's commands against the leading coordinator's
//! `moebius.v1.Admin` service — the topology, a rebalance (or its dry run), a drain, the number
//! of redundant experts. Output is a readable table, or JSON with `--json`. A refused command
//! exits 1 (2 for a request that names something wrong) with one line naming the gRPC code.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use moebius_coordinator::tls::{self, Tls};
use moebius_coordinator::{EtcdStore, Keys, TopologyStore};
use moebius_proto::v1 as pb;
use pb::admin_client::AdminClient;
use serde_json::json;
use tonic::transport::Channel;

use super::UsageError;

/// The admin service `moebius up` starts when no other address is given.
const DEFAULT_ADMIN: &str = "127.0.0.1:50052";

/// Flags of `moebius admin`.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Admin address of the leading coordinator (default 127.0.0.1:50052, what `moebius up`
    /// uses; with --etcd, the leader's announced address).
    #[arg(long, env = "MOEBIUS_ADMIN", global = true)]
    coordinator: Option<String>,
    /// etcd endpoints: find the leading coordinator's admin address there.
    #[arg(long, env = "MOEBIUS_ETCD", global = true, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Cluster name (with --etcd).
    #[arg(
        long,
        env = "MOEBIUS_CLUSTER",
        default_value = "default",
        global = true
    )]
    cluster: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// With TLS in the cluster: the operator's certificate from the cluster's CA (the admin
    /// service and etcd refuse a client without one).
    #[command(flatten)]
    tls: super::tls::TlsArgs,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Workers and their health, the epoch, the per-layer placement, the load and imbalance.
    Topology,
    /// Plan a placement from the measured load (EPLB) and switch to it without stopping.
    Rebalance {
        /// Print the plan (bytes to move, predicted imbalance) without applying it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Scale down: the worker finishes its sequences, leaves the group and exits 0.
    Drain {
        /// The worker's id (default: $MOEBIUS_WORKER_ID, so that a worker's pre-stop hook can
        /// drain the worker it runs beside).
        #[arg(env = "MOEBIUS_WORKER_ID")]
        id: String,
    },
    /// Set the number of redundant expert slots over the group, and re-plan with it.
    Redundant {
        count: u32,
        /// Print the plan without applying it.
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn run(args: AdminArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let tls = args.tls.load()?;
    runtime.block_on(async move {
        let address = address(&args, tls.as_ref()).await?;
        let mut client = connect(&address, tls.as_ref()).await?;
        match args.command {
            AdminCommand::Topology => {
                let t = client
                    .get_topology(pb::GetTopologyRequest {})
                    .await
                    .map_err(refused)?
                    .into_inner();
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&topology_json(&t))?);
                } else {
                    print_topology(&t);
                }
            }
            AdminCommand::Rebalance { dry_run } => {
                let plan = client
                    .rebalance(pb::RebalanceRequest { dry_run })
                    .await
                    .map_err(refused)?
                    .into_inner();
                print_plan(&plan, dry_run, args.json)?;
            }
            AdminCommand::Redundant { count, dry_run } => {
                let plan = client
                    .set_redundant_experts(pb::SetRedundantExpertsRequest { count, dry_run })
                    .await
                    .map_err(refused)?
                    .into_inner();
                print_plan(&plan, dry_run, args.json)?;
            }
            AdminCommand::Drain { id } => {
                let r = client
                    .drain(pb::DrainRequest { worker_id: id })
                    .await
                    .map_err(refused)?
                    .into_inner();
                if args.json {
                    let out = json!({"worker_id": r.worker_id, "message": r.message});
                    println!("{}", serde_json::to_string_pretty(&out)?);
                } else {
                    println!("draining {}: {}", r.worker_id, r.message);
                }
            }
        }
        Ok(())
    })
}

/// The admin address: the flag, the leader's announcement in etcd, or `up`'s default.
async fn address(args: &AdminArgs, tls: Option<&Tls>) -> Result<String> {
    if let Some(a) = &args.coordinator {
        return Ok(a.clone());
    }
    if args.etcd.is_empty() {
        return Ok(DEFAULT_ADMIN.into());
    }
    let store = EtcdStore::connect_with(&args.etcd, Duration::from_secs(5), tls)
        .await
        .context("cannot connect to etcd; check --etcd")?;
    let keys = Keys::new(&args.cluster);
    let leader = store
        .get(&keys.leader())
        .await?
        .ok_or_else(|| anyhow!("no coordinator leads cluster {:?}", args.cluster))?;
    let leader: String = serde_json::from_slice(&leader.value)
        .unwrap_or_else(|_| String::from_utf8_lossy(&leader.value).into_owned());
    let admin = store.get(&keys.admin(&leader)).await?.ok_or_else(|| {
        anyhow!("the leading coordinator {leader} announces no admin address; pass --coordinator")
    })?;
    Ok(String::from_utf8_lossy(&admin.value).into_owned())
}

async fn connect(address: &str, tls: Option<&Tls>) -> Result<AdminClient<Channel>> {
    let channel = tls::endpoint(address, tls)
        .with_context(|| format!("{address:?} is not an address"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the admin service at {address}"))?;
    Ok(AdminClient::new(channel))
}

/// A refused request as one line: the gRPC code and the coordinator's message.
fn refused(status: tonic::Status) -> anyhow::Error {
    let line = format!("{}: {}", code_name(status.code()), status.message());
    if status.code() == tonic::Code::InvalidArgument {
        UsageError(line).into()
    } else {
        anyhow!(line)
    }
}

/// The canonical name of a gRPC code, as grpcurl and the gRPC docs write it.
fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn slots_json(layers: &[pb::LayerPlacement]) -> serde_json::Value {
    layers
        .iter()
        .map(|l| {
            l.ranks
                .iter()
                .map(|r| r.experts.clone())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn topology_json(t: &pb::Topology) -> serde_json::Value {
    json!({
        "leader": t.leader,
        "epoch": t.epoch,
        "epoch_state": t.epoch_state,
        "num_experts": t.num_experts,
        "redundant_experts": t.redundant_experts,
        "workers": t.workers.iter().map(|w| json!({
            "id": w.id,
            "address": w.address,
            "rank": w.rank,
            "serving": w.serving,
            "draining": w.draining,
            "slots": w.slots,
            "routed_tokens": w.routed_tokens,
        })).collect::<Vec<_>>(),
        "placement": slots_json(&t.layers),
        "load": t.load.iter().map(|l| l.tokens.clone()).collect::<Vec<_>>(),
        "load_window_seconds": t.load_window_seconds,
        "layer_imbalance": t.layer_imbalance,
        "imbalance": t.imbalance,
    })
}

fn print_topology(t: &pb::Topology) {
    let state = if t.epoch_state.is_empty() {
        "none"
    } else {
        &t.epoch_state
    };
    println!(
        "leader {}  epoch {} ({state})  experts {} + {} redundant slots",
        t.leader, t.epoch, t.num_experts, t.redundant_experts
    );
    println!(
        "{:<16} {:>4}  {:<11} {:>5} {:>10}  ADDRESS",
        "WORKER", "RANK", "HEALTH", "SLOTS", "ROUTED"
    );
    for w in &t.workers {
        let rank = if w.rank < 0 {
            "-".to_string()
        } else {
            w.rank.to_string()
        };
        let health = match (w.draining, w.serving) {
            (true, _) => "draining",
            (false, true) => "serving",
            (false, false) => "not-serving",
        };
        println!(
            "{:<16} {:>4}  {:<11} {:>5} {:>10}  {}",
            w.id, rank, health, w.slots, w.routed_tokens, w.address
        );
    }
    if t.layers.len() == 1 {
        println!("placement (every MoE layer):");
    } else {
        println!("placement (per MoE layer):");
    }
    for (l, layer) in t.layers.iter().enumerate() {
        let ranks: Vec<String> = layer
            .ranks
            .iter()
            .enumerate()
            .map(|(r, s)| format!("r{r} {:?}", s.experts))
            .collect();
        let imbalance = t
            .layer_imbalance
            .get(l)
            .map_or(String::new(), |i| format!("  imbalance {i:.3}"));
        println!("  layer {l}: {}{imbalance}", ranks.join("  "));
    }
    if t.load.is_empty() {
        println!("load: nothing measured yet");
    } else {
        println!(
            "load over {:.0} s: imbalance {:.3} (mean over {} MoE layers of max/mean rows per rank)",
            t.load_window_seconds,
            t.imbalance,
            t.load.len()
        );
    }
}

fn print_plan(plan: &pb::RebalancePlan, dry_run: bool, as_json: bool) -> Result<()> {
    if as_json {
        let out = json!({
            "dry_run": dry_run,
            "applied": plan.applied,
            "epoch": plan.epoch,
            "changed_layers": plan.changed_layers,
            "slots_to_load": plan.slots_to_load,
            "bytes_to_load": plan.bytes_to_load,
            "imbalance_before": plan.imbalance_before,
            "imbalance_after": plan.imbalance_after,
            "placement": slots_json(&plan.layers),
            "note": plan.note,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let what = if plan.applied {
        format!("epoch {} formed with the new placement", plan.epoch)
    } else if dry_run && plan.note.is_empty() {
        "dry run, nothing changed".to_string()
    } else {
        "nothing changed".to_string()
    };
    println!("{what}");
    println!(
        "  layers changing: {:?}; slots to load: {} ({:.1} MiB)",
        plan.changed_layers,
        plan.slots_to_load,
        plan.bytes_to_load as f64 / (1024.0 * 1024.0)
    );
    println!(
        "  imbalance {:.3} -> {:.3}",
        plan.imbalance_before, plan.imbalance_after
    );
    if !plan.note.is_empty() {
        println!("  {}", plan.note);
    }
    Ok(())
}
